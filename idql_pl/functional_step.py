"""A gradient step as a function of tensors, so that a whole training iteration traces into one graph.

Eager training steps call ``loss.backward()`` and ``Optimizer.step()``; ``torch.compile`` breaks the graph at
both (torch 2.13). Here the gradient comes from ``torch.func.grad`` over the module's parameters
(``torch.func.functional_call``) and the update from the functional ``torch.optim.adam.adam`` applied to the
optimizer's own state tensors (moments, step counts), so checkpoints, resume and the optimizer's
``state_dict`` are the eager ones'. Used by ``compile: step`` (:class:`~idql_pl.idql.IDQL`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad
from torch.optim.adam import adam as functional_adam


class LossCaller(nn.Module):
    """``owner.<name>(*args)`` as a module's forward, so ``functional_call`` can run a loss method of ``owner``
    with some of its parameters replaced. Built before compiling (dynamo does not trace module construction)."""

    def __init__(self, owner: nn.Module, name: str):
        super().__init__()
        self.owner, self.name = owner, name

    def forward(self, *args: Any) -> Any:
        return getattr(self.owner, self.name)(*args)


def lr_tensor(value: float | list[float] | Tensor, device: torch.device) -> Tensor:
    """Learning rate(s) as a tensor on ``device``: float64 on CPU (the fused CPU Adam then rounds as with a
    Python float, bit for bit: ``tests/test_compile.py``), float32 on other devices (the parameters' dtype)."""
    return torch.as_tensor(value, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)


def prepare_functional_adam(opt: torch.optim.Optimizer) -> None:
    """Ready ``opt`` for :func:`adam_update_` inside a compiled graph, once before the first compiled step
    (after a resume too, since loading a checkpoint replaces the state tensors):

    - create the state ``Optimizer.step`` creates on its first call (zero moments, step count 0) for parameters
      that have none yet, every tensor on the parameters' device (a step count on the CPU would be a host read
      in every replay of a CUDA graph);
    - hold each group's LR as a tensor on that device (a scheduler then updates it in place, and
      ``torch.compile`` guards on no LR value, which would recompile at every step: PyTorch's advice for compiled
      optimizers with LR schedulers); a resumed LR comes back from the checkpoint as a CPU tensor;
    - mark every tensor the step mutates (moments, step counts, LRs) as a static input
      (``torch._dynamo.mark_static_address``), as ``torch.compile`` does for an optimizer it traces itself, so
      CUDA graphs (``mode="reduce-overhead"``) capture the step instead of skipping it for "mutated inputs"."""
    for group in opt.param_groups:
        if not group["params"]:
            continue
        device = group["params"][0].device
        for p in group["params"]:
            state = opt.state[p]
            if not state:
                state.update(step=torch.zeros((), dtype=torch.float32, device=device),
                             exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                             exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
            state["step"] = state["step"].to(device)
            for value in state.values():
                torch._dynamo.mark_static_address(value)
        lr = group["lr"]
        group["lr"] = lr_tensor(float(lr), device) if not isinstance(lr, Tensor) or lr.device != device else lr
        torch._dynamo.mark_static_address(group["lr"])


def adam_update_(opt: torch.optim.Optimizer, grads: list[Tensor], lr: Tensor | float | None = None) -> None:
    """One step of ``opt`` (a one-group ``torch.optim.Adam``/``AdamW``) with ``grads``, written into its
    parameters and state by the functional ``adam`` with the group's own options (the fused kernel where the
    optimizer has it, except under ``torch.compile``, which does not trace it and fuses the plain update
    itself); ``lr`` (e.g. a tensor computed outside the graph) overrides the group's."""
    (group,) = opt.param_groups
    params = group["params"]
    fused = bool(group.get("fused")) and not torch.compiler.is_compiling()  # compiled: inductor fuses it
    states = [opt.state[p] for p in params]
    with torch.no_grad():
        functional_adam(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            [s["step"] for s in states],
            foreach=False if group.get("fused") else group.get("foreach"), capturable=group.get("capturable", False),
            fused=fused, decoupled_weight_decay=isinstance(opt, torch.optim.AdamW),
            amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1],
            lr=group["lr"] if lr is None else lr, weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=False,
        )


def functional_step_(opt: torch.optim.Optimizer, caller: LossCaller, args: tuple[Any, ...],
                     lr: Tensor | float | None = None) -> Any:
    """One Adam step of ``opt``'s parameters on the loss ``caller(*args)`` (its first output if it returns a
    tuple); returns the loss function's output, detached."""
    trained = {id(p) for p in opt.param_groups[0]["params"]}
    params = {n: p for n, p in caller.owner.named_parameters() if id(p) in trained}

    def loss(p: dict[str, Tensor]) -> tuple[Tensor, Any]:
        out = functional_call(caller, {f"owner.{n}": v for n, v in p.items()}, args)
        return (out[0] if isinstance(out, tuple) else out), out

    grads, out = grad(loss, has_aux=True)(params)
    # contiguous, as autograd's accumulated .grad is: the fused Adam kernel misreads a transposed gradient
    by_param = {id(params[n]): g.contiguous() for n, g in grads.items()}
    adam_update_(opt, [by_param[id(p)] for p in opt.param_groups[0]["params"]], lr)
    return out

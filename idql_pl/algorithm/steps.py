"""One optimizer step on a loss, in two forms that compute the same thing.

- :class:`EagerStep` (the default, and the reference): ``loss.backward()`` (Lightning's ``manual_backward``
  when a Trainer runs the module: precision, DDP), then ``Optimizer.step()``.
- :class:`FunctionalStep` (``compile: true``): the gradient from ``torch.func.grad`` over the module's
  parameters (``torch.func.functional_call``) and the update from the functional ``torch.optim.adam.adam``
  applied to the optimizer's own state tensors (moments, step counts). ``torch.compile`` breaks a graph at
  ``backward()`` and ``Optimizer.step()``; this form traces, so a whole training iteration becomes one graph,
  while checkpoints, resume and the optimizers' ``state_dict`` stay the eager ones. Uncompiled it is the eager
  step bit for bit (``tests/unit/test_compile.py``).

Both are called as ``step(opt, loss_fn, *args, lr=None)``: one step of ``opt``'s parameters on the first
output of ``loss_fn(*args)`` (a method of the module or of one of its submodules), at learning rate ``lr``
when given; they return ``loss_fn``'s output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import lightning as L
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad
from torch.optim.adam import adam as functional_adam

LossFn = Callable[..., Any]


class GradientStep(Protocol):
    def __call__(self, opt: torch.optim.Optimizer, loss_fn: LossFn, *args: Any,
                 lr: Tensor | float | None = None) -> Any: ...


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


class EagerStep:
    """``loss.backward()`` and ``opt.step()``; ``module`` is the LightningModule being trained (its
    ``manual_backward`` applies Lightning's precision and DDP when a Trainer runs it)."""

    def __init__(self, module: L.LightningModule):
        self.module = module

    def __call__(self, opt: torch.optim.Optimizer, loss_fn: LossFn, *args: Any,
                 lr: float | None = None) -> Any:
        out = loss_fn(*args)
        opt.zero_grad(set_to_none=True)
        if _attached(self.module):
            self.module.manual_backward(_first(out))
        else:
            _first(out).backward()
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out


def _attached(module: L.LightningModule) -> bool:
    try:
        return module.trainer is not None
    except RuntimeError:  # no Trainer (a bare loop)
        return False


class _Call(nn.Module):
    """``fn(*args)`` as a module's forward, with ``module`` registered inside, so that ``functional_call``
    runs any of ``module``'s loss functions with some of its parameters replaced by tensors."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn: LossFn, *args: Any) -> Any:
        return fn(*args)


class FunctionalStep:
    """The step as a function of tensors: ``torch.func.grad`` of the loss with respect to ``opt``'s
    parameters, then :func:`adam_update_`. Build it before compiling (``torch.compile`` does not trace module
    construction); run :func:`prepare_functional_adam` on each optimizer before the first compiled step."""

    def __init__(self, module: nn.Module):
        self.call = _Call(module)
        self.names = {id(p): f"module.{name}" for name, p in module.named_parameters()}

    def __call__(self, opt: torch.optim.Optimizer, loss_fn: LossFn, *args: Any,
                 lr: Tensor | float | None = None) -> Any:
        (group,) = opt.param_groups
        params = {self.names[id(p)]: p for p in group["params"]}

        def loss(p: dict[str, Tensor]) -> tuple[Tensor, Any]:
            out = functional_call(self.call, p, (loss_fn, *args))
            return _first(out), out

        grads, out = grad(loss, has_aux=True)(params)
        # contiguous, as autograd's accumulated .grad is: the fused Adam kernel misreads a transposed gradient
        adam_update_(opt, [grads[self.names[id(p)]].contiguous() for p in group["params"]], lr)
        return out


def lr_tensor(value: float | list[float] | Tensor, device: torch.device) -> Tensor:
    """Learning rate(s) as a tensor on ``device``: float64 on CPU (the fused CPU Adam then rounds as with a
    Python float, bit for bit: ``tests/unit/test_compile.py``), float32 on other devices (the parameters'
    dtype)."""
    return torch.as_tensor(value, dtype=torch.float64 if device.type == "cpu" else torch.float32,
                           device=device)


def prepare_functional_adam(opt: torch.optim.Optimizer) -> None:
    """Ready ``opt`` for :func:`adam_update_` inside a compiled graph, once before the first compiled step
    (after a resume too, since loading a checkpoint replaces the state tensors):

    - create the state ``Optimizer.step`` creates on its first call (zero moments, step count 0) for
      parameters that have none yet, every tensor on the parameters' device (a step count on the CPU would be
      a host read in every replay of a CUDA graph);
    - hold each group's LR as a tensor on that device (a scheduler then updates it in place, and
      ``torch.compile`` guards on no LR value, which would recompile at every step: PyTorch's advice for
      compiled optimizers with LR schedulers); a resumed LR comes back from the checkpoint as a CPU tensor;
    - mark every tensor the step mutates (moments, step counts, LRs) as a static input
      (``torch._dynamo.mark_static_address``), as ``torch.compile`` does for an optimizer it traces itself, so
      CUDA graphs (``mode="reduce-overhead"``) capture the step instead of skipping it for "mutated
      inputs"."""
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
        group["lr"] = (lr_tensor(float(lr), device) if not isinstance(lr, Tensor) or lr.device != device
                       else lr)
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
            foreach=False if group.get("fused") else group.get("foreach"),
            capturable=group.get("capturable", False),
            fused=fused, decoupled_weight_decay=isinstance(opt, torch.optim.AdamW),
            amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1],
            lr=group["lr"] if lr is None else lr, weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=False,
        )

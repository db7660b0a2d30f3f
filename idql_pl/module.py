"""Base class of the three IDQL LightningModules: plain optimizer steps, one counted step per iteration,
exact resume, the dimension check and the non-finite guard."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from idql_pl.errors import CheckpointError, ConfigError, NonFiniteLossError
from idql_pl.functional_step import LossCaller, functional_step_
from idql_pl.nets import add_agent_dim, lacks_agent_dim
from idql_pl.precision import precision_error
from idql_pl.rng import (
    capture_rng_state,
    distributed_world,
    gather_from_ranks,
    own_rank_entry,
    restore_rng_state,
    seed_rank_stream,
)


def make_adam(params: list[Tensor], lr: float, weight_decay: float | None = None) -> torch.optim.Optimizer:
    """Adam (``weight_decay=None``) or AdamW with that decay, fused into one kernel per step on CPU/CUDA."""
    fusable = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    kwargs: dict[str, Any] = {"fused": True} if fusable else {}
    if weight_decay is None:
        return torch.optim.Adam(params, lr=lr, **kwargs)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)


def dims_mismatch(saved: Mapping[str, int] | None, obs_dim: int, action_dim: int, what: str, data: str) -> str | None:
    """The one-line error for a checkpoint (``what``) whose saved obs/action dims differ from the data's."""
    if saved is None or dict(saved) == {"obs_dim": obs_dim, "action_dim": action_dim}:
        return None
    return (f"{what} was trained with obs_dim={saved['obs_dim']}, action_dim={saved['action_dim']} but {data} has"
            f" obs_dim={obs_dim}, action_dim={action_dim}: use a checkpoint from the same environment, or drop"
            " --ckpt_path")


class IDQLModule(L.LightningModule):
    """Shared plumbing; subclasses set ``hparams.obs_dim``/``hparams.action_dim`` (via :meth:`save_init_args`).

    - Updates step plain ``torch.optim`` optimizers (:meth:`plain_optimizers`, :meth:`step_optimizer`): one
      training step of the paper's Algorithm 1 makes several updates (V, Q, target, 2 behavior steps), while
      Lightning counts a step per ``LightningOptimizer.step()``. :meth:`count_step`, called once at the end of
      every ``training_step``, is that one counted step, so ``trainer.global_step`` and ``max_steps`` count
      iterations of Algorithm 1 (critic steps for IDQL).
    - Checkpoints carry the global RNG states (dropout and diffusion noise continue identically after a resume;
      one per rank under DDP, where each rank draws its own stream) and are refused when their obs/action
      dimensions differ from the data's.
    - Losses are checked for NaN/inf without a host sync per step: a device-side flag accumulates and is read
      on logging steps and before every checkpoint save, so ``last.ckpt`` always holds a finite state; under
      DDP every rank reads all ranks' flags there and stops together.
    """

    automatic_optimization = False

    def __init__(self) -> None:
        super().__init__()
        self._bad: Tensor | None = None  # per-metric "was ever non-finite" flags (device)
        self._bad_step: Tensor | None = None  # first step at which any metric was non-finite (device)
        self._metric_names: list[str] = []
        self._last_log: tuple[int, float] | None = None  # (global_step, time) at the previous logging step
        self._rng_restored = False
        self._compiled = False
        self._loss_callers: dict[str, LossCaller] = {}  # use_functional_steps (compile: step)

    def save_init_args(self, init_locals: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> None:
        """Save this class's own ``__init__`` arguments (from ``locals()``) as ``hparams``.

        They are passed explicitly: ``save_hyperparameters()`` without arguments records, under LightningCLI,
        the config of the top-level model for every module built while it is instantiated, so the critic and
        behavior built inside IDQL would get IDQL's arguments."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self" and n not in ignore]
        self.save_hyperparameters({n: init_locals[n] for n in names})

    def updates_per_step(self) -> dict[str, int]:
        """Optimizer updates per ``training_step`` by kind ("critic", "actor"), for the ``perf/*`` rates."""
        return {}

    # ------------------------------------------------------------------------------------ updating
    @property
    def attached(self) -> bool:
        """Whether a Trainer runs this module (else its update functions run in a bare loop)."""
        try:
            return self.trainer is not None
        except RuntimeError:
            return False

    def plain_optimizers(self) -> list[torch.optim.Optimizer]:
        """The ``torch.optim`` optimizers of ``configure_optimizers``, in order (not Lightning's wrappers)."""
        opts = self.optimizers(use_pl_optimizer=False)
        return list(opts) if isinstance(opts, list | tuple) else [opts]

    def step_optimizer(self, opt: torch.optim.Optimizer, loss: Tensor) -> None:
        """One gradient step of ``opt`` on ``loss`` (Lightning's backward when attached: precision, DDP)."""
        opt.zero_grad(set_to_none=True)
        if self.attached:
            self.manual_backward(loss)
        else:
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def gradient_step(self, opt: torch.optim.Optimizer, loss_fn: Callable[..., Any], *args: Any,
                      lr: Tensor | None = None) -> Any:
        """One step of ``opt`` on the loss ``loss_fn(*args)`` (its first output if it returns a tuple); returns
        ``loss_fn``'s output. Eager: backward and ``opt.step()`` (:meth:`step_optimizer`). After
        :meth:`use_functional_steps` (``compile: step``): the same step as a function of tensors
        (:func:`~idql_pl.functional_step.functional_step_`, bit for bit the eager one), which ``torch.compile``
        traces without a graph break; ``lr`` then overrides the optimizer's."""
        if self._loss_callers:
            return functional_step_(opt, self._loss_callers[loss_fn.__func__.__name__], args, lr)
        out = loss_fn(*args)
        self.step_optimizer(opt, out[0] if isinstance(out, tuple) else out)
        return out

    def use_functional_steps(self, *loss_names: str) -> None:
        """Take :meth:`gradient_step`'s functional form for the losses ``loss_names`` (methods of this module)."""
        self._loss_callers = {name: LossCaller(self, name) for name in loss_names}

    def count_step(self) -> None:
        """Count one training step in Lightning (``global_step``, ``max_steps``, checkpoint and log cadence):
        a ``LightningOptimizer.step()`` while every gradient is None, which updates no parameter."""
        opts = self.optimizers()
        (opts[0] if isinstance(opts, list | tuple) else opts).step()

    # ------------------------------------------------------------------------------- torch.compile
    def compile_losses(self) -> None:
        """Wrap the training-loss functions in ``torch.compile`` (forward and backward, via AOTAutograd);
        done once when the module's ``compile`` option is set. Idempotent."""
        if not self._compiled:
            self._compile_losses()
            self._compiled = True

    def _compile_losses(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.attached:
            error = precision_error(self.trainer.precision)  # e.g. 16-mixed on a GPU (the CLI refuses it earlier)
            if error:
                raise ConfigError(error)
        if stage == "fit" and self.hparams.get("compile", False) in (True, "losses"):
            self.compile_losses()

    def on_fit_start(self) -> None:
        rank, world = distributed_world()
        if world > 1 and not self._rng_restored:
            seed_rank_stream(rank)

    # ------------------------------------------------------------------------------ losses and logs
    def track_losses(self, metrics: dict[str, Tensor]) -> None:
        """Accumulate the finiteness of ``metrics`` on device; log and check only on logging steps."""
        if not metrics:
            return
        values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()])
        bad_now = ~torch.isfinite(values)
        if self._bad is None or self._metric_names != list(metrics):
            self._metric_names = list(metrics)
            self._bad = torch.zeros_like(bad_now)
            self._bad_step = torch.full((), torch.iinfo(torch.int64).max, device=values.device)
        step = self.global_step + 1  # this training step's number (it is counted at its end)
        self._bad_step = torch.where(bad_now.any() & ~self._bad.any(), step, self._bad_step)
        self._bad |= bad_now
        if self.attached and step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log_dict({**metrics, **self._throughput()})
            self.raise_if_nonfinite()

    def _throughput(self) -> dict[str, float]:
        """``perf/<kind>_steps_per_s`` since the previous logging step (host clock; logging steps sync anyway)."""
        now, rates = time.perf_counter(), {}
        if self._last_log is not None:
            steps, seconds = self.global_step - self._last_log[0], now - self._last_log[1]
            if steps > 0 and seconds > 0:
                rates = {f"perf/{k}_steps_per_s": n * steps / seconds for k, n in self.updates_per_step().items() if n}
        self._last_log = (self.global_step, now)
        return rates

    def raise_if_nonfinite(self) -> None:
        """Stop the run, naming the loss and the first bad step, before anything is saved. One host sync.

        Under DDP the decision is collective: the flags and first bad steps of all ranks are combined by one
        all-reduce (max of the flags and of minus the step), so every rank raises the same error at the same
        point, even when only one rank saw a NaN in its batches (a rank raising alone would leave the others
        waiting in their next collective). Every rank calls this at the same points (logging steps and
        checkpoint saves) after the same training steps with the same metrics, so the all-reduce matches."""
        if self._bad is None or self._bad_step is None:
            return  # no losses tracked yet (on every rank: all run the same steps)
        packed = torch.cat([self._bad.long(), -self._bad_step.reshape(1).long()])
        if distributed_world()[1] > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        *flags, neg_step = packed.tolist()
        names = [n for n, b in zip(self._metric_names, flags) if b]
        if not names:
            return
        raise NonFiniteLossError(
            f"non-finite {', '.join(names)} at step {-neg_step}: training stopped and last.ckpt keeps the"
            " last finite state; check the dataset for NaN/inf (rewards, observations) or lower the learning rate"
        )

    # ---------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.raise_if_nonfinite()  # the save fails, so the last checkpoint on disk keeps the last finite state
        states = gather_from_ranks(capture_rng_state())  # every rank builds the checkpoint; rank 0 writes it
        checkpoint["idql_rng"] = states[0]
        if len(states) > 1:
            checkpoint["idql_rng_per_rank"] = states
        checkpoint["idql_dims"] = {"obs_dim": int(self.hparams.obs_dim), "action_dim": int(self.hparams.action_dim)}

    def _add_agent_dim_to_optimizer_states(self, checkpoint: dict[str, Any]) -> None:
        """A resumed single-agent checkpoint from before agents existed: its Adam moments get the parameters'
        leading agent dimension of 1 too (the optimizers' parameter order is ``configure_optimizers``')."""
        saved = checkpoint.get("optimizer_states")
        if not saved or not self.attached:
            return
        config = self.configure_optimizers()
        if isinstance(config, dict):
            opts = [config["optimizer"]]
        elif isinstance(config, tuple) and len(config) == 2 and isinstance(config[0], list):
            opts = list(config[0])
        else:
            opts = list(config) if isinstance(config, list | tuple) else [config]
        for opt, opt_state in zip(opts, saved):
            params = [p for group in opt.param_groups for p in group["params"]]
            for index, entry in opt_state.get("state", {}).items():
                if int(index) >= len(params):
                    continue
                for name, value in entry.items():
                    if isinstance(value, Tensor) and lacks_agent_dim(value, params[int(index)]):
                        entry[name] = value.unsqueeze(0)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        error = dims_mismatch(checkpoint.get("idql_dims"), int(self.hparams.obs_dim), int(self.hparams.action_dim),
                              "checkpoint", "this dataset")
        if error:
            raise CheckpointError(error)
        if add_agent_dim(checkpoint["state_dict"], self.state_dict()):  # written before networks had agents
            self._add_agent_dim_to_optimizer_states(checkpoint)
        own = own_rank_entry(checkpoint.get("idql_rng_per_rank"))
        if own is not None:
            restore_rng_state(own)
        elif "idql_rng" in checkpoint:  # world size 1, or another one: rank 0's state, then own streams
            restore_rng_state(checkpoint["idql_rng"])
            seed_rank_stream(distributed_world()[0])
        self._rng_restored = "idql_rng" in checkpoint

"""Base class of the three IDQL LightningModules: manual optimization, exact resume, non-finite guard."""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor

from idql_pl.errors import CheckpointError, NonFiniteLossError
from idql_pl.rng import (
    capture_rng_state,
    distributed_world,
    gather_from_ranks,
    own_rank_entry,
    restore_rng_state,
    seed_rank_stream,
)


class IDQLModule(L.LightningModule):
    """Shared plumbing; subclasses set ``hparams.obs_dim``/``hparams.action_dim`` and call :meth:`track_losses`.

    - Checkpoints carry the global RNG states (dropout and diffusion noise continue identically after a
      resume; one per rank under DDP, where each rank draws its own stream) and are refused when their
      obs/action dimensions differ from the data's.
    - Under DDP, ``find_unused_parameters`` is switched on: every training step runs several backward passes
      over disjoint parameter sets (V, Q, the score network), each through DDP's gradient reducer.
    - Losses are checked for NaN/inf without a host sync per step: a device-side flag accumulates and is read
      only on logging steps and before every checkpoint save, so ``last.ckpt`` always holds a finite state.
    """

    automatic_optimization = False

    def __init__(self) -> None:
        super().__init__()
        self._bad: Tensor | None = None  # per-metric "was ever non-finite" flags (device)
        self._bad_step: Tensor | None = None  # first step at which any metric was non-finite (device)
        self._metric_names: list[str] = []
        self._last_log: tuple[int, float] | None = None  # (global_step, time) at the previous logging step
        self._rng_restored = False

    def updates_per_step(self) -> dict[str, int]:
        """Optimizer updates per ``training_step`` by kind ("critic", "actor"), for the ``perf/*`` rates."""
        return {}

    # ------------------------------------------------------------------------------- torch.compile
    def compile_losses(self) -> None:
        """Wrap the training-loss functions in ``torch.compile`` (forward and backward, via AOTAutograd);
        called once before ``fit`` when the module's ``compile`` option is set. Idempotent."""
        if getattr(self, "_losses_compiled", False):
            return
        self._compile_losses()
        self._losses_compiled = True

    def _compile_losses(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DDPStrategy):  # read when the model is wrapped, after this hook
            strategy._ddp_kwargs["find_unused_parameters"] = True
        if stage == "fit" and self.hparams.get("compile", False):
            self.compile_losses()

    def on_fit_start(self) -> None:
        rank, world = distributed_world()
        if world > 1 and not self._rng_restored:
            seed_rank_stream(rank)

    def save_hyperparameters(self, *args: Any, ignore: Sequence[str] | str | None = None, frame: Any = None,
                             logger: bool = True) -> None:
        """Like Lightning's, but a module built *inside* another one (IDQL's injected critic/behavior) records
        its own arguments: LightningCLI exposes the top-level model's config to every module built while it
        is instantiated, which would otherwise become the children's hparams too."""
        frame = frame or inspect.currentframe().f_back
        given = _given_hyperparameters.get()
        token = None if given is None or _is_class(given.get("_class_path"), type(self)) else _given_hyperparameters.set(None)
        try:
            super().save_hyperparameters(*args, ignore=ignore, frame=frame, logger=logger)
        finally:
            if token is not None:
                _given_hyperparameters.reset(token)

    # ------------------------------------------------------------------------------ losses and logs
    def track_losses(self, metrics: dict[str, Tensor]) -> None:
        """Accumulate the finiteness of ``metrics`` on device; log/check only when Lightning logs or saves."""
        if not metrics:
            return
        values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()])
        bad_now = ~torch.isfinite(values)
        if self._bad is None or self._metric_names != list(metrics):
            self._metric_names = list(metrics)
            self._bad = torch.zeros_like(bad_now)
            self._bad_step = torch.full((), torch.iinfo(torch.int64).max, device=values.device)
        self._bad_step = torch.where(bad_now.any() & ~self._bad.any(), self.global_step, self._bad_step)
        self._bad |= bad_now
        if self._trainer is None:
            return
        if self.trainer._logger_connector.should_update_logs:
            self.log_dict({**metrics, **self._throughput()})
            self.raise_if_nonfinite()
        elif self._checkpoint_due():
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
        """One host sync: stop the run, naming the loss and the first bad step, before anything is saved."""
        if self._bad is None or not bool(self._bad.any()):
            return
        names = [n for n, b in zip(self._metric_names, self._bad.tolist()) if b]
        raise NonFiniteLossError(
            f"non-finite {', '.join(names)} at step {int(self._bad_step)}: training stopped and last.ckpt keeps the"
            " last finite state; check the dataset for NaN/inf (rewards, observations) or lower the learning rate"
        )

    def _checkpoint_due(self) -> bool:
        step = self.global_step
        for cb in self.trainer.checkpoint_callbacks:
            every = getattr(cb, "_every_n_train_steps", 0)
            if every and step % every == 0:
                return True
        return step >= self.trainer.max_steps > 0

    # ---------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.raise_if_nonfinite()
        states = gather_from_ranks(capture_rng_state())  # every rank builds the checkpoint; rank 0 writes it
        checkpoint["idql_rng"] = states[0]
        if len(states) > 1:
            checkpoint["idql_rng_per_rank"] = states
        checkpoint["idql_dims"] = {"obs_dim": int(self.hparams.obs_dim), "action_dim": int(self.hparams.action_dim)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        dims = checkpoint.get("idql_dims")
        ours = {"obs_dim": int(self.hparams.obs_dim), "action_dim": int(self.hparams.action_dim)}
        if dims is not None and dims != ours:
            raise CheckpointError(
                f"checkpoint was trained with obs_dim={dims['obs_dim']}, action_dim={dims['action_dim']} but this"
                f" dataset has obs_dim={ours['obs_dim']}, action_dim={ours['action_dim']}: use a checkpoint from"
                " the same environment, or drop --ckpt_path"
            )
        own = own_rank_entry(checkpoint.get("idql_rng_per_rank"))
        if own is not None:
            restore_rng_state(own)
        elif "idql_rng" in checkpoint:  # world size 1, or another one: rank 0's state, then own streams
            restore_rng_state(checkpoint["idql_rng"])
            seed_rank_stream(distributed_world()[0])
        self._rng_restored = "idql_rng" in checkpoint


def _is_class(class_path: str | None, cls: type) -> bool:
    if not class_path or "." not in class_path:
        return False
    module, name = class_path.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(module), name, None) is cls
    except ImportError:
        return False

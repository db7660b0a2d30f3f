"""Base class of the project's LightningModules: one training iteration per step (eager or compiled), one
counted step per iteration, exact resume, the dimension check and the non-finite guard."""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from idql_pl.algorithm.steps import EagerStep, FunctionalStep, lr_tensor, prepare_functional_adam
from idql_pl.errors import CheckpointError, ConfigError, NonFiniteLossError
from idql_pl.training.precision import precision_error
from idql_pl.training.rng import (
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


def dims_mismatch(saved: Mapping[str, int] | None, obs_dim: int, action_dim: int, what: str,
                  data: str) -> str | None:
    """The one-line error for a checkpoint (``what``) whose saved obs/action dims differ from the data's."""
    if saved is None or dict(saved) == {"obs_dim": obs_dim, "action_dim": action_dim}:
        return None
    return (f"{what} was trained with obs_dim={saved['obs_dim']}, action_dim={saved['action_dim']} but {data}"
            f" has obs_dim={obs_dim}, action_dim={action_dim}: use a checkpoint from the same environment, or"
            " drop --ckpt_path")


def check_sizes(obs_dim: int, action_dim: int, num_agents: int = 1) -> None:
    """One-line errors for a data dimension or an agent count below 1."""
    if obs_dim < 1 or action_dim < 1:
        raise ConfigError(f"obs_dim and action_dim must be >= 1 (got {obs_dim}, {action_dim})")
    if not isinstance(num_agents, int) or num_agents < 1:
        raise ConfigError(f"num_agents must be an integer >= 1 (got {num_agents!r})")


def class_path(cls: type) -> str:
    """``idql_pl.IDQL`` for a class the package exports, else ``module.Class``: saved in a checkpoint's
    hyperparameters as ``_class_path``, which LightningCLI reads when a run is given ``--ckpt_path`` (without
    it, the saved arguments of an IQL or a behavior model were parsed as IDQL's)."""
    import idql_pl

    exported = cls.__name__ in idql_pl.__all__ and getattr(idql_pl, cls.__name__) is cls
    return f"idql_pl.{cls.__name__}" if exported else f"{cls.__module__}.{cls.__qualname__}"


class IDQLModule(L.LightningModule):
    """Shared plumbing; subclasses set ``hparams.obs_dim``/``hparams.action_dim`` (via
    :meth:`save_init_args`).

    - A ``training_step`` draws its batches, runs one training iteration (:meth:`run`: Algorithm 1,
      :func:`~idql_pl.algorithm.iteration.algorithm1_iteration`, or a baseline's) on plain ``torch.optim``
      optimizers, eager or compiled into one graph (``compile: true``), and counts one Lightning step
      (:meth:`count_step`): ``trainer.global_step`` and ``max_steps`` count iterations (critic steps for
      IDQL).
    - Checkpoints carry the global RNG states (dropout and diffusion noise continue identically after a
      resume; one per rank under DDP, where each rank draws its own stream) and are refused when their
      obs/action dimensions differ from the data's.
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
        self.eager_step = EagerStep(self)  # the reference gradient step
        self._compiled: Callable[..., dict[str, Tensor]] | None = None  # compile: true (compile_training)
        self._functional_ready = False
        self._lrs: Tensor | None = None  # compiled: the scheduled LRs of one iteration

    def save_init_args(self, init_locals: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> None:
        """Save this class's own ``__init__`` arguments (from ``locals()``) and its :func:`class_path` as
        ``hparams``.

        They are passed explicitly: ``save_hyperparameters()`` without arguments records, under LightningCLI,
        the config of the top-level model for every module built while it is instantiated, so the critic and
        behavior built inside IDQL would get IDQL's arguments."""
        names = [n for n in inspect.signature(type(self).__init__).parameters
                 if n != "self" and n not in ignore]
        self.save_hyperparameters({"_class_path": class_path(type(self)),
                                   **{n: init_locals[n] for n in names}})

    def updates_per_step(self) -> dict[str, int]:
        """Optimizer updates per ``training_step`` by kind ("critic", "actor"), for the ``perf/*`` rates."""
        return {}

    # ------------------------------------------------------------------------------------ updating
    @property
    def attached(self) -> bool:
        """Whether a Trainer runs this module (else its training iterations run in a bare loop)."""
        try:
            return self.trainer is not None
        except RuntimeError:
            return False

    def plain_optimizers(self) -> list[torch.optim.Optimizer]:
        """The ``torch.optim`` optimizers of ``configure_optimizers``, in order (not Lightning's wrappers)."""
        opts = self.optimizers(use_pl_optimizer=False)
        return list(opts) if isinstance(opts, list | tuple) else [opts]

    def run(self, iteration: Callable[..., dict[str, Tensor]], *args: Any) -> dict[str, Tensor]:
        """One training iteration: ``iteration(*args, step)``
        (e.g. :func:`~idql_pl.algorithm.iteration.algorithm1_iteration`), with eager gradient steps, or, after
        :meth:`compile_training` (``compile: true``), compiled into one graph with functional ones
        (:mod:`idql_pl.algorithm.steps`). Optimizers are found in ``args`` (named tuples)."""
        if self._compiled is None:
            return iteration(*args, self.eager_step)
        if not self._functional_ready:  # once the optimizers (and a resumed run's states) exist
            for opt in (o for arg in args if isinstance(arg, tuple) for o in arg):
                if isinstance(opt, torch.optim.Optimizer):
                    prepare_functional_adam(opt)
            self._functional_ready = True
        return self._compiled(iteration, *args)

    def compile_training(self) -> None:
        """``compile: true``: each iteration :meth:`run` runs becomes one ``torch.compile(fullgraph=True)``
        graph (every update of a training step, every agent), with ``compile_mode`` (e.g. "reduce-overhead":
        CUDA graphs) passed on. Idempotent."""
        if self._compiled is not None:
            return
        step = FunctionalStep(self)  # built outside the graph

        def functional(iteration: Callable[..., dict[str, Tensor]], *args: Any) -> dict[str, Tensor]:
            return iteration(*args, step)

        self._compiled = torch.compile(functional, fullgraph=True, dynamic=False,  # shapes are fixed
                                       mode=self.hparams.get("compile_mode"))

    def scheduled_lrs(self, scheduler: LRScheduler | None, steps: int) -> list[float] | Tensor:
        """The learning rates of ``scheduler``'s next ``steps`` optimizer steps (what it would set before
        each), as floats; compiled, written into one static tensor on the device (no recompile, no host
        sync)."""
        if scheduler is None:
            return [None] * steps
        (base,), (multiplier,) = scheduler.base_lrs, scheduler.lr_lambdas
        lrs = [base * multiplier(scheduler.last_epoch + i) for i in range(steps)]
        if self._compiled is None:
            return lrs
        if self._lrs is None or len(self._lrs) != steps:
            self._lrs = lr_tensor([0.0] * steps, self.device)
            torch._dynamo.mark_static_address(self._lrs)  # one address for CUDA graphs to capture
        for i, lr in enumerate(lrs):
            self._lrs[i].fill_(lr)
        return self._lrs

    @staticmethod
    def advance(scheduler: LRScheduler | None, steps: int) -> None:
        """Step ``scheduler`` past the ``steps`` optimizer steps :meth:`scheduled_lrs` gave LRs for."""
        if scheduler is None:
            return
        # compiled, the functional Adam stepped and the scheduler cannot see it
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step",
                                    category=UserWarning)
            for _ in range(steps):
                scheduler.step()

    def count_step(self) -> None:
        """Count one training step in Lightning (``global_step``, ``max_steps``, checkpoint and log cadence):
        a ``LightningOptimizer.step()`` while every gradient is None, which updates no parameter. A training
        step makes several updates (IDQL: two behavior steps, V, Q), so Lightning's own count, one per
        ``LightningOptimizer.step()``, would count updates rather than iterations."""
        opts = self.optimizers()
        (opts[0] if isinstance(opts, list | tuple) else opts).step()

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.attached:
            # e.g. 16-mixed on a GPU (the CLI refuses it earlier)
            error = precision_error(self.trainer.precision)
            if error:
                raise ConfigError(error)
        if stage == "fit" and self.hparams.get("compile", False):
            if self.attached and self.trainer.world_size > 1:
                raise ConfigError("compile: true takes its gradients outside Lightning's backward, so it runs"
                                  " on one device: drop --model.compile, or use --trainer.devices 1")
            self.compile_training()

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
        """``perf/<kind>_steps_per_s`` since the previous logging step (host clock; logging steps sync
        anyway)."""
        now, rates = time.perf_counter(), {}
        if self._last_log is not None:
            steps, seconds = self.global_step - self._last_log[0], now - self._last_log[1]
            if steps > 0 and seconds > 0:
                rates = {f"perf/{k}_steps_per_s": n * steps / seconds
                         for k, n in self.updates_per_step().items() if n}
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
            " last finite state; check the dataset for NaN/inf (rewards, observations) or lower the"
            " learning rate"
        )

    # ---------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the save fails, so the last checkpoint on disk keeps the last finite state
        self.raise_if_nonfinite()
        states = gather_from_ranks(capture_rng_state())  # every rank builds the checkpoint; rank 0 writes it
        checkpoint["idql_rng"] = states[0]
        if len(states) > 1:
            checkpoint["idql_rng_per_rank"] = states
        checkpoint["idql_dims"] = {"obs_dim": int(self.hparams.obs_dim),
                                   "action_dim": int(self.hparams.action_dim)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        error = dims_mismatch(checkpoint.get("idql_dims"), int(self.hparams.obs_dim),
                              int(self.hparams.action_dim), "checkpoint", "this dataset")
        if error:
            raise CheckpointError(error)
        own = own_rank_entry(checkpoint.get("idql_rng_per_rank"))
        if own is not None:
            restore_rng_state(own)
        elif "idql_rng" in checkpoint:  # world size 1, or another one: rank 0's state, then own streams
            restore_rng_state(checkpoint["idql_rng"])
            seed_rank_stream(distributed_world()[0])
        self._rng_restored = "idql_rng" in checkpoint

"""IDQL: the generalized-IQL critic and the diffusion behavior policy, trained jointly (paper Alg. 1-2)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

from idql_pl.behavior import DiffusionBehavior
from idql_pl.checkpointing import load_submodule_state
from idql_pl.critic import ImplicitCritic
from idql_pl.data.buffer import Batch, TransitionBuffer
from idql_pl.errors import ConfigError
from idql_pl.functional_step import lr_tensor, prepare_functional_adam
from idql_pl.module import IDQLModule
from idql_pl.sampler import Extraction, check_extraction, extract_actions

CriticFactory = Callable[[int, int], ImplicitCritic]
BehaviorFactory = Callable[[int, int], DiffusionBehavior]


def algorithm1_iteration(behavior: DiffusionBehavior, critic: ImplicitCritic, actor_batches: list[Batch],
                         critic_batch: Batch | None, opts: list[torch.optim.Optimizer],
                         scheduler: LambdaLR | None = None, actor_lrs: Tensor | None = None) -> dict[str, Tensor]:
    """Algorithm 1, one iteration: a behavior step (Eq. 4, then the EMA) per actor batch, then the critic step
    (V, then Q with the new V, then the target) on ``critic_batch`` (IDQL_SPEC Sec. 1, 3, 6). ``opts``: the
    behavior optimizer (when ``actor_batches``), then V's and Q's. ``actor_lrs`` (``compile: step``): the
    behavior steps' learning rates, in place of ``scheduler``. Offline IDQL and online finetuning both run it.
    Returns the detached metrics (no host sync)."""
    opts = list(opts)
    metrics: dict[str, Tensor] = {}
    if actor_batches:
        actor_opt = opts.pop(0)
        for i, batch in enumerate(actor_batches):
            out = behavior.update(batch, actor_opt, scheduler, lr=None if actor_lrs is None else actor_lrs[i])
        metrics.update({f"train/behavior/{k}": v for k, v in out.items()})
    if critic_batch is not None:
        out = critic.update(critic_batch, *opts)
        metrics.update({f"train/critic/{k}": v for k, v in out.items()})
    return metrics


class IDQL(IDQLModule):
    """IDQL (paper Alg. 1 for training, Alg. 2 for acting). One ``training_step`` is one iteration of
    Algorithm 1: ``actor_updates_per_step`` behavior steps (batch 1024 each), then one critic step (batch 256:
    V, Q, target), the paper's schedule of two actor steps per critic step (IDQL_SPEC Sec. 6).

    ``trainer.global_step`` (and ``max_steps``) count these iterations, i.e. *critic steps*
    (:meth:`IDQLModule.count_step`); actor steps are ``actor_updates_per_step * global_step``. The paper's
    1.5M critic / 3M actor run is ``max_steps=1_500_000``.

    ``critic``/``behavior`` are injected from the config (``class_path`` + ``init_args``, without the
    dimensions, which come from the data). ``behavior_ckpt``/``critic_ckpt`` load a pretrained half (from a
    standalone or a joint checkpoint); ``freeze_*`` then stops training it, so a sweep over tau reuses one
    diffusion model. ``compile: true`` (or ``losses``, or either half's own ``compile``) runs the training
    losses through ``torch.compile`` under ``fit``; ``compile: step`` compiles the whole iteration (every
    behavior step and the critic step) into one graph (:meth:`compile_iteration`), with ``compile_mode`` passed
    to ``torch.compile`` ("reduce-overhead": CUDA graphs on a GPU).

    ``num_agents`` (K, default 1): K independent IDQL agents trained as one model (``--model.num_agents 3``
    trains seeds ``seed .. seed + 2`` in one process). It is passed to both halves (a half's own
    ``num_agents`` is overridden); every iteration draws ``[K, B, ...]`` batches, agent ``k``'s rows from its
    own generator (``TransitionBuffer.sample(B, K)``), and :meth:`act` acts for all agents: ``[K, B, A]``.
    ``K = 1`` is the single run, bit for bit.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        critic: CriticFactory = ImplicitCritic,
        behavior: BehaviorFactory = DiffusionBehavior,
        actor_updates_per_step: int = 2,
        num_samples: int | list[int] = 128,
        extraction: Extraction = "argmax",
        behavior_ckpt: str | None = None,
        freeze_behavior: bool = False,
        critic_ckpt: str | None = None,
        freeze_critic: bool = False,
        compile: bool | Literal["losses", "step"] = False,  # noqa: A002 - the option's name on the command line
        compile_mode: str | None = None,
        num_agents: int = 1,
    ):
        super().__init__()
        check_extraction(extraction, num_samples, num_agents)
        if compile not in (False, True, "losses", "step"):
            raise ConfigError(f"compile must be false, true (= losses) or step (got {compile!r})")
        if not isinstance(num_agents, int) or num_agents < 1:
            raise ConfigError(f"num_agents must be an integer >= 1 (got {num_agents!r})")
        if actor_updates_per_step < 0:
            raise ConfigError(f"actor_updates_per_step must be >= 0 (got {actor_updates_per_step}); the paper uses 2")
        if freeze_behavior and freeze_critic:
            raise ConfigError("freeze_behavior and freeze_critic are both set: nothing would train; unset one")
        self.save_init_args(locals(), ignore=("critic", "behavior"))
        self.critic = critic(obs_dim, action_dim, num_agents=num_agents)
        self.behavior = behavior(obs_dim, action_dim, num_agents=num_agents)
        if behavior_ckpt:
            load_submodule_state(self.behavior, behavior_ckpt, prefix="behavior.")
        if critic_ckpt:
            load_submodule_state(self.critic, critic_ckpt, prefix="critic.")
        self.train_behavior = not freeze_behavior and actor_updates_per_step > 0
        self.train_critic = not freeze_critic
        for module, trained in ((self.behavior, self.train_behavior), (self.critic, self.train_critic)):
            module.requires_grad_(trained)
        self._compiled_iteration: Callable[..., dict[str, Tensor]] | None = None
        self._lrs: Tensor | None = None  # compile: step's behavior LRs of one iteration
        self._adam_state_ready = False

    def setup(self, stage: str) -> None:
        super().setup(stage)  # the precision check; IDQL's compile: true (= losses) compiles both halves' losses
        if stage != "fit":
            return
        if self.hparams.compile == "step":
            if self.attached and self.trainer.world_size > 1:
                raise ConfigError("compile: step takes its gradients outside Lightning's backward, so it runs on one"
                                  " device: drop --model.compile step, or use --trainer.devices 1")
            self.compile_iteration()
            return
        for half in (self.critic, self.behavior):  # each half's own compile option, that half
            if half.hparams.get("compile", False):
                half.compile_losses()

    def compile_iteration(self) -> None:
        """``compile: step``: the whole :meth:`iteration` (all behavior steps and the critic step, every agent)
        as one ``torch.compile(fullgraph=True)`` graph: gradients by ``torch.func``, Adam by its functional form
        on the optimizers' own state (:mod:`idql_pl.functional_step`). Idempotent."""
        if self._compiled_iteration is not None:
            return
        self.critic.use_functional_steps("v_loss", "q_loss")
        self.behavior.use_functional_steps("loss")
        self._compiled_iteration = torch.compile(self.iteration, fullgraph=True, dynamic=False,  # shapes are fixed
                                                 mode=self.hparams.compile_mode)

    def _compile_losses(self) -> None:
        self.critic.compile_losses()
        self.behavior.compile_losses()

    @property
    def num_agents(self) -> int:
        return int(self.hparams.get("num_agents", 1))

    def updates_per_step(self) -> dict[str, int]:
        return {"critic": int(self.train_critic), "actor": self.hparams.actor_updates_per_step * int(self.train_behavior)}

    # ----------------------------------------------------------------------------------------- optim
    def configure_optimizers(self) -> Any:
        optimizers, schedulers = [], []
        if self.train_behavior:
            total = self.behavior.hparams.lr_decay_steps or max(1, self.trainer.max_steps) * self.hparams.actor_updates_per_step
            opt, sched = self.behavior.make_optimizer(total)
            optimizers.append(opt)
            schedulers.append({"scheduler": sched, "interval": "step"})
        if self.train_critic:
            optimizers.extend(self.critic.configure_optimizers())
        return optimizers, schedulers

    # -------------------------------------------------------------------------------------- training
    def training_step(self, buffer: TransitionBuffer, batch_idx: int) -> None:
        """One iteration of Algorithm 1 for every agent (:meth:`train_iteration`), its losses tracked."""
        opts = self.plain_optimizers()
        self.track_losses(self.train_iteration(buffer, opts, self.lr_schedulers() if self.train_behavior else None))
        self.count_step()

    def train_iteration(self, buffer: TransitionBuffer, opts: list[torch.optim.Optimizer],
                        scheduler: LambdaLR | None) -> dict[str, Tensor]:
        """Draw this iteration's ``[K, B, ...]`` batches by index, then run :meth:`iteration` on them, compiled
        after :meth:`compile_iteration`, eager otherwise. Returns the detached metrics."""
        agents, hp = self.num_agents, self.hparams
        actor_batches = [buffer.sample(self.behavior.hparams.batch_size, agents)
                         for _ in range(hp.actor_updates_per_step if self.train_behavior else 0)]
        critic_batch = buffer.sample(self.critic.hparams.batch_size, agents) if self.train_critic else None
        if self._compiled_iteration is None:
            return self.iteration(actor_batches, critic_batch, opts, scheduler)
        if not self._adam_state_ready:  # once, after a resumed run's optimizer states are loaded
            for opt in opts:
                prepare_functional_adam(opt)
            self._adam_state_ready = True
        metrics = self._compiled_iteration(actor_batches, critic_batch, opts, None, self._actor_lrs(scheduler))
        with warnings.catch_warnings():  # the functional Adam stepped; the scheduler cannot see it
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            for _ in actor_batches:
                scheduler.step()
        return metrics

    def iteration(self, actor_batches: list[Batch], critic_batch: Batch | None, opts: list[torch.optim.Optimizer],
                  scheduler: LambdaLR | None = None, actor_lrs: Tensor | None = None) -> dict[str, Tensor]:
        """:func:`algorithm1_iteration` on this model's halves (what ``compile: step`` compiles)."""
        return algorithm1_iteration(self.behavior, self.critic, actor_batches, critic_batch, opts, scheduler, actor_lrs)

    def _actor_lrs(self, scheduler: LambdaLR | None) -> Tensor | None:
        """The LRs of this iteration's behavior steps (the schedule's next values), written into one tensor on
        the model's device with ``fill_`` (a kernel each, no host sync)."""
        if scheduler is None:
            return None
        if self._lrs is None:
            self._lrs = lr_tensor([0.0] * self.hparams.actor_updates_per_step, self.device)
            torch._dynamo.mark_static_address(self._lrs)  # one address for CUDA graphs to capture
        (base,), (multiplier,) = scheduler.base_lrs, scheduler.lr_lambdas
        for i in range(self.hparams.actor_updates_per_step):
            self._lrs[i].fill_(base * multiplier(scheduler.last_epoch + i))
        return self._lrs

    def validation_step(self, buffer: TransitionBuffer, batch_idx: int) -> None:
        """Held-out (or training-set) losses on a fixed batch; nothing is updated."""
        metrics = {}
        metrics.update({f"val/critic/{k}": v for k, v in self.critic.validation_losses(buffer).items()})
        metrics.update({f"val/behavior/{k}": v for k, v in self.behavior.validation_losses(buffer).items()})
        self.log_dict(metrics, batch_size=1, sync_dist=True)

    # ------------------------------------------------------------------------------------------- act
    @torch.no_grad()
    def act(
        self,
        states: Tensor,
        num_samples: int | list[int] | None = None,
        extraction: Extraction | None = None,
        generator: torch.Generator | None = None,
        precision: str = "auto",
    ) -> Tensor:
        """Extracted actions of every agent (paper Alg. 2): argmax or implicit resampling;
        ``states [K, B, S]`` or ``[B, S]`` (the same states for every agent) ``-> [K, B, A]``."""
        return extract_actions(
            self.behavior,
            self.critic,
            states,
            num_samples=num_samples or self.hparams.num_samples,
            extraction=extraction or self.hparams.extraction,
            value_loss=self.critic.hparams.value_loss,
            loss_param=self.critic.loss_param,
            generator=generator,
            precision=precision,
        )

"""IDQL: the generalized-IQL critic and the diffusion behavior policy, trained jointly (paper Alg. 1-2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from idql_pl.algorithm.extraction import Extraction, check_extraction, extract_actions
from idql_pl.algorithm.iteration import IDQLOptimizers, algorithm1_iteration
from idql_pl.data.buffer import TransitionBuffer
from idql_pl.errors import ConfigError
from idql_pl.models.base import IDQLModule, check_sizes
from idql_pl.models.behavior import DiffusionBehavior
from idql_pl.models.critic import ImplicitCritic
from idql_pl.training.checkpointing import load_submodule_state

CriticFactory = Callable[[int, int], ImplicitCritic]
BehaviorFactory = Callable[[int, int], DiffusionBehavior]


class IDQL(IDQLModule):
    """IDQL (paper Alg. 1 for training, Alg. 2 for acting). One ``training_step`` is one iteration of
    Algorithm 1: ``actor_updates_per_step`` behavior steps (batch 1024 each), then one critic step (batch 256:
    V, Q, target), the paper's schedule of two actor steps per critic step (docs/fidelity.md §6).

    ``trainer.global_step`` (and ``max_steps``) count these iterations, i.e. *critic steps*
    (:meth:`IDQLModule.count_step`); actor steps are ``actor_updates_per_step * global_step``. The paper's
    1.5M critic / 3M actor run is ``max_steps=1_500_000``.

    ``critic``/``behavior`` are injected from the config (``class_path`` + ``init_args``, without the
    dimensions, which come from the data). ``behavior_ckpt``/``critic_ckpt`` load a pretrained half (from a
    standalone or a joint checkpoint); ``freeze_*`` then stops training it, so a sweep over tau reuses one
    diffusion model. ``compile: true`` compiles the whole iteration (every behavior step and the critic step,
    every agent) into one graph (:meth:`~idql_pl.models.base.IDQLModule.compile_training`), with
    ``compile_mode`` passed to ``torch.compile`` ("reduce-overhead": CUDA graphs on a GPU); the halves' own
    ``compile`` options apply only when a half is trained alone.

    ``num_agents`` (K, default 1): K independent IDQL agents trained as one model (``--model.num_agents 3``
    trains seeds ``seed .. seed + 2`` in one process). It is passed to both halves (a half's own
    ``num_agents`` is overridden); every iteration draws ``[K, B, ...]`` batches, agent ``k``'s rows from its
    own generator (``TransitionBuffer.sample(B, K)``), and :meth:`act` acts for all agents: ``[K, B, A]``.
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
        compile: bool = False,  # noqa: A002 - the option's name on the command line
        compile_mode: str | None = None,
        num_agents: int = 1,
    ):
        super().__init__()
        check_extraction(extraction, num_samples, num_agents)
        check_sizes(obs_dim, action_dim, num_agents)
        if actor_updates_per_step < 0:
            raise ConfigError(f"actor_updates_per_step must be >= 0 (got {actor_updates_per_step});"
                              " the paper uses 2")
        if freeze_behavior and freeze_critic:
            raise ConfigError("freeze_behavior and freeze_critic are both set:"
                              " nothing would train; unset one")
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

    @property
    def num_agents(self) -> int:
        return int(self.hparams.get("num_agents", 1))

    def updates_per_step(self) -> dict[str, int]:
        return {"critic": int(self.train_critic),
                "actor": self.hparams.actor_updates_per_step * int(self.train_behavior)}

    # ----------------------------------------------------------------------------------------- optim
    def configure_optimizers(self) -> Any:
        """The behavior's AdamW with its cosine schedule over ``actor_updates_per_step * max_steps`` actor
        steps (when it trains), then the critic's V and Q Adams (when it trains)."""
        optimizers, schedulers = [], []
        if self.train_behavior:
            total = (self.behavior.hparams.lr_decay_steps
                     or max(1, self.trainer.max_steps) * self.hparams.actor_updates_per_step)
            opt, sched = self.behavior.make_optimizer(total)
            optimizers.append(opt)
            schedulers.append({"scheduler": sched, "interval": "step"})
        if self.train_critic:
            optimizers.extend(self.critic.configure_optimizers())
        return optimizers, schedulers

    def named_optimizers(self) -> IDQLOptimizers:
        """``configure_optimizers``' optimizers, named for what they step."""
        opts = self.plain_optimizers()
        behavior = opts.pop(0) if self.train_behavior else None
        value, q = opts if self.train_critic else (None, None)
        return IDQLOptimizers(behavior, value, q)

    # -------------------------------------------------------------------------------------- training
    def training_step(self, buffer: TransitionBuffer, batch_idx: int) -> None:
        """One iteration of Algorithm 1 for every agent (:meth:`update`)."""
        self.track_losses(self.update(buffer, self.named_optimizers(),
                                      self.lr_schedulers() if self.train_behavior else None))
        self.count_step()  # Lightning's global_step + 1: one iteration, i.e. one critic step

    def update(self, buffer: TransitionBuffer, opt: IDQLOptimizers, scheduler: LRScheduler | None
               ) -> dict[str, Tensor]:
        """One iteration of Algorithm 1 (:func:`~idql_pl.algorithm.iteration.algorithm1_iteration`) for every
        agent, on ``[K, B, ...]`` batches drawn by index from ``buffer`` (agent ``k``'s rows from its own
        generator), the behavior steps at ``scheduler``'s next LRs; eager or compiled
        (:meth:`~idql_pl.models.base.IDQLModule.run`). Returns the detached metrics."""
        agents, behavior_steps = (self.num_agents,
                                  self.hparams.actor_updates_per_step if self.train_behavior else 0)
        behavior_batches = [buffer.sample(self.behavior.hparams.batch_size, agents)
                            for _ in range(behavior_steps)]
        critic_batch = buffer.sample(self.critic.hparams.batch_size, agents) if self.train_critic else None
        metrics = self.run(algorithm1_iteration, self.behavior, self.critic, behavior_batches, critic_batch,
                           opt, self.scheduled_lrs(scheduler, behavior_steps))
        self.advance(scheduler, behavior_steps)
        return metrics

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
        num_samples: int | list[int] | Tensor | None = None,
        extraction: Extraction | None = None,
        generator: torch.Generator | None = None,
        precision: str = "auto",
    ) -> Tensor:
        """Extracted actions of every agent (paper Alg. 2): argmax or implicit resampling;
        ``states [K, B, S]`` or ``[B, S]`` (the same states for every agent) ``-> [K, B, A]``.
        ``num_samples``: one N, one per agent, or a ``[K, B]`` tensor of one per agent and state (default: the
        model's)."""
        return extract_actions(
            self.behavior,
            self.critic,
            states,
            num_samples=self.hparams.num_samples if num_samples is None else num_samples,
            extraction=extraction or self.hparams.extraction,
            value_loss=self.critic.hparams.value_loss,
            loss_param=self.critic.loss_param,
            generator=generator,
            precision=precision,
        )

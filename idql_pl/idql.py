"""IDQL: the generalized-IQL critic and the diffusion behavior policy, trained jointly (paper Alg. 1-2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from idql_pl.behavior import DiffusionBehavior
from idql_pl.checkpointing import load_submodule_state
from idql_pl.critic import ImplicitCritic
from idql_pl.data.buffer import TransitionBuffer
from idql_pl.errors import ConfigError
from idql_pl.module import IDQLModule
from idql_pl.sampler import Extraction, check_extraction, extract_actions

CriticFactory = Callable[[int, int], ImplicitCritic]
BehaviorFactory = Callable[[int, int], DiffusionBehavior]


class IDQL(IDQLModule):
    """One ``training_step`` = ``actor_updates_per_step`` behavior steps (batch 1024 each) + one critic step
    (batch 256): the paper's schedule of two actor steps per critic step (IDQL_SPEC Sec. 6).

    Step counting: exactly one optimizer step per ``training_step`` goes through Lightning's counter, so
    ``trainer.global_step`` (and ``max_steps``) count *critic steps*; actor steps are
    ``actor_updates_per_step * global_step``. The paper's 1.5M critic / 3M actor run is ``max_steps=1_500_000``.

    ``critic``/``behavior`` are injected from the config (``class_path`` + ``init_args``, without the
    dimensions, which come from the data). ``behavior_ckpt``/``critic_ckpt`` load a pretrained half (from a
    standalone or a joint checkpoint); ``freeze_*`` then stops training it, so a sweep over tau reuses one
    diffusion model. ``compile`` (or either half's own ``compile``) runs the training losses through
    ``torch.compile`` under ``fit``.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        critic: CriticFactory = ImplicitCritic,
        behavior: BehaviorFactory = DiffusionBehavior,
        actor_updates_per_step: int = 2,
        num_samples: int = 128,
        extraction: Extraction = "argmax",
        behavior_ckpt: str | None = None,
        freeze_behavior: bool = False,
        critic_ckpt: str | None = None,
        freeze_critic: bool = False,
        compile: bool = False,  # noqa: A002 - the option's name on the command line
    ):
        super().__init__()
        check_extraction(extraction, num_samples)
        if actor_updates_per_step < 0:
            raise ConfigError(f"actor_updates_per_step must be >= 0 (got {actor_updates_per_step}); the paper uses 2")
        if freeze_behavior and freeze_critic:
            raise ConfigError("freeze_behavior and freeze_critic are both set: nothing would train; unset one")
        self.save_hyperparameters(ignore=["critic", "behavior"])
        self.critic = critic(obs_dim, action_dim)
        self.behavior = behavior(obs_dim, action_dim)
        if behavior_ckpt:
            load_submodule_state(self.behavior, behavior_ckpt, prefix="behavior.")
        if critic_ckpt:
            load_submodule_state(self.critic, critic_ckpt, prefix="critic.")
        self.train_behavior = not freeze_behavior and actor_updates_per_step > 0
        self.train_critic = not freeze_critic
        for module, trained in ((self.behavior, self.train_behavior), (self.critic, self.train_critic)):
            module.requires_grad_(trained)

    def setup(self, stage: str) -> None:
        super().setup(stage)  # DDP settings; compile: true compiles both halves
        if stage == "fit":
            for half in (self.critic, self.behavior):
                if half.hparams.get("compile", False):
                    half.compile_losses()

    def _compile_losses(self) -> None:
        self.critic.compile_losses()
        self.behavior.compile_losses()

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
        """Actor steps then the critic step; only the final optimizer step is Lightning-counted."""
        opts = self.optimizers()
        opts = list(opts) if isinstance(opts, list) else [opts]
        raw = [o.optimizer for o in opts]
        metrics: dict[str, Tensor] = {}
        if self.train_behavior:
            scheduler = self.lr_schedulers()
            actor_opt, opts, raw = opts[0], opts[1:], raw[1:]
            steps = self.hparams.actor_updates_per_step
            for i in range(steps):
                last = i == steps - 1 and not self.train_critic
                batch = buffer.sample(self.behavior.hparams.batch_size)
                out = self.behavior.update(batch, actor_opt if last else actor_opt.optimizer, scheduler)
            metrics.update({f"train/behavior/{k}": v for k, v in out.items()})
        if self.train_critic:
            v_opt, q_opt = raw[0], opts[1]
            out = self.critic.update(buffer.sample(self.critic.hparams.batch_size), v_opt, q_opt)
            metrics.update({f"train/critic/{k}": v for k, v in out.items()})
        self.track_losses(metrics)

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
        num_samples: int | None = None,
        extraction: Extraction | None = None,
        generator: torch.Generator | None = None,
        precision: str = "auto",
    ) -> Tensor:
        """Extracted actions for a batch of states (paper Alg. 2): argmax or implicit resampling."""
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

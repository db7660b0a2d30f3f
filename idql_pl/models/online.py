"""Online finetuning from a pretrained IDQL checkpoint: IDQL-Max and IDQL-Imp (paper Sec. 4.2, 6.2, App. D.3;
docs/fidelity.md §6)."""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from idql_pl.algorithm.extraction import Extraction, check_extraction
from idql_pl.algorithm.iteration import IDQLOptimizers, algorithm1_iteration
from idql_pl.data.buffer import TransitionBuffer
from idql_pl.data.replay import ReplayBuffer, mixed_batch
from idql_pl.errors import CheckpointError, ConfigError
from idql_pl.models.base import IDQLModule
from idql_pl.models.behavior import DiffusionBehavior
from idql_pl.models.critic import ImplicitCritic
from idql_pl.models.idql import IDQL, BehaviorFactory, CriticFactory
from idql_pl.training.checkpointing import SIDECARS_KEY, load_submodule_state, safe_load

Variant = Literal["max", "imp"]
VARIANTS = ("max", "imp")
BehaviorOptimizer = Literal["continue", "restart"]
BEHAVIOR_OPTIMIZERS = ("continue", "restart")
EXPLORATION: dict[str, Extraction] = {"max": "argmax", "imp": "implicit"}


def read_pretrained(path: str, obs_dim: int, action_dim: int) -> dict[str, Any]:
    """Check that ``path`` is a joint IDQL checkpoint for these dimensions; returns it (loaded safely)."""
    ckpt = safe_load(path)
    keys = list(ckpt["state_dict"])
    has_critic = any(k.startswith("critic.") for k in keys)
    has_behavior = any(k.startswith("behavior.") for k in keys)
    if not (has_critic and has_behavior):
        if has_critic or any(k.startswith(("q_net.", "v_net.")) for k in keys):
            kind = "a critic-only (ImplicitCritic)"
        elif has_behavior or any(k.startswith(("net.", "ema_net.")) for k in keys):
            kind = "a behavior-only (DiffusionBehavior)"
        else:
            kind = "not an IDQL"
        raise CheckpointError(
            f"--model.pretrained {path} is {kind} checkpoint: online finetuning starts from a joint IDQL"
            " checkpoint (e.g. checkpoints/idql-<dataset>-seed0/last.ckpt from python -m idql_pl fit --config"
            " configs/<domain>.yaml)"
        )
    dims = ckpt.get("idql_dims")
    if dims is not None and dict(dims) != {"obs_dim": obs_dim, "action_dim": action_dim}:
        raise CheckpointError(
            f"--model.pretrained {path} was trained with obs_dim={dims['obs_dim']},"
            f" action_dim={dims['action_dim']} but this dataset has obs_dim={obs_dim},"
            f" action_dim={action_dim}: pretrain on the same environment"
        )
    return ckpt


def pretrained_behavior_optimizer(ckpt: dict[str, Any],
                                  behavior: DiffusionBehavior) -> tuple[dict[str, Any], int] | None:
    """The behavior model's AdamW state in a pretrained checkpoint and the actor steps it has taken (its step
    count), or None when the checkpoint holds none (e.g. its behavior model was frozen). Found by shape: the
    one optimizer state whose moments match ``behavior.net``'s parameters, in order."""
    shapes = [p.shape for p in behavior.net.parameters()]
    for state in ckpt.get("optimizer_states") or []:
        groups, moments = state.get("param_groups") or [], state.get("state") or {}
        if len(groups) != 1 or len(groups[0]["params"]) != len(shapes):
            continue
        rows = [moments.get(i) for i in groups[0]["params"]]
        if all(r is not None and "exp_avg" in r and tuple(r["exp_avg"].shape) == tuple(sh)
               for r, sh in zip(rows, shapes, strict=True)):
            return state, int(torch.as_tensor(rows[0]["step"]).item())
    return None


class OnlineIDQL(IDQLModule):
    """Online finetuning of a pretrained IDQL (critic + diffusion behavior model). One ``training_step`` is
    one **environment step**, so ``trainer.global_step`` and ``trainer.max_steps`` count environment steps:

    1. act in the environment with the reweighted extraction over ``num_samples`` candidates: ``argmax``
       (Eq. 13) for ``variant="max"``, implicit resampling (categorical over ``w / sum(w)``, Alg. 2) for
       ``"imp"``; store ``(s, a, transform(r), s', 1 - terminated)`` in the online replay buffer (the offline
       dataset's reward transform; a time-limit truncation is not terminal);
    2. after ``warmup_steps`` environment steps (collected with the pretrained policy, no updates), per step:
       for ``"imp"``, ``actor_updates_per_step`` behavior steps; then one critic step (V, Q, target). Every
       batch is drawn half from the online buffer and half from the offline dataset (``online_fraction``,
       symmetric sampling). ``"max"`` keeps the behavior model (and its EMA copy) frozen.

    ``pretrained``: a joint IDQL checkpoint (critic and behavior; the model sizes in the config must match
    it), checked against the dataset's dimensions here and against the dataset name at ``setup``. The critic's
    Adam optimizers start fresh (constant LR). The behavior optimizer (``"imp"``), with ``behavior_optimizer=
    "continue"`` (default), continues the pretraining's: its AdamW moments and step count are loaded from the
    checkpoint and the LR follows one cosine over all actor steps, pretraining's ``P`` then this run's ``U``
    (``(max_steps - warmup_steps) * actor_updates_per_step``): at finetuning update ``i`` the multiplier is
    ``0.5 (1 + cos(pi (P + i) / (P + U)))`` (``behavior.lr_decay_steps``, if set, replaces ``P + U`` as the
    whole schedule's length). This is the reference code's finetuning: one agent keeps its optimizers through
    both phases, and its actor schedule's ``decay_steps`` is raised from 2M (the offline actor steps) to 4M
    for IDQL-Imp, so the actor is finetuned on the tail of one cosine, never at the peak LR with new moments.
    ``"restart"``: a fresh AdamW and a cosine from the peak LR to 0 over ``U`` (the project's earlier
    behavior). A checkpoint without a behavior optimizer (its behavior model was frozen) restarts, with a
    warning. Evaluation (:class:`~idql_pl.training.evaluation.PolicyEvaluation`) uses ``extraction`` (default
    argmax, deterministic seeded episodes). The replay buffer (all ``max_steps`` transitions unless
    ``replay_capacity``) is saved beside each checkpoint; a resumed run restarts the episode that was in
    progress (its stored transitions are kept). Single device only.
    """

    step_unit = "environment steps"

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        critic: CriticFactory = ImplicitCritic,
        behavior: BehaviorFactory = DiffusionBehavior,
        variant: Variant = "max",
        pretrained: str | None = None,
        warmup_steps: int = 5000,
        online_fraction: float = 0.5,
        replay_capacity: int | None = None,
        actor_updates_per_step: int = 2,
        num_samples: int = 128,
        extraction: Extraction = "argmax",
        behavior_optimizer: BehaviorOptimizer = "continue",
        compile: bool = False,  # noqa: A002 - the option's name on the command line
        compile_mode: str | None = None,
    ):
        super().__init__()
        check_extraction(extraction, num_samples)
        if variant not in VARIANTS:
            raise ConfigError(f"unknown variant {variant!r}: use max (IDQL-Max) or imp (IDQL-Imp)")
        if behavior_optimizer not in BEHAVIOR_OPTIMIZERS:
            raise ConfigError(f"unknown behavior_optimizer {behavior_optimizer!r}: use continue (the"
                              " pretraining's AdamW state and cosine, as the reference code) or restart")
        if warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0 (got {warmup_steps}); the paper uses 5000")
        if not 0.0 <= online_fraction <= 1.0:
            raise ConfigError(f"online_fraction must lie in [0, 1] (got {online_fraction});"
                              " the paper uses 0.5")
        if replay_capacity is not None and replay_capacity < 1:
            raise ConfigError(f"replay_capacity must be >= 1 or null (got {replay_capacity}):"
                              " null keeps every step")
        if variant == "imp" and actor_updates_per_step < 1:
            raise ConfigError("variant imp trains the behavior model: actor_updates_per_step must be >= 1"
                              f" (got {actor_updates_per_step}); the paper uses 2")
        self.save_init_args(locals(), ignore=("critic", "behavior"))
        self.critic = critic(obs_dim, action_dim)
        self.behavior = behavior(obs_dim, action_dim)
        if self.critic.num_agents != 1 or self.behavior.num_agents != 1:
            raise ConfigError("online finetuning trains one agent:"
                              " drop num_agents from the critic and behavior")
        self._pretrained_dataset: str | None = None
        self.train_behavior = variant == "imp"
        self._pretrained_actor: tuple[dict[str, Any], int] | None = None  # (AdamW state, actor steps taken)
        if pretrained:
            ckpt = read_pretrained(pretrained, obs_dim, action_dim)
            self._pretrained_dataset = (ckpt.get("datamodule_hyper_parameters") or {}).get("dataset")
            load_submodule_state(self.critic, pretrained, prefix="critic.")
            load_submodule_state(self.behavior, pretrained, prefix="behavior.")
            if self.train_behavior and behavior_optimizer == "continue":
                self._pretrained_actor = pretrained_behavior_optimizer(ckpt, self.behavior)
                if self._pretrained_actor is None:
                    rank_zero_warn(f"--model.pretrained {pretrained} holds no behavior optimizer state (was"
                                   " its behavior model frozen?): the behavior optimizer restarts at"
                                   " the peak LR")
        self.behavior.requires_grad_(self.train_behavior)
        self.exploration: Extraction = EXPLORATION[variant]
        # the environment side (set in setup, or by attach_env outside a Trainer)
        self.env: Any = None
        self.reward_fn: Any = None
        self.normalize: Any = None
        self.replay: ReplayBuffer | None = None
        self.env_seed = 0
        self._obs: np.ndarray | None = None
        self._episode = [0.0, 0]  # return (raw rewards), length
        self._pending_replay: dict[str, Any] | None = None
        self._rate_mark: tuple[int, float] | None = None

    # ------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        trainer = self.trainer
        if trainer.world_size > 1:
            raise ConfigError("online finetuning runs on one device (one environment): drop"
                              " --trainer.strategy ddp / set --trainer.devices 1")
        dm = trainer.datamodule
        if self._pretrained_dataset and self._pretrained_dataset != dm.dataset:
            raise CheckpointError(
                f"--model.pretrained {self.hparams.pretrained} was trained on '{self._pretrained_dataset}',"
                f" not on '{dm.dataset}': finetune on the dataset (and environment) it was pretrained on"
            )
        if self.hparams.pretrained is None:
            rank_zero_warn("OnlineIDQL without --model.pretrained:"
                           " the critic and behavior model start untrained")
        capacity = self.hparams.replay_capacity or trainer.max_steps
        if capacity is None or capacity < 1:
            raise ConfigError("online finetuning needs trainer.max_steps (environment steps) >= 1, or"
                              " model.replay_capacity")
        info = dm.info
        normalize = (dm.normalized_score if info.ref_min_score is not None and info.ref_max_score is not None
                     else None)
        self.attach_env(dm.make_env(), dm.reward_fn, int(capacity), trainer.strategy.root_device,
                        seed=int(torch.initial_seed()), normalize=normalize)

    def attach_env(self, env: Any, reward_fn: Any, capacity: int, device: torch.device | str = "cpu",
                   seed: int = 0, normalize: Any = None) -> None:
        """The environment, the offline reward transform and a fresh replay buffer (``setup`` calls this)."""
        self.env, self.reward_fn, self.normalize, self.env_seed = env, reward_fn, normalize, int(seed)
        hp = self.hparams
        self.replay = ReplayBuffer(capacity, hp.obs_dim, hp.action_dim, seed=(int(seed) + 1) % 2**63,
                                   device=device)
        self._obs = None

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.env is not None:
            self.env.close()
            self.env = None

    def on_train_start(self) -> None:
        if self._pending_replay is not None:
            self.replay.load_state_dict(self._pending_replay)
            self._pending_replay = None
        self.reset_episode()

    # ----------------------------------------------------------------------------------- acting
    act = IDQL.act  # the same extraction (Alg. 2) as the offline model: argmax or implicit resampling

    def explore(self, states: Tensor) -> Tensor:
        """The exploration policy: argmax (IDQL-Max) or implicit resampling (IDQL-Imp), global torch RNG."""
        return self.act(states, extraction=self.exploration)

    def reset_episode(self) -> None:
        """Start an episode; its reset seed is ``seed + env steps so far``, so a resumed run resets like a
        fresh one."""
        self._obs, _ = self.env.reset(seed=self.env_seed + int(self.global_step)
                                           + (1 if self._obs is not None else 0))
        self._episode = [0.0, 0]

    def env_step(self) -> dict[str, float] | None:
        """One environment step with the exploration policy; stores the transition. Returns the finished
        episode's metrics, if one ended. The only host sync is reading the action."""
        obs = self._obs
        state = torch.as_tensor(obs, dtype=torch.float32).reshape(1, -1).to(self.replay.device)
        action = self.explore(state)[0, 0].cpu().numpy()  # agent 0 (the one agent), state 0
        next_obs, reward, terminated, truncated, _ = self.env.step(action)
        reward = float(reward)
        self.replay.add(obs, action, float(self.reward_fn(reward)), next_obs, 0.0 if terminated else 1.0)
        self._episode[0] += reward
        self._episode[1] += 1
        if not (terminated or truncated):
            self._obs = next_obs
            return None
        metrics = {"train/online/episode_return": self._episode[0],
                   "train/online/episode_length": float(self._episode[1])}
        if self.normalize is not None:
            metrics["train/online/episode_normalized_score"] = float(self.normalize(self._episode[0]))
        self.reset_episode()  # seeded with the step count after this step
        return metrics

    # --------------------------------------------------------------------------------- training
    @property
    def updating(self) -> bool:
        """Whether this step updates (the warm-up's ``warmup_steps`` environment steps are done)."""
        return int(self.global_step) >= self.hparams.warmup_steps

    def updates_per_step(self) -> dict[str, int]:
        return {"critic": 1, "actor": self.hparams.actor_updates_per_step * int(self.train_behavior)}

    def configure_optimizers(self) -> Any:
        optimizers, schedulers = [], []
        if self.train_behavior:
            updates = (max(1, self.trainer.max_steps - self.hparams.warmup_steps)
                       * self.hparams.actor_updates_per_step)
            decay = self.behavior.hparams.lr_decay_steps
            if self._pretrained_actor is not None:  # continue pretraining's AdamW and cosine (reference code)
                state, done = self._pretrained_actor
                opt, sched = self.behavior.make_optimizer(decay or done + updates, start_step=done,
                                                          state=state)
            else:
                opt, sched = self.behavior.make_optimizer(decay or updates)
            optimizers.append(opt)
            schedulers.append({"scheduler": sched, "interval": "step"})
        optimizers.extend(self.critic.configure_optimizers())
        return optimizers, schedulers

    def named_optimizers(self) -> IDQLOptimizers:
        """``configure_optimizers``' optimizers, named for what they step (IDQL-Max: no behavior
        optimizer)."""
        opts = self.plain_optimizers()
        return IDQLOptimizers(opts[0] if self.train_behavior else None, *opts[-2:])

    def training_step(self, offline: TransitionBuffer, batch_idx: int) -> None:
        """One environment step, then (after the warm-up) one iteration of Algorithm 1
        (:func:`~idql_pl.algorithm.iteration.algorithm1_iteration`) on half-online, half-offline batches:
        IDQL-Imp's behavior steps and the critic step; IDQL-Max's critic step only."""
        episode = self.env_step()
        if episode is not None and self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(episode, step=int(self.global_step) + 1)
        frac, behavior_steps = (self.hparams.online_fraction,
                                self.hparams.actor_updates_per_step * self.train_behavior)
        if self.updating:  # batches from their own generators, so drawing them first changes no stream
            behavior_batches = [mixed_batch(self.replay, offline, self.behavior.hparams.batch_size, frac)
                                for _ in range(behavior_steps)]
            critic_batch = mixed_batch(self.replay, offline, self.critic.hparams.batch_size, frac)
            scheduler = self.lr_schedulers() if self.train_behavior else None
            metrics = self.run(algorithm1_iteration, self.behavior, self.critic, behavior_batches,
                               critic_batch, self.named_optimizers(),
                               self.scheduled_lrs(scheduler, behavior_steps))
            self.advance(scheduler, behavior_steps)
            self.track_losses(metrics)
        if (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            self.log_dict(self._online_progress())
        self.count_step()  # Lightning's global_step + 1: one environment step

    def _online_progress(self) -> dict[str, float]:
        """``train/online/env_steps``, ``train/online/replay_size``, ``perf/env_steps_per_s`` (host
        values)."""
        steps, now = int(self.global_step) + 1, time.perf_counter()
        out = {"train/online/env_steps": float(steps), "train/online/replay_size": float(len(self.replay))}
        if self._rate_mark is not None and steps > self._rate_mark[0] and now > self._rate_mark[1]:
            out["perf/env_steps_per_s"] = (steps - self._rate_mark[0]) / (now - self._rate_mark[1])
        self._rate_mark = (steps, now)
        return out

    def validation_step(self, offline: TransitionBuffer, batch_idx: int) -> None:
        """Critic and behavior losses on a fixed offline batch; nothing is updated."""
        metrics = {f"val/critic/{k}": v for k, v in self.critic.validation_losses(offline).items()}
        metrics.update({f"val/behavior/{k}": v for k, v in self.behavior.validation_losses(offline).items()})
        self.log_dict(metrics, batch_size=1)

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.replay is not None:  # written beside the checkpoint by AtomicCheckpointIO (inline otherwise)
            checkpoint.setdefault(SIDECARS_KEY, {})["replay"] = self.replay.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        replay = (checkpoint.get(SIDECARS_KEY) or {}).get("replay")
        if replay is None or "rows" not in replay:
            raise CheckpointError(
                "this checkpoint holds no online replay buffer (not an OnlineIDQL checkpoint, or its"
                " <ckpt>.replay.<step>.pt file was not read): resume a finetuning run with --ckpt_path last,"
                " or start finetuning from an offline checkpoint with --model.pretrained"
            )
        self._pending_replay = replay

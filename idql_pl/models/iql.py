"""IQL baseline: the generalized-IQL critic plus a unimodal Gaussian actor extracted with advantage-weighted
regression (Kostrikov et al. 2022, "Offline RL with Implicit Q-Learning", Sec. 4.3 Eq. 7; the IDQL paper's
Eq. 3 and Fig. 1 use it as the extraction that IDQL replaces).

The actor follows the IQL reference code (``NormalTanhPolicy`` with ``tanh_squash_distribution=False``) and
CORL's ``iql.py``: an MLP (2x256, ReLU) whose mean goes through ``tanh``, a diagonal Gaussian around it, the
log-std a free parameter (state-independent, the default, as in both) or a second head, clipped to
``[log_std_min, log_std_max] = [-5, 2]``. It is evaluated with its mean action.

AWR (IDQL paper Eq. 3; IQL Eq. 7):
``L_pi = -E_{(s,a)~D}[ min(exp(beta (Q_target(s, a) - V(s))), 100) log pi(a|s) ]`` with
``Q_target = min(Q1_target, Q2_target)``; inverse temperature ``beta`` 3.0 locomotion / 10.0 antmaze (IQL
App. B), weights clipped at 100 (``EXP_ADV_MAX`` in both reference codes). Adam, lr 3e-4 with cosine decay to
0 over the run (IQL's ``opt_decay_schedule="cosine"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from idql_pl.algorithm.extraction import autocast_for
from idql_pl.algorithm.iteration import IDQLOptimizers, algorithm1_iteration
from idql_pl.algorithm.steps import GradientStep
from idql_pl.data.buffer import Batch, TransitionBuffer
from idql_pl.errors import ConfigError
from idql_pl.models.base import IDQLModule, make_adam
from idql_pl.models.behavior import CosineDecay
from idql_pl.models.critic import ImplicitCritic
from idql_pl.nets import MLP, xavier_linear

CriticFactory = Callable[[int, int], ImplicitCritic]

EXP_ADV_MAX = 100.0  # the AWR weight clip of the IQL and CORL reference codes
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def awr_weights(advantages: Tensor, beta: float, max_weight: float = EXP_ADV_MAX) -> Tensor:
    """AWR weights ``min(exp(beta * A), max_weight)`` (IDQL Eq. 3, IQL Eq. 7), as the reference codes compute
    them (an overflowing ``exp`` is inf, which the clip turns into ``max_weight``)."""
    return torch.exp(beta * advantages).clamp(max=max_weight)


class GaussianActor(nn.Module):
    """``pi(a|s) = N(tanh(mu(s)), diag(exp(2 log_std)))``: the IQL reference actor (mean through tanh, no
    squashed distribution). ``state_dependent_std``: a second head (initialized at 1e-3 of xavier, the IQL
    code's ``log_std_scale``) instead of one free log-std per action dimension (initialized at 0)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: Sequence[int] = (256, 256),
                 state_dependent_std: bool = False, log_std_min: float = LOG_STD_MIN,
                 log_std_max: float = LOG_STD_MAX):
        super().__init__()
        hidden = [int(h) for h in hidden_dims]
        self.trunk = MLP(obs_dim, hidden[:-1], hidden[-1], activation="relu", activate_final=True)
        self.mean = xavier_linear(hidden[-1], action_dim)
        self.state_dependent_std = state_dependent_std
        if state_dependent_std:
            self.log_std_head = xavier_linear(hidden[-1], action_dim)
            with torch.no_grad():
                self.log_std_head.weight.mul_(1e-3)
        else:
            self.log_std = nn.Parameter(torch.zeros(action_dim))
        self.log_std_min, self.log_std_max = float(log_std_min), float(log_std_max)

    def forward(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, log_std)``, each ``[B, A]``; ``mean = tanh(mu(s))`` lies in (-1, 1)."""
        h = self.trunk(states)
        mean = torch.tanh(self.mean(h))
        log_std = self.log_std_head(h) if self.state_dependent_std else self.log_std.expand_as(mean)
        return mean, log_std.clamp(self.log_std_min, self.log_std_max)

    def log_prob(self, states: Tensor, actions: Tensor) -> Tensor:
        """``log pi(a|s)`` of the diagonal Gaussian, summed over action dimensions: ``[B]``."""
        mean, log_std = self(states)
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std - _LOG_SQRT_2PI).sum(-1)

    @torch.no_grad()
    def sample(self, states: Tensor, num_samples: int = 1,
               generator: torch.Generator | None = None) -> Tensor:
        """``num_samples`` Gaussian draws per state, clipped to [-1, 1]: ``[B, num_samples, A]``."""
        mean, log_std = self(states)
        noise = torch.randn(mean.shape[0], num_samples, mean.shape[1], device=mean.device, dtype=mean.dtype,
                            generator=generator)
        return (mean.unsqueeze(1) + log_std.exp().unsqueeze(1) * noise).clamp(-1.0, 1.0)


def awr_loss(actor: GaussianActor, critic: ImplicitCritic, batch: Batch, beta: float,
             max_weight: float = EXP_ADV_MAX) -> tuple[Tensor, Tensor, Tensor]:
    """AWR actor loss (IDQL Eq. 3, IQL Eq. 7):
    ``-mean(min(exp(beta (Q_target - V)), max_weight) log pi(a|s))`` on dataset actions; the advantage uses
    the critic's target twin-Q minimum and V, without gradient. Returns ``(loss, weights, advantages)``."""
    with torch.no_grad():
        # one agent
        adv = (critic.q_target(batch.observations, batch.actions) - critic.v(batch.observations)).squeeze(0)
        weights = awr_weights(adv, beta, max_weight)
    loss = -(weights * actor.log_prob(batch.observations, batch.actions)).mean()
    return loss, weights, adv


class IQLOptimizers(NamedTuple):
    """IQL's optimizers, named for what they step."""

    actor: torch.optim.Optimizer  # the Gaussian actor (Adam, cosine LR)
    value: torch.optim.Optimizer  # V
    q: torch.optim.Optimizer  # the twin Q


def iql_iteration(iql: IQL, batch: Batch, opt: IQLOptimizers, actor_lr: float | Tensor | None,
                  step: GradientStep) -> dict[str, Tensor]:
    """One IQL step (Kostrikov et al. 2022, Alg. 1): the critic's part of Algorithm 1 (V, Q with the new V,
    the Polyak target), then one AWR step of the actor (IDQL Eq. 3, IQL Eq. 7) on the same batch, at
    ``actor_lr``. Returns detached scalars, no host sync."""
    critic_opt = IDQLOptimizers(None, opt.value, opt.q)
    metrics = algorithm1_iteration(None, iql.critic, [], batch, critic_opt, [], step)
    loss, weights, adv = step(opt.actor, iql.actor_loss, batch, lr=actor_lr)
    metrics.update({
        "train/actor/loss": loss.detach(),
        "train/actor/weight_mean": weights.mean(),
        "train/actor/weight_clipped": (weights >= iql.hparams.max_weight).float().mean(),
        "train/actor/adv_mean": adv.mean(),
    })
    return metrics


class IQL(IDQLModule):
    """IQL: :class:`ImplicitCritic` (the same critic IDQL trains; expectile tau 0.7 locomotion / 0.9 antmaze)
    and a :class:`GaussianActor` fit with AWR, evaluated with its mean action.

    One ``training_step`` = :func:`iql_iteration`: one critic step (V, Q, Polyak target) then one actor step,
    both on the same batch of ``critic.batch_size`` (256) rows, as the IQL reference code. The actor's
    advantage is computed with the critic after this step's update (the reference code uses the new V and the
    target before its 0.005 Polyak step; the difference is that one Polyak step). ``trainer.global_step``
    counts these joint steps (one critic and one actor update each); the IQL paper trains 1M of them.
    ``compile: true`` compiles the step into one graph (``compile_mode`` passed on).
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        critic: CriticFactory = ImplicitCritic,
        beta: float = 3.0,
        max_weight: float = EXP_ADV_MAX,
        actor_hidden_dims: Sequence[int] = (256, 256),
        state_dependent_std: bool = False,
        log_std_min: float = LOG_STD_MIN,
        log_std_max: float = LOG_STD_MAX,
        actor_lr: float = 3e-4,
        lr_decay_steps: int | None = None,
        compile: bool = False,  # noqa: A002 - the option's name on the command line
        compile_mode: str | None = None,
    ):
        super().__init__()
        if not (beta >= 0 and math.isfinite(beta)):
            raise ConfigError(f"IQL beta must be a finite number >= 0 (got {beta});"
                              " the IQL paper uses 3.0 locomotion / 10.0 antmaze")
        if not max_weight > 0:
            raise ConfigError(f"max_weight must be > 0 (got {max_weight});"
                              " the IQL code clips the AWR weights at 100")
        if len(actor_hidden_dims) == 0 or any(int(h) < 1 for h in actor_hidden_dims):
            raise ConfigError("actor_hidden_dims must be a non-empty list of sizes >= 1"
                              f" (got {list(actor_hidden_dims)})")
        if not log_std_min < log_std_max:
            raise ConfigError(f"log_std_min must be < log_std_max (got {log_std_min}, {log_std_max});"
                              " IQL uses -5, 2")
        if not (actor_lr > 0 and math.isfinite(actor_lr)):
            raise ConfigError(f"actor_lr must be > 0 (got {actor_lr}); the IQL paper uses 3e-4")
        if lr_decay_steps is not None and lr_decay_steps < 1:
            raise ConfigError(f"lr_decay_steps must be >= 1 or null (got {lr_decay_steps}):"
                              " null uses max_steps")
        self.save_init_args(locals(), ignore=("critic",))
        self.critic = critic(obs_dim, action_dim)
        if self.critic.num_agents != 1:
            raise ConfigError("IQL trains one agent:"
                              f" drop the critic's num_agents (got {self.critic.num_agents})")
        self.actor = GaussianActor(obs_dim, action_dim, actor_hidden_dims, state_dependent_std, log_std_min,
                                   log_std_max)

    def updates_per_step(self) -> dict[str, int]:
        return {"critic": 1, "actor": 1}

    # ---------------------------------------------------------------------------------------- actor
    def actor_loss(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`awr_loss` with this module's ``beta`` and ``max_weight``."""
        return awr_loss(self.actor, self.critic, batch, self.hparams.beta, self.hparams.max_weight)

    # ----------------------------------------------------------------------------------------- optim
    def configure_optimizers(self) -> Any:
        """``[actor_opt, v_opt, q_opt]``: Adam for the actor with cosine decay to 0 over ``lr_decay_steps``
        (default ``max_steps``), the critic's two constant-lr Adams."""
        total = self.hparams.lr_decay_steps or self.trainer.max_steps
        if total is None or int(total) < 1:
            raise ConfigError(
                f"the actor LR schedule needs a length (got {total}):"
                " set trainer.max_steps or model.lr_decay_steps")
        actor_opt = make_adam(list(self.actor.parameters()), self.hparams.actor_lr)
        sched = LambdaLR(actor_opt, CosineDecay(int(total)))
        return [actor_opt, *self.critic.configure_optimizers()], [{"scheduler": sched, "interval": "step"}]

    def named_optimizers(self) -> IQLOptimizers:
        """``configure_optimizers``' optimizers, named for what they step."""
        return IQLOptimizers(*self.plain_optimizers())

    # -------------------------------------------------------------------------------------- training
    def training_step(self, buffer: TransitionBuffer, batch_idx: int) -> None:
        """One IQL step (:func:`iql_iteration`) on one batch of ``critic.batch_size`` rows."""
        batch = buffer.sample(self.critic.hparams.batch_size)
        scheduler = self.lr_schedulers()
        metrics = self.run(iql_iteration, self, batch, self.named_optimizers(),
                           self.scheduled_lrs(scheduler, 1)[0])
        self.advance(scheduler, 1)
        self.track_losses(metrics)
        self.count_step()  # Lightning's global_step + 1: one critic and one actor step

    @torch.no_grad()
    def validation_losses(self, buffer: TransitionBuffer) -> dict[str, Tensor]:
        """The AWR loss and the mean log-likelihood on a fixed batch; updates nothing."""
        batch = buffer.fixed_batch(self.critic.hparams.batch_size)
        loss, weights, _ = self.actor_loss(batch)
        return {"loss": loss, "log_prob": self.actor.log_prob(batch.observations, batch.actions).mean(),
                "weight_mean": weights.mean()}

    def validation_step(self, buffer: TransitionBuffer, batch_idx: int) -> None:
        metrics = {f"val/critic/{k}": v for k, v in self.critic.validation_losses(buffer).items()}
        metrics.update({f"val/actor/{k}": v for k, v in self.validation_losses(buffer).items()})
        self.log_dict(metrics, batch_size=1, sync_dist=True)

    # ------------------------------------------------------------------------------------------- act
    @torch.no_grad()
    def act(self, states: Tensor, precision: str = "auto", **sampling: Any) -> Tensor:
        """The actor's mean action ``tanh(mu(s))`` per state (IQL's evaluation policy), float32. The
        evaluation callback's sampling options (``num_samples``, ``extraction``, ``generator``) are accepted
        and unused: the mean action is deterministic."""
        with autocast_for(states.device, precision):
            mean, _ = self.actor(states)
        return mean.float()


__all__ = ["EXP_ADV_MAX", "IQL", "GaussianActor", "awr_loss", "awr_weights"]

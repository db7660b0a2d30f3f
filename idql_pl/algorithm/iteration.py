"""Algorithm 1 of the paper (IDQL training), one iteration: the one place where the order of the updates is
written. Every training step of the project runs it: IDQL (both halves), either half trained alone, online
finetuning (IDQL-Max: the critic; IDQL-Imp: both) and IQL's critic."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from idql_pl.algorithm.steps import GradientStep
from idql_pl.data.buffer import Batch

if TYPE_CHECKING:
    from idql_pl.models.behavior import DiffusionBehavior
    from idql_pl.models.critic import ImplicitCritic


class IDQLOptimizers(NamedTuple):
    """The optimizers of one iteration, named for what they step (None: that part is not trained)."""

    behavior: torch.optim.Optimizer | None  # the score network eps_hat (AdamW, cosine LR)
    value: torch.optim.Optimizer | None  # V
    q: torch.optim.Optimizer | None  # the twin Q


def algorithm1_iteration(
    behavior: DiffusionBehavior | None,
    critic: ImplicitCritic | None,
    behavior_batches: Sequence[Batch],
    critic_batch: Batch | None,
    opt: IDQLOptimizers,
    behavior_lrs: Sequence[float] | Tensor,
    step: GradientStep,
) -> dict[str, Tensor]:
    """One iteration of Algorithm 1 (paper Sec. 4.1, Alg. 1) for every agent at once:

    1. a behavior step per batch of ``behavior_batches`` (the paper makes two per critic step, App. E): the
       diffusion loss (Eq. 4), at this step's learning rate of the cosine schedule, then the EMA copy;
    2. the value step on ``critic_batch``: the expectile / quantile / exponential loss of
       ``u = min(Q1_target, Q2_target)(s, a) - V(s)`` (Eq. 1, 10, 11);
    3. the Q step with the V just updated: ``y = r + gamma mask V(s')`` (Eq. 2);
    4. the Polyak update of the target Q pair (rate 0.005).

    ``step`` takes one gradient step (:mod:`idql_pl.algorithm.steps`: eager, or functional inside
    ``compile: true``'s graph). Returns detached means over agents, with no host sync.
    """
    metrics: dict[str, Tensor] = {}
    for batch, lr in zip(behavior_batches, behavior_lrs, strict=True):
        loss = step(opt.behavior, behavior.loss, batch, lr=lr)
        behavior.ema_update()
        metrics["train/behavior/loss"] = loss.detach() / behavior.num_agents
    if critic_batch is not None:
        v_loss, u, v = step(opt.value, critic.v_loss, critic_batch)
        q_loss, qs = step(opt.q, critic.q_loss, critic_batch)
        critic.target_update()
        agents = critic.num_agents
        metrics.update({
            "train/critic/q_loss": q_loss.detach() / agents,
            "train/critic/v_loss": v_loss.detach() / agents,
            "train/critic/q_mean": qs.detach().mean(),
            "train/critic/v_mean": v.detach().mean(),
            "train/critic/abs_u_mean": u.detach().abs().mean(),
        })
    return metrics

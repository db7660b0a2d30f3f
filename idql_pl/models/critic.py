"""The generalized-IQL critic: twin Q, V and the Polyak target (paper Sec. 3, 4.1, Alg. 1;
docs/fidelity.md §1)."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from idql_pl.algorithm.iteration import IDQLOptimizers, algorithm1_iteration
from idql_pl.algorithm.losses import ValueLossKind, check_value_loss, implicit_weights, value_loss
from idql_pl.data.buffer import Batch, TransitionBuffer
from idql_pl.errors import ConfigError
from idql_pl.models.base import IDQLModule, check_sizes, make_adam
from idql_pl.nets import AgentMLP, TwinQ, build_agents, ema_update_, per_agent


class ImplicitCritic(IDQLModule):
    """Twin Q (+ Polyak target) and V trained with the generalized implicit Q-learning objective.

    Its part of Algorithm 1 (:func:`~idql_pl.algorithm.iteration.algorithm1_iteration`): a V step on
    :meth:`v_loss` (Eq. 1 / 10 / 11 on ``u = min(Q1_t, Q2_t)(s, a) - V(s)``), a Q step on :meth:`q_loss`
    (Eq. 2, ``y = r + gamma mask V(s')`` with the just-updated V), then :meth:`target_update`. ``value_loss``:
    "expectile" (``tau``), "quantile" (``tau``) or "exponential" (``alpha``, guarded with ``exp_clip``). Adam,
    constant ``lr``, no weight decay or gradient clipping. Trained alone (``--model idql_pl.ImplicitCritic``),
    a training step is Algorithm 1 without the behavior steps, and ``compile: true`` compiles it
    (:meth:`~idql_pl.models.base.IDQLModule.compile_training`, ``compile_mode`` passed on).

    ``num_agents`` (K) independent critics train as one model: V is K members, the twin Q and its target
    ``K x 2`` (:class:`~idql_pl.nets.TwinQ`), all updated by one batched step. Batches are ``[K, B, ...]``
    (agent ``k``'s own rows; a ``[B, ...]`` batch is shared by all agents), every evaluation method returns
    ``[K, B]``, and each loss is the sum over agents of each agent's mean loss, so each agent gets its own
    gradient and (Adam being elementwise) its own Adam step. ``tau``/``alpha`` may be a list of K values (a
    hyperparameter sweep in one process). Agent ``k`` is initialized as a single run seeded ``seed + k``
    (:func:`~idql_pl.nets.build_agents`).
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_dims: Sequence[int] = (256, 256),
        value_loss: ValueLossKind = "expectile",
        tau: float | list[float] = 0.7,
        alpha: float | list[float] = 1.0,
        exp_clip: float = 6.0,
        discount: float = 0.99,
        target_update_rate: float = 0.005,
        lr: float = 3e-4,
        batch_size: int = 256,
        compile: bool = False,  # noqa: A002 - the option's name on the command line
        compile_mode: str | None = None,
        num_agents: int = 1,
    ):
        super().__init__()
        check_sizes(obs_dim, action_dim, num_agents)
        if len(hidden_dims) == 0 or any(int(h) < 1 for h in hidden_dims):
            raise ConfigError("critic hidden_dims must be a non-empty list of sizes >= 1"
                              f" (got {list(hidden_dims)})")
        name = "alpha" if value_loss == "exponential" else "tau"
        params = per_agent(alpha if value_loss == "exponential" else tau, num_agents, f"critic {name}")
        for param in params:
            check_value_loss(value_loss, param, exp_clip)
        if not 0.0 <= discount <= 1.0:
            raise ConfigError(f"discount must lie in [0, 1] (got {discount}); the paper uses 0.99")
        if not 0.0 < target_update_rate <= 1.0:
            raise ConfigError(f"target_update_rate must lie in (0, 1] (got {target_update_rate}); the"
                              " paper uses 0.005")
        if not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"critic lr must be > 0 (got {lr}); the paper uses 3e-4")
        if int(batch_size) < 1:
            raise ConfigError(f"critic batch_size must be >= 1 (got {batch_size}); the paper uses 256")
        self.save_init_args(locals())
        hidden = [int(h) for h in hidden_dims]

        def build(k: int) -> nn.ModuleDict:  # in a single run's order: the Q pair, then V
            return nn.ModuleDict({"q": TwinQ(obs_dim, action_dim, hidden, num_agents=k),
                                  "v": AgentMLP(obs_dim, hidden, 1, num_agents=k)})

        nets = build_agents(build, num_agents)
        self.q_net = nets["q"]
        self.q_target_net = copy.deepcopy(self.q_net).requires_grad_(False)
        self.v_net = nets["v"]
        # tau (or alpha) per agent, a [K, 1] column broadcasting over each agent's rows (derived from hparams)
        self.register_buffer("_agent_params", torch.tensor(params).unsqueeze(1), persistent=False)

    # ------------------------------------------------------------------------------------- properties
    @property
    def num_agents(self) -> int:
        return int(self.hparams.get("num_agents", 1))

    @property
    def loss_param(self) -> Tensor:
        """The value loss's parameter of each agent: ``alpha`` for "exponential", ``tau`` otherwise,
        ``[K, 1]``."""
        return self._agent_params

    def loss_param_of(self, agent: int) -> float:
        """Agent ``agent``'s value-loss parameter as a float."""
        return float(self._agent_params[agent, 0])

    def _agents(self, x: Tensor, item_dims: int = 1) -> Tensor:
        """``x`` with the leading agent dimension: ``[K, B, ...]`` as given, ``[B, ...]`` shared by every
        agent."""
        return x if x.dim() > item_dims + 1 else x.expand(self.num_agents, *x.shape)

    # ------------------------------------------------------------------------------------ evaluation
    def q(self, states: Tensor, actions: Tensor) -> Tensor:
        """``min(Q1, Q2)(s, a)`` of each agent's online pair: ``[K, B]`` (``states`` ``[K, B, S]`` or
        ``[B, S]``)."""
        return self.q_net(self._agents(states), self._agents(actions)).amin(dim=1)

    def q_target(self, states: Tensor, actions: Tensor) -> Tensor:
        """``min(Q1_target, Q2_target)(s, a)``: ``[K, B]`` (the value target and the extraction score,
        Alg. 2)."""
        return self.q_target_net(self._agents(states), self._agents(actions)).amin(dim=1)

    def v(self, states: Tensor) -> Tensor:
        """``V(s)``: ``[K, B]``."""
        return self.v_net(self._agents(states)).squeeze(-1)

    def implicit_weights(self, states: Tensor, actions: Tensor) -> Tensor:
        """Implicit-actor weights (Eq. 8-12) of ``u = min Q_target(s, a) - V(s)``: ``[K, B]``, positive."""
        u = self.q_target(states, actions) - self.v(states)
        return implicit_weights(u, self.hparams.value_loss, self.loss_param)

    # ---------------------------------------------------------------------------------------- losses
    def v_loss(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Value loss (Eq. 1 / 10 / 11): per agent the mean ``f(min Q_target(s, a) - V(s))`` over its rows,
        summed over agents; returns (loss, u [K, B], V(s) [K, B])."""
        batch = batch.for_agents(self.num_agents)
        with torch.no_grad():
            q_hat = self.q_target(batch.observations, batch.actions)
        v = self.v(batch.observations)
        u = q_hat - v
        hp = self.hparams
        return value_loss(u, hp.value_loss, self.loss_param, hp.exp_clip).mean(dim=-1).sum(), u, v

    def q_loss(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Q loss (Eq. 2): per agent the mean over both nets and its rows of ``(Q_i(s, a) - r - gamma mask
        V(s'))^2``, summed over agents; returns (loss, Qs [K, 2, B])."""
        batch = batch.for_agents(self.num_agents)
        with torch.no_grad():
            y = batch.rewards + self.hparams.discount * batch.masks * self.v(batch.next_observations)
        qs = self.q_net(batch.observations, batch.actions)  # [K, 2, B]
        return (qs - y.unsqueeze(1)).square().mean(dim=(1, 2)).sum(), qs

    def target_update(self) -> None:
        """Polyak update ``Q_target <- (1 - rate) Q_target + rate Q`` (paper Alg. 1, rate 0.005), one foreach
        op."""
        ema_update_(self.q_target_net.parameters(), self.q_net.parameters(), self.hparams.target_update_rate)

    # ------------------------------------------------------------------------------------- Lightning
    def updates_per_step(self) -> dict[str, int]:
        """One critic update per ``training_step`` (for ``perf/critic_steps_per_s``)."""
        return {"critic": 1}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """``[v_opt, q_opt]``: Adam, lr 3e-4, no weight decay (docs/fidelity.md §1)."""
        lr = self.hparams.lr
        return [make_adam(list(self.v_net.parameters()), lr), make_adam(list(self.q_net.parameters()), lr)]

    def update(self, batch: Batch, v_opt: torch.optim.Optimizer,
               q_opt: torch.optim.Optimizer) -> dict[str, Tensor]:
        """Algorithm 1 without the behavior steps (V, Q with the new V, target) on ``batch``, eager or
        compiled (:meth:`~idql_pl.models.base.IDQLModule.run`); returns the detached ``train/critic/*``
        metrics."""
        return self.run(algorithm1_iteration, None, self, [], batch, IDQLOptimizers(None, v_opt, q_opt), [])

    def training_step(self, buffer: TransitionBuffer, batch_idx: int) -> None:
        """:meth:`update` on ``batch_size`` rows per agent."""
        self.track_losses(self.update(buffer.sample(self.hparams.batch_size, self.num_agents),
                                      *self.plain_optimizers()))
        self.count_step()  # Lightning's global_step + 1: one critic step

    @torch.no_grad()
    def validation_losses(self, buffer: TransitionBuffer) -> dict[str, Tensor]:
        """q_loss and v_loss (means over agents) on a fixed-seed batch of ``batch_size`` rows, the same for
        every agent; updates nothing."""
        batch = buffer.fixed_batch(self.hparams.batch_size)
        v_loss, u, _ = self.v_loss(batch)
        q_loss, _ = self.q_loss(batch)
        return {"q_loss": q_loss / self.num_agents, "v_loss": v_loss / self.num_agents,
                "abs_u_mean": u.abs().mean()}

    def validation_step(self, buffer: TransitionBuffer, batch_idx: int) -> None:
        metrics = self.validation_losses(buffer)
        self.log_dict({f"val/critic/{k}": v for k, v in metrics.items()}, batch_size=self.hparams.batch_size,
                      sync_dist=True)

"""The score network ``eps_hat(a_k, k, s)`` of the diffusion behavior policy (paper App. G), for ``K`` agents.

- :class:`FourierTimeEmbedding`: learnable Fourier features of the diffusion step, then a 128-wide MLP.
- :class:`LNResNet`: the "LN_Resnet": ``Dense(256)`` on ``concat[a_k, s, time_emb(k)]``, 3 blocks
  ``x + Dense(256)(act(Dense(1024)(LayerNorm(Dropout(x)))))``, act, ``Dense(action_dim)``; xavier-uniform for
  the first and last Dense, LeCun-normal for the blocks' inner Dense layers, LayerNorm epsilon 1e-6.
- :class:`MLPScoreNet`: the plain-MLP baseline of the paper's Fig. 3.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from idql_pl.errors import ConfigError
from idql_pl.nets.layers import AgentLayerNorm, AgentLinear, lecun_linear, make_activation, xavier_linear
from idql_pl.nets.mlp import AgentMLP


class FourierTimeEmbedding(nn.Module):
    """Learnable Fourier features of the step index (paper App. G; docs/fidelity.md §3): per agent
    ``W ~ N(0, 0.2^2)`` of shape ``[fourier_dim/2, 1]`` (stored ``[K, fourier_dim/2, 1]``),
    ``[cos(2 pi k W), sin(2 pi k W)]`` (64 dims), then ``Dense(time_dim) -> act -> Dense(time_dim)`` (128).
    ``k [K, ...]``; output ``[K, ..., time_dim]``."""

    def __init__(self, fourier_dim: int = 64, time_dim: int = 128, activation: str = "mish",
                 num_agents: int = 1):
        super().__init__()
        if fourier_dim % 2:
            raise ConfigError(f"fourier_dim must be even (got {fourier_dim})")
        self.num_agents = num_agents
        self.kernel = nn.Parameter(torch.stack([torch.randn(fourier_dim // 2, 1) * 0.2
                                                for _ in range(num_agents)]))
        self.mlp = AgentMLP(fourier_dim, [time_dim], time_dim, activation=activation, num_agents=num_agents)

    def forward(self, k: Tensor) -> Tensor:
        w = self.kernel.squeeze(-1).view(self.num_agents, *([1] * (k.dim() - 1)), -1)
        f = (2 * math.pi) * k.to(self.kernel.dtype).unsqueeze(-1) * w
        return self.mlp(torch.cat([torch.cos(f), torch.sin(f)], dim=-1))


class ScoreNet(nn.Module):
    """Noise predictor ``eps_hat(x, k, s)`` of ``K`` agents: a first ``Dense(hidden_dim)`` on
    ``concat[x, s, time_emb(k)]`` (paper App. G), then :meth:`trunk`. Inputs and outputs carry the agent
    dimension first: ``x [K, ..., A]``, ``k [K, ...]`` (or an int), ``s [K, ..., S]`` -> ``[K, ..., A]``.

    The first Dense is stored as its three column blocks (``in_action``, ``in_state``, ``in_time``; one
    xavier init over the whole concatenation), which is the same function, so callers can project each state
    once and reuse it over the N candidates and T steps of the sampler:
    ``forward(x, k, s) == forward_parts(x, project_state(s), project_time(k))``. Dimensions after the agent's
    broadcast (``x [K, B, N, A]`` with ``state_proj [K, B, 1, H]``).
    """

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int, time_dim: int = 128,
                 fourier_dim: int = 64, activation: str = "mish", num_timesteps: int | None = None,
                 num_agents: int = 1):
        super().__init__()
        self.obs_dim, self.action_dim, self.hidden_dim = obs_dim, action_dim, hidden_dim
        self.num_timesteps, self.num_agents = num_timesteps, num_agents
        self.time_embedding = FourierTimeEmbedding(fourier_dim, time_dim, activation, num_agents)
        blocks: list[list[nn.Linear]] = [[], [], []]
        for _ in range(num_agents):
            full = xavier_linear(action_dim + obs_dim + time_dim, hidden_dim)
            parts = (nn.Linear(action_dim, hidden_dim), nn.Linear(obs_dim, hidden_dim, bias=False),
                     nn.Linear(time_dim, hidden_dim, bias=False))
            with torch.no_grad():
                for part, w in zip(parts, full.weight.split([action_dim, obs_dim, time_dim], dim=1)):
                    part.weight.copy_(w)
                parts[0].bias.zero_()
            for block, part in zip(blocks, parts):
                block.append(part)
        self.in_action, self.in_state, self.in_time = (AgentLinear.stack(block) for block in blocks)

    def project_state(self, states: Tensor) -> Tensor:
        """The state block of the first Dense: ``[K, ..., S] -> [K, ..., H]`` (once per state)."""
        return self.in_state(states)

    def project_time(self, k: int | Tensor) -> Tensor:
        """The time block of the first Dense on ``time_emb(k)``: ``[K, ..., H]`` for ``k [K, ...]``,
        ``[K, H]`` for an int. Integer ``k`` tensors read :meth:`time_table` when ``num_timesteps`` is set (T
        rows embedded per agent, not B)."""
        if isinstance(k, int):
            if self.num_timesteps is not None:
                return self.time_table()[:, k]
            k = torch.full((self.num_agents,), k, device=self.in_time.weight.device)
        if self.num_timesteps is not None and not k.is_floating_point():
            agent = torch.arange(self.num_agents, device=k.device).view(self.num_agents,
                                                                        *([1] * (k.dim() - 1)))
            return self.time_table()[agent, k]
        return self.in_time(self.time_embedding(k))

    def time_table(self) -> Tensor:
        """``project_time(k)`` for every ``k`` in ``0..num_timesteps-1``: ``[K, T, H]``."""
        steps = torch.arange(self.num_timesteps, device=self.in_time.weight.device)
        return self.in_time(self.time_embedding(steps.expand(self.num_agents, -1)))

    def forward_parts(self, x: Tensor, state_proj: Tensor, time_proj: Tensor) -> Tensor:
        return self.trunk(self.in_action(x) + state_proj + time_proj)

    def forward(self, x: Tensor, k: int | Tensor, states: Tensor) -> Tensor:
        time_proj = self.project_time(k)
        if isinstance(k, int):  # [K, H] -> broadcast over the rows of each agent
            time_proj = time_proj.view(self.num_agents, *([1] * (x.dim() - 2)), -1)
        return self.forward_parts(x, self.project_state(states), time_proj)

    def trunk(self, h: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ResidualBlock(nn.Module):
    """``x + Dense(H)(act(Dense(ff)(LayerNorm(Dropout(x)))))`` (paper App. G; reference ``MLPResNetV3Block``),
    per agent (:class:`AgentLinear`, :class:`AgentLayerNorm`); ``x [K, ..., H]``."""

    def __init__(self, hidden_dim: int, ff_dim: int, dropout: float, activation: str, num_agents: int = 1):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm = AgentLayerNorm(num_agents, hidden_dim, eps=1e-6)
        self.fc1 = AgentLinear(num_agents, hidden_dim, ff_dim, init=lecun_linear)
        self.act = make_activation(activation)
        self.fc2 = AgentLinear(num_agents, ff_dim, hidden_dim, init=lecun_linear)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(self.dropout(x)))))


class LNResNet(ScoreNet):
    """The paper's "LN_Resnet" score network (App. G): ``Dense(H)`` on ``concat[x, s, time_emb]`` ->
    ``num_blocks`` residual blocks -> act -> ``Dense(action_dim)``. Defaults: H 256, ff 1024, 3 blocks,
    dropout 0.1, mish. ``num_agents`` independent copies (one batched matmul per Dense)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int = 256, num_blocks: int = 3,
                 ff_dim: int = 1024, dropout: float = 0.1, activation: str = "mish", time_dim: int = 128,
                 fourier_dim: int = 64, num_timesteps: int | None = None, num_agents: int = 1):
        super().__init__(obs_dim, action_dim, hidden_dim, time_dim, fourier_dim, activation, num_timesteps,
                         num_agents)
        self.blocks = nn.Sequential(*(ResidualBlock(hidden_dim, ff_dim, dropout, activation, num_agents)
                                      for _ in range(num_blocks)))
        self.out_act = make_activation(activation)
        self.out = AgentLinear(num_agents, hidden_dim, action_dim)

    def trunk(self, h: Tensor) -> Tensor:
        return self.out(self.out_act(self.blocks(h)))


class MLPScoreNet(ScoreNet):
    """Plain-MLP score network (the paper's Fig. 3 baseline): ``Dense(H)`` on ``concat[x, s, time_emb]`` ->
    act, ``num_layers - 1`` more ``Dense(H) -> act``, then ``Dense(action_dim)``; no LayerNorm, no dropout."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int = 256, num_layers: int = 3,
                 activation: str = "mish", time_dim: int = 128, fourier_dim: int = 64,
                 num_timesteps: int | None = None, num_agents: int = 1):
        super().__init__(obs_dim, action_dim, hidden_dim, time_dim, fourier_dim, activation, num_timesteps,
                         num_agents)
        self.act = make_activation(activation)
        self.rest = AgentMLP(hidden_dim, [hidden_dim] * (num_layers - 1), action_dim, activation=activation,
                             num_agents=num_agents)

    def trunk(self, h: Tensor) -> Tensor:
        return self.rest(self.act(h))

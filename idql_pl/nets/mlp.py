"""The critic's networks (paper Sec. 3; App. G): ``V(s)`` and the twin ``Q1, Q2(s, a)``, 2x256 ReLU MLPs with
xavier-uniform weights, for ``K`` agents. The ``K x 2`` Q networks are one :class:`EnsembleMLP` (stacked
weights, one ``torch.baddbmm`` per layer for all members). :class:`MLP` is the plain single network (IQL's
Gaussian actor)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from idql_pl.nets.layers import AgentLinear, make_activation, xavier_linear


class MLP(nn.Module):
    """``Dense -> act -> ... -> Dense(out_dim)``; xavier-uniform weights, zero biases (reference ``MLP``)."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, activation: str = "relu",
                 activate_final: bool = False):
        super().__init__()
        dims = [in_dim, *hidden_dims, out_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(xavier_linear(d_in, d_out))
            if i < len(dims) - 2 or activate_final:
                layers.append(make_activation(activation))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AgentMLP(nn.Module):
    """:class:`MLP` for ``K`` agents: ``Dense -> act -> ... -> Dense(out_dim)`` of :class:`AgentLinear` layers
    (xavier-uniform, zero biases); ``forward(x [K, ..., in]) -> [K, ..., out]``."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, activation: str = "relu",
                 activate_final: bool = False, num_agents: int = 1):
        super().__init__()
        dims = [in_dim, *hidden_dims, out_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(AgentLinear(num_agents, d_in, d_out))
            if i < len(dims) - 2 or activate_final:
                layers.append(make_activation(activation))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class EnsembleMLP(nn.Module):
    """``E`` independent MLPs (each like :class:`MLP`) evaluated as one: weights ``[E, out, in]`` (each member
    as ``nn.Linear`` stores it), biases ``[E, out]``, one ``torch.baddbmm`` per layer for all members.

    ``forward(x [B, in]) -> [E, B, out]``; an input of shape ``[E, B, in]`` gives each member its own rows.
    """

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, num_members: int = 2,
                 activation: str = "relu"):
        super().__init__()
        self.num_members = num_members
        dims = [in_dim, *hidden_dims, out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            weight = torch.empty(num_members, d_in, d_out).transpose(1, 2).contiguous()
            bound = math.sqrt(6.0 / (d_in + d_out))  # xavier-uniform per member
            nn.init.uniform_(weight, -bound, bound)
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(torch.zeros(num_members, d_out)))
        self.act = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.expand(self.num_members, *x.shape)
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
            if i < last:
                x = self.act(x)
        return x


class TwinQ(nn.Module):
    """The critic's Q pair (docs/fidelity.md §1) for each of ``K`` agents: independent ``MLP([s, a])`` of
    2x256 ReLU, all ``K x num_members`` of them one :class:`EnsembleMLP` (agent-major members).
    ``forward(s [K, B, S], a [K, B, A]) -> [K, num_members, B]``; every member of agent ``k`` reads agent
    ``k``'s rows."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: Sequence[int] = (256, 256),
                 num_members: int = 2, activation: str = "relu", num_agents: int = 1):
        super().__init__()
        self.num_agents, self.num_members = num_agents, num_members
        self.ensemble = EnsembleMLP(obs_dim + action_dim, hidden_dims, 1, num_agents * num_members,
                                    activation)

    def forward(self, states: Tensor, actions: Tensor) -> Tensor:
        x = torch.cat([states, actions], dim=-1)  # [K, B, S + A]
        k, b, d = x.shape
        members = x.unsqueeze(1).expand(k, self.num_members, b, d).reshape(k * self.num_members, b, d)
        return self.ensemble(members).view(k, self.num_members, b)

"""Networks, as the paper draws them (App. G; IDQL_SPEC Sec. 1, 3), in standard PyTorch, for ``K`` agents at once.

Every network of the critic and the behavior model holds ``num_agents = K`` independent copies (K seeds or K
hyperparameter settings trained in one process): each parameter has a leading agent dimension, inputs and
outputs are ``[K, ...]``, and each layer is one batched matmul for all agents (:class:`AgentLinear`,
:class:`AgentLayerNorm`, :class:`AgentMLP`). ``K = 1`` is the ordinary single run.

- :class:`AgentMLP` and :class:`TwinQ`: the critic's ``V(s)`` and ``Q1, Q2(s, a)``, 2x256 ReLU MLPs. The K x 2 Q
  nets are one :class:`EnsembleMLP` (stacked weights, one ``torch.baddbmm`` per layer for all members).
  :class:`MLP` is the plain single network (IQL's Gaussian actor).
- :class:`FourierTimeEmbedding`: learnable Fourier features of the diffusion step, then a 128-wide MLP.
- :class:`LNResNet`: the "LN_Resnet" score network ``eps_hat(a_k, k, s)``: ``Dense(256)`` on
  ``concat[a_k, s, time_emb(k)]``, 3 blocks ``x + Dense(256)(act(Dense(1024)(LayerNorm(Dropout(x)))))``,
  act, ``Dense(action_dim)``. :class:`MLPScoreNet` is the plain-MLP baseline of Fig. 3.
- :func:`ema_update_`: the Polyak/EMA update of the target Q and the score-net EMA copy.

Initialization follows the reference code's flax defaults: xavier-uniform for the MLPs and the first/last
Dense of the score network, LeCun-normal for the residual blocks' inner Dense layers, zero biases, LayerNorm
epsilon 1e-6.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idql_pl.errors import ConfigError


class Mish(nn.Module):
    """``mish(x) = x tanh(softplus(x))``, the paper-era activation (App. G), through the exact identity
    ``tanh(softplus(x)) = n / (2 - n)`` with ``n = s (2 - s)``, ``s = sigmoid(x)``.

    Same function as ``F.mish`` (within float rounding); on CPU the forward is about 2x faster than
    ``F.mish``'s kernel and equal in forward + backward, and ``torch.compile`` fuses it into one pass.
    """

    def forward(self, x: Tensor) -> Tensor:
        s = torch.sigmoid(x)
        n = s * (2 - s)
        return x * n / (2 - n)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "mish": Mish,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
}


def make_activation(name: str) -> nn.Module:
    """Activation module by name (mish: the paper-era code; swish: the later code)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}: use one of {', '.join(ACTIVATIONS)}") from None


def xavier_linear(in_dim: int, out_dim: int, bias: bool = True) -> nn.Linear:
    """``nn.Linear`` with flax's ``Dense`` init as the reference MLPs use it: xavier-uniform, zero bias."""
    linear = nn.Linear(in_dim, out_dim, bias=bias)
    nn.init.xavier_uniform_(linear.weight)
    if bias:
        nn.init.zeros_(linear.bias)
    return linear


def lecun_linear(in_dim: int, out_dim: int, bias: bool = True) -> nn.Linear:
    """``nn.Linear`` with flax's default ``Dense`` init: truncated normal of variance 1/fan_in, zero bias."""
    linear = nn.Linear(in_dim, out_dim, bias=bias)
    std = math.sqrt(1.0 / in_dim) / 0.87962566103423978  # the truncation at 2 std shrinks the variance
    nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)
    if bias:
        nn.init.zeros_(linear.bias)
    return linear


Net = TypeVar("Net", bound=nn.Module)


def build_agents(build: Callable[[int], Net], num_agents: int, seed: int | None = None) -> Net:
    """``build(num_agents)`` with each agent initialized as its own single run (seed everything, paper App. D).

    Agent ``k``'s parameters are the ones ``build(1)`` draws right after seeding the CPU generator with
    ``seed + k`` (``seed``: ``torch.initial_seed()``, i.e. ``seed_everything``'s seed), so agent ``k`` of a
    K-agent model starts exactly where a single run seeded ``seed + k`` starts; every generator, the CPU's and
    each GPU's, is left untouched. Every tensor of the state dict is the concatenation of the agents' along
    dim 0 (agent-major: the twin Q's ``2K`` members are ``[K, 2]``).
    """
    seed = torch.initial_seed() if seed is None else seed
    with torch.random.fork_rng(devices=[]):
        net = build(num_agents)
        singles = []
        for k in range(num_agents):
            torch.default_generator.manual_seed(seed + k)  # not torch.manual_seed: it reseeds every GPU too
            singles.append(build(1).state_dict())
    net.load_state_dict({key: torch.cat([single[key] for single in singles]) for key in singles[0]})
    return net


def per_agent(value: float | Sequence[float], num_agents: int, name: str) -> list[float]:
    """A hyperparameter given once (shared) or as a list of one value per agent, as ``num_agents`` floats."""
    if isinstance(value, int | float):
        return [float(value)] * num_agents
    values = [float(v) for v in value]
    if len(values) != num_agents:
        raise ConfigError(f"{name} has {len(values)} values but num_agents is {num_agents}: give one value, or one per"
                          " agent")
    return values


class AgentLinear(nn.Module):
    """One ``Dense`` layer per agent: ``weight [K, out, in]``, ``bias [K, out]`` (agent ``k``'s as ``nn.Linear``
    stores it); ``forward(x [K, ..., in]) -> [K, ..., out]``, one ``torch.baddbmm`` for all agents.

    ``init(in_dim, out_dim, bias)`` builds each agent's initial layer (:func:`xavier_linear` or
    :func:`lecun_linear`, flax's ``Dense`` inits), drawn in agent order; :meth:`stack` stacks given layers.
    """

    def __init__(self, num_agents: int, in_dim: int, out_dim: int, bias: bool = True,
                 init: Callable[..., nn.Linear] = xavier_linear, layers: Sequence[nn.Linear] | None = None):
        super().__init__()
        layers = list(layers) if layers is not None else [init(in_dim, out_dim, bias=bias) for _ in range(num_agents)]
        if len(layers) != num_agents:
            raise ValueError(f"AgentLinear: {len(layers)} layers for {num_agents} agents")
        self.num_agents, self.in_dim, self.out_dim = num_agents, in_dim, out_dim
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers])) if bias else None

    @classmethod
    def stack(cls, layers: Sequence[nn.Linear]) -> AgentLinear:
        """The agent-batched layer holding ``layers[k]`` as agent ``k``."""
        first = layers[0]
        return cls(len(layers), first.in_features, first.out_features, first.bias is not None, layers=layers)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(self.num_agents, -1, self.in_dim)
        if self.bias is None:
            out = torch.bmm(flat, self.weight.transpose(1, 2))
        else:
            out = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight.transpose(1, 2))
        return out.view(*x.shape[:-1], self.out_dim)

    def extra_repr(self) -> str:
        return f"agents={self.num_agents}, in={self.in_dim}, out={self.out_dim}, bias={self.bias is not None}"


class AgentLayerNorm(nn.Module):
    """``LayerNorm`` over the last dimension with a per-agent affine ``weight, bias [K, dim]`` (ones, zeros);
    ``x [K, ..., dim]``: the normalization for all agents at once, then each agent's ``bias + weight * x``."""

    def __init__(self, num_agents: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.num_agents, self.dim, self.eps = num_agents, dim, eps
        self.weight = nn.Parameter(torch.ones(num_agents, dim))
        self.bias = nn.Parameter(torch.zeros(num_agents, dim))

    def forward(self, x: Tensor) -> Tensor:
        shape = (self.num_agents, *([1] * (x.dim() - 2)), self.dim)
        return torch.addcmul(self.bias.view(shape), F.layer_norm(x, (self.dim,), eps=self.eps), self.weight.view(shape))


@torch.no_grad()
def ema_update_(target_params: Iterable[Tensor], source_params: Iterable[Tensor], rate: float) -> None:
    """Polyak/EMA update ``target <- (1 - rate) target + rate source``, all tensors in one foreach call
    (critic target: rate 0.005, IDQL_SPEC Sec. 1; behavior EMA: rate 0.001, Sec. 3)."""
    targets, sources = list(target_params), list(source_params)
    if len(targets) != len(sources):
        raise ValueError(f"ema_update_: {len(targets)} target tensors but {len(sources)} source tensors")
    if targets:
        torch._foreach_lerp_(targets, sources, rate)


def strip_dropout_(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Dropout`` inside ``module`` by ``nn.Identity`` (the state_dict is unchanged): the
    module then computes its eval-mode function whatever mode it is in (the EMA score net samples this way)."""
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(parent, name, nn.Identity())
    return module


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
    """The critic's Q pair (IDQL_SPEC Sec. 1) for each of ``K`` agents: independent ``MLP([s, a])`` of 2x256
    ReLU, all ``K x num_members`` of them one :class:`EnsembleMLP` (agent-major members).
    ``forward(s [K, B, S], a [K, B, A]) -> [K, num_members, B]``; every member of agent ``k`` reads agent
    ``k``'s rows."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: Sequence[int] = (256, 256), num_members: int = 2,
                 activation: str = "relu", num_agents: int = 1):
        super().__init__()
        self.num_agents, self.num_members = num_agents, num_members
        self.ensemble = EnsembleMLP(obs_dim + action_dim, hidden_dims, 1, num_agents * num_members, activation)

    def forward(self, states: Tensor, actions: Tensor) -> Tensor:
        x = torch.cat([states, actions], dim=-1)  # [K, B, S + A]
        k, b, d = x.shape
        members = x.unsqueeze(1).expand(k, self.num_members, b, d).reshape(k * self.num_members, b, d)
        return self.ensemble(members).view(k, self.num_members, b)


class FourierTimeEmbedding(nn.Module):
    """Learnable Fourier features of the step index (paper App. G; IDQL_SPEC Sec. 3): per agent ``W ~ N(0, 0.2^2)``
    of shape ``[fourier_dim/2, 1]`` (stored ``[K, fourier_dim/2, 1]``), ``[cos(2 pi k W), sin(2 pi k W)]`` (64
    dims), then ``Dense(time_dim) -> act -> Dense(time_dim)`` (128). ``k [K, ...]``; output
    ``[K, ..., time_dim]``."""

    def __init__(self, fourier_dim: int = 64, time_dim: int = 128, activation: str = "mish", num_agents: int = 1):
        super().__init__()
        if fourier_dim % 2:
            raise ConfigError(f"fourier_dim must be even (got {fourier_dim})")
        self.num_agents = num_agents
        self.kernel = nn.Parameter(torch.stack([torch.randn(fourier_dim // 2, 1) * 0.2 for _ in range(num_agents)]))
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

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int, time_dim: int = 128, fourier_dim: int = 64,
                 activation: str = "mish", num_timesteps: int | None = None, num_agents: int = 1):
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
        """The time block of the first Dense on ``time_emb(k)``: ``[K, ..., H]`` for ``k [K, ...]``, ``[K, H]``
        for an int. Integer ``k`` tensors read :meth:`time_table` when ``num_timesteps`` is set (T rows
        embedded per agent, not B)."""
        if isinstance(k, int):
            if self.num_timesteps is not None:
                return self.time_table()[:, k]
            k = torch.full((self.num_agents,), k, device=self.in_time.weight.device)
        if self.num_timesteps is not None and not k.is_floating_point():
            agent = torch.arange(self.num_agents, device=k.device).view(self.num_agents, *([1] * (k.dim() - 1)))
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
        super().__init__(obs_dim, action_dim, hidden_dim, time_dim, fourier_dim, activation, num_timesteps, num_agents)
        self.blocks = nn.Sequential(*(ResidualBlock(hidden_dim, ff_dim, dropout, activation, num_agents)
                                      for _ in range(num_blocks)))
        self.out_act = make_activation(activation)
        self.out = AgentLinear(num_agents, hidden_dim, action_dim)

    def trunk(self, h: Tensor) -> Tensor:
        return self.out(self.out_act(self.blocks(h)))


class MLPScoreNet(ScoreNet):
    """Plain-MLP score network (the paper's Fig. 3 baseline): ``Dense(H)`` on ``concat[x, s, time_emb]`` -> act,
    ``num_layers - 1`` more ``Dense(H) -> act``, then ``Dense(action_dim)``; no LayerNorm, no dropout."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int = 256, num_layers: int = 3,
                 activation: str = "mish", time_dim: int = 128, fourier_dim: int = 64,
                 num_timesteps: int | None = None, num_agents: int = 1):
        super().__init__(obs_dim, action_dim, hidden_dim, time_dim, fourier_dim, activation, num_timesteps, num_agents)
        self.act = make_activation(activation)
        self.rest = AgentMLP(hidden_dim, [hidden_dim] * (num_layers - 1), action_dim, activation=activation,
                             num_agents=num_agents)

    def trunk(self, h: Tensor) -> Tensor:
        return self.rest(self.act(h))


__all__ = [
    "ACTIVATIONS",
    "MLP",
    "AgentLayerNorm",
    "AgentLinear",
    "AgentMLP",
    "EnsembleMLP",
    "FourierTimeEmbedding",
    "LNResNet",
    "MLPScoreNet",
    "Mish",
    "ResidualBlock",
    "ScoreNet",
    "TwinQ",
    "build_agents",
    "ema_update_",
    "lecun_linear",
    "make_activation",
    "per_agent",
    "strip_dropout_",
    "xavier_linear",
]

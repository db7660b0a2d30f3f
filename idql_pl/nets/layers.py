"""The building blocks every network of the project is made of, for ``K`` agents at once.

Every network of the critic and the behavior model holds ``num_agents = K`` independent copies (K seeds or K
hyperparameter settings trained in one process): each parameter has a leading agent dimension, inputs and
outputs are ``[K, ...]``, and each layer is one batched matmul for all agents (:class:`AgentLinear`,
:class:`AgentLayerNorm`). ``K = 1`` is the ordinary single run; :func:`build_agents` initializes agent ``k``
as a single run seeded ``seed + k``. Initialization follows the reference code's flax defaults
(xavier-uniform, or LeCun-normal, zero biases); :func:`ema_update_` is the Polyak/EMA update of the target Q
and of the score network's EMA copy.
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
    """``build(num_agents)`` with each agent initialized as its own single run (seed everything,
    paper App. D).

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
        raise ConfigError(f"{name} has {len(values)} values but num_agents is {num_agents}: give one value,"
                          " or one per agent")
    return values


class AgentLinear(nn.Module):
    """One ``Dense`` layer per agent: ``weight [K, out, in]``, ``bias [K, out]`` (agent ``k``'s as
    ``nn.Linear`` stores it); ``forward(x [K, ..., in]) -> [K, ..., out]``, one ``torch.baddbmm`` for all
    agents.

    ``init(in_dim, out_dim, bias)`` builds each agent's initial layer (:func:`xavier_linear` or
    :func:`lecun_linear`, flax's ``Dense`` inits), drawn in agent order; :meth:`stack` stacks given layers.
    """

    def __init__(self, num_agents: int, in_dim: int, out_dim: int, bias: bool = True,
                 init: Callable[..., nn.Linear] = xavier_linear, layers: Sequence[nn.Linear] | None = None):
        super().__init__()
        layers = list(layers) if layers is not None else [init(in_dim, out_dim, bias=bias)
                                                          for _ in range(num_agents)]
        if len(layers) != num_agents:
            raise ValueError(f"AgentLinear: {len(layers)} layers for {num_agents} agents")
        self.num_agents, self.in_dim, self.out_dim = num_agents, in_dim, out_dim
        # [K, out, in], laid out as autograd lays out the gradient of ``x @ weight^T`` (as EnsembleMLP's
        # weights are): they differ only in the stride of a size-1 dim (out_dim 1), which DDP's gradient
        # buckets check
        weight = torch.stack([layer.weight.detach().T for layer in layers]).transpose(1, 2).contiguous()
        self.weight = nn.Parameter(weight)
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
        return torch.addcmul(self.bias.view(shape), F.layer_norm(x, (self.dim,), eps=self.eps),
                             self.weight.view(shape))


@torch.no_grad()
def ema_update_(target_params: Iterable[Tensor], source_params: Iterable[Tensor], rate: float) -> None:
    """Polyak/EMA update ``target <- (1 - rate) target + rate source``, all tensors in one foreach call
    (critic target: rate 0.005, docs/fidelity.md §1; behavior EMA: rate 0.001, Sec. 3)."""
    targets, sources = list(target_params), list(source_params)
    if len(targets) != len(sources):
        raise ValueError(f"ema_update_: {len(targets)} target tensors but {len(sources)} source tensors")
    if targets:
        torch._foreach_lerp_(targets, sources, rate)


def strip_dropout_(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Dropout`` inside ``module`` by ``nn.Identity`` (the state_dict is unchanged): the
    module then computes its eval-mode function whatever mode it is in (the EMA score net samples this
    way)."""
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(parent, name, nn.Identity())
    return module

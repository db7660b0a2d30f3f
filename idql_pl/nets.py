"""Networks, as the paper draws them (App. G; IDQL_SPEC Sec. 1, 3), in standard PyTorch.

- :class:`MLP` and :class:`TwinQ`: the critic's ``V(s)`` and ``Q1, Q2(s, a)``, 2x256 ReLU MLPs. The two Q nets
  are one :class:`EnsembleMLP` (stacked weights, one ``torch.baddbmm`` per layer for both members).
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
from collections.abc import Iterable, Sequence

import torch
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


def lecun_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """``nn.Linear`` with flax's default ``Dense`` init: truncated normal of variance 1/fan_in, zero bias."""
    linear = nn.Linear(in_dim, out_dim)
    std = math.sqrt(1.0 / in_dim) / 0.87962566103423978  # the truncation at 2 std shrinks the variance
    nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(linear.bias)
    return linear


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
    """The critic's Q pair (IDQL_SPEC Sec. 1): two independent ``MLP([s, a])`` of 2x256 ReLU;
    ``forward(s [B, S], a [B, A]) -> [2, B]``."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: Sequence[int] = (256, 256), num_members: int = 2,
                 activation: str = "relu"):
        super().__init__()
        self.ensemble = EnsembleMLP(obs_dim + action_dim, hidden_dims, 1, num_members, activation)

    def forward(self, states: Tensor, actions: Tensor) -> Tensor:
        return self.ensemble(torch.cat([states, actions], dim=-1)).squeeze(-1)


class FourierTimeEmbedding(nn.Module):
    """Learnable Fourier features of the step index (paper App. G; IDQL_SPEC Sec. 3): ``W ~ N(0, 0.2^2)`` of
    shape ``[fourier_dim/2, 1]``, ``[cos(2 pi k W), sin(2 pi k W)]`` (64 dims), then
    ``Dense(time_dim) -> act -> Dense(time_dim)`` (128). ``k``: any shape; output ``[*k.shape, time_dim]``."""

    def __init__(self, fourier_dim: int = 64, time_dim: int = 128, activation: str = "mish"):
        super().__init__()
        if fourier_dim % 2:
            raise ConfigError(f"fourier_dim must be even (got {fourier_dim})")
        self.kernel = nn.Parameter(torch.randn(fourier_dim // 2, 1) * 0.2)
        self.mlp = MLP(fourier_dim, [time_dim], time_dim, activation=activation)

    def forward(self, k: Tensor) -> Tensor:
        f = (2 * math.pi) * k.to(self.kernel.dtype).unsqueeze(-1) * self.kernel.squeeze(-1)
        return self.mlp(torch.cat([torch.cos(f), torch.sin(f)], dim=-1))


class ScoreNet(nn.Module):
    """Noise predictor ``eps_hat(x, k, s)``: a first ``Dense(hidden_dim)`` on ``concat[x, s, time_emb(k)]``
    (paper App. G), then :meth:`trunk`.

    The first Dense is stored as its three column blocks (``in_action``, ``in_state``, ``in_time``; one
    xavier init over the whole concatenation), which is the same function, so callers can project each state
    once and reuse it over the N candidates and T steps of the sampler:
    ``forward(x, k, s) == forward_parts(x, project_state(s), project_time(k))``. Leading dimensions
    broadcast (``x [B, N, A]`` with ``state_proj [B, 1, H]``).
    """

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int, time_dim: int = 128, fourier_dim: int = 64,
                 activation: str = "mish", num_timesteps: int | None = None):
        super().__init__()
        self.obs_dim, self.action_dim, self.hidden_dim = obs_dim, action_dim, hidden_dim
        self.num_timesteps = num_timesteps
        self.time_embedding = FourierTimeEmbedding(fourier_dim, time_dim, activation)
        full = xavier_linear(action_dim + obs_dim + time_dim, hidden_dim)
        self.in_action = nn.Linear(action_dim, hidden_dim)
        self.in_state = nn.Linear(obs_dim, hidden_dim, bias=False)
        self.in_time = nn.Linear(time_dim, hidden_dim, bias=False)
        with torch.no_grad():
            w_action, w_state, w_time = full.weight.split([action_dim, obs_dim, time_dim], dim=1)
            self.in_action.weight.copy_(w_action)
            self.in_action.bias.zero_()
            self.in_state.weight.copy_(w_state)
            self.in_time.weight.copy_(w_time)

    def project_state(self, states: Tensor) -> Tensor:
        """The state block of the first Dense: ``[..., S] -> [..., H]`` (once per state)."""
        return self.in_state(states)

    def project_time(self, k: int | Tensor) -> Tensor:
        """The time block of the first Dense on ``time_emb(k)``: ``[*k.shape, H]`` (``[H]`` for an int). Integer
        ``k`` tensors read :meth:`time_table` when ``num_timesteps`` is set (T rows embedded, not B)."""
        if isinstance(k, int):
            k = torch.tensor(k, device=self.in_time.weight.device)
        if self.num_timesteps is not None and not k.is_floating_point():
            return self.time_table()[k]
        return self.in_time(self.time_embedding(k))

    def time_table(self) -> Tensor:
        """``project_time(k)`` for every ``k`` in ``0..num_timesteps-1``: ``[T, H]``."""
        steps = torch.arange(self.num_timesteps, device=self.in_time.weight.device)
        return self.in_time(self.time_embedding(steps))

    def forward_parts(self, x: Tensor, state_proj: Tensor, time_proj: Tensor) -> Tensor:
        return self.trunk(self.in_action(x) + state_proj + time_proj)

    def forward(self, x: Tensor, k: int | Tensor, states: Tensor) -> Tensor:
        return self.forward_parts(x, self.project_state(states), self.project_time(k))

    def trunk(self, h: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ResidualBlock(nn.Module):
    """``x + Dense(H)(act(Dense(ff)(LayerNorm(Dropout(x)))))`` (paper App. G; reference ``MLPResNetV3Block``)."""

    def __init__(self, hidden_dim: int, ff_dim: int, dropout: float, activation: str):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.fc1 = lecun_linear(hidden_dim, ff_dim)
        self.act = make_activation(activation)
        self.fc2 = lecun_linear(ff_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(self.dropout(x)))))


class LNResNet(ScoreNet):
    """The paper's "LN_Resnet" score network (App. G): ``Dense(H)`` on ``concat[x, s, time_emb]`` ->
    ``num_blocks`` residual blocks -> act -> ``Dense(action_dim)``. Defaults: H 256, ff 1024, 3 blocks,
    dropout 0.1, mish."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int = 256, num_blocks: int = 3,
                 ff_dim: int = 1024, dropout: float = 0.1, activation: str = "mish", time_dim: int = 128,
                 fourier_dim: int = 64, num_timesteps: int | None = None):
        super().__init__(obs_dim, action_dim, hidden_dim, time_dim, fourier_dim, activation, num_timesteps)
        self.blocks = nn.Sequential(*(ResidualBlock(hidden_dim, ff_dim, dropout, activation) for _ in range(num_blocks)))
        self.out_act = make_activation(activation)
        self.out = xavier_linear(hidden_dim, action_dim)

    def trunk(self, h: Tensor) -> Tensor:
        return self.out(self.out_act(self.blocks(h)))


class MLPScoreNet(ScoreNet):
    """Plain-MLP score network (the paper's Fig. 3 baseline): ``Dense(H)`` on ``concat[x, s, time_emb]`` -> act,
    ``num_layers - 1`` more ``Dense(H) -> act``, then ``Dense(action_dim)``; no LayerNorm, no dropout."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int = 256, num_layers: int = 3,
                 activation: str = "mish", time_dim: int = 128, fourier_dim: int = 64,
                 num_timesteps: int | None = None):
        super().__init__(obs_dim, action_dim, hidden_dim, time_dim, fourier_dim, activation, num_timesteps)
        self.act = make_activation(activation)
        self.rest = MLP(hidden_dim, [hidden_dim] * (num_layers - 1), action_dim, activation=activation)

    def trunk(self, h: Tensor) -> Tensor:
        return self.rest(self.act(h))


__all__ = [
    "ACTIVATIONS",
    "MLP",
    "EnsembleMLP",
    "FourierTimeEmbedding",
    "LNResNet",
    "MLPScoreNet",
    "Mish",
    "ResidualBlock",
    "ScoreNet",
    "TwinQ",
    "ema_update_",
    "lecun_linear",
    "make_activation",
    "strip_dropout_",
    "xavier_linear",
]

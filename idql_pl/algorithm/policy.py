"""One trained IDQL agent as a module of plain torch operations, for export (paper Alg. 2 with the Eq. 5
sampler).

:class:`StandalonePolicy` holds copies of one agent's tensors (the behavior model's EMA score network, the
target twin Q and V) and maps observations ``[B, obs_dim]`` (float32) to actions ``[B, action_dim]`` in
``[-clip, clip]``: ``N`` candidates per state from the T-step reverse diffusion (Eq. 5), scored by
``min(Q1_target, Q2_target)``, then the argmax (Eq. 13) or one candidate resampled with probability
``w / sum(w)`` (the implicit-actor weights of Eq. 8-12). It runs the same operations in the same order as
:meth:`idql_pl.models.idql.IDQL.act` (agent-batched matmuls with one agent), so given the same noise it
returns the same actions, bit for bit.

It is written in the subset of Python that both ``torch.export`` and ``torch.jit.script`` accept, and it uses
no idql_pl code at run time, so an exported file loads and acts with torch alone. Noise comes from torch's
global generator: ``torch.manual_seed(s)`` before a call makes its actions reproducible (the same as
``IDQL.act``'s after the same seed). :meth:`StandalonePolicy.from_model` builds it from a trained model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idql_pl.errors import ConfigError

EXTRACTIONS = ("argmax", "implicit")
VALUE_LOSSES = ("expectile", "quantile", "exponential")
WEIGHT_EPS = 1e-6  # as idql_pl.algorithm.losses.WEIGHT_EPS


def activate(x: Tensor, name: str) -> Tensor:
    """The activation ``name`` (the score network's, App. G; the critic's ReLU), as :mod:`idql_pl.nets`
    computes it (mish through ``tanh(softplus(x)) = n / (2 - n)``, ``n = s (2 - s)``, ``s = sigmoid(x)``)."""
    if name == "mish":
        s = torch.sigmoid(x)
        n = s * (2 - s)
        return x * n / (2 - n)
    if name == "relu":
        return torch.relu(x)
    if name == "swish" or name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "tanh":
        return torch.tanh(x)
    return F.elu(x)


def implicit_log_weights(u: Tensor, kind: str, param: Tensor, eps: float = WEIGHT_EPS) -> Tensor:
    """``log w(u)``, ``w = |f'(u)| / |u|`` (Eq. 8): expectile Eq. 9, quantile Eq. 10, exponential Eq. 12; the
    same computation as :func:`idql_pl.algorithm.losses.implicit_log_weights` with a tensor ``param``."""
    if kind == "expectile":
        return torch.log(torch.where(u < 0, 1.0 - param, param).to(u.dtype))
    if kind == "quantile":
        return torch.log(torch.where(u < 0, 1.0 - param, param).to(u.dtype)) - u.abs().clamp(min=eps).log()
    small = u.abs() < eps
    u_safe = torch.where(small, torch.ones_like(u), u)
    au = param * u_safe
    log_abs_expm1 = torch.log(-torch.expm1(-au.abs())) + au.clamp(min=0)
    log_w = torch.log(param) + log_abs_expm1 - u_safe.abs().log()
    limit = 2.0 * torch.log(param) + torch.log1p(param * u / 2.0)
    return torch.where(small, limit, log_w)


class Dense(nn.Module):
    """``M`` stacked Dense layers (``weight [M, out, in]``, ``bias [M, out]``):
    ``x [M, ..., in] -> [M, ..., out]`` with one ``baddbmm``, as :class:`~idql_pl.nets.AgentLinear` and
    :class:`~idql_pl.nets.EnsembleMLP` do."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.members, self.out_dim, self.in_dim = (int(d) for d in weight.shape)
        self.has_bias = bias is not None
        self.register_buffer("weight", weight.detach().clone().float())
        self.register_buffer("bias", bias.detach().clone().float() if bias is not None else torch.zeros(0))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(self.members, -1, self.in_dim)
        if self.has_bias:
            out = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight.transpose(1, 2))
        else:
            out = torch.bmm(flat, self.weight.transpose(1, 2))
        return out.view(list(x.shape[:-1]) + [self.out_dim])


class MLPStack(nn.Module):
    """``Dense -> act -> ... -> Dense``: the critic's V and twin Q, the score network's head."""

    def __init__(self, layers: list[Dense], activation: str):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.activation = activation
        self.last = len(layers) - 1

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.last:
                x = activate(x, self.activation)
        return x


class ResidualBlock(nn.Module):
    """``x + Dense(act(Dense(LayerNorm(x))))``, the LN-ResNet block (App. G; dropout is off in the EMA
    net)."""

    def __init__(self, norm_weight: Tensor, norm_bias: Tensor, eps: float, fc1: Dense, fc2: Dense,
                 activation: str):
        super().__init__()
        self.dim, self.eps, self.activation = int(norm_weight.shape[-1]), float(eps), activation
        self.register_buffer("norm_weight", norm_weight.detach().clone().float())
        self.register_buffer("norm_bias", norm_bias.detach().clone().float())
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x: Tensor) -> Tensor:
        shape = [1] * (x.dim() - 1) + [self.dim]
        h = torch.addcmul(self.norm_bias.view(shape), F.layer_norm(x, [self.dim], None, None, self.eps),
                          self.norm_weight.view(shape))
        return x + self.fc2(activate(self.fc1(h), self.activation))


class StandalonePolicy(nn.Module):
    """One agent's policy (Alg. 2): ``forward(obs [B, obs_dim]) -> actions [B, action_dim]``, float32.

    1. Candidates (Eq. 5): ``x_T ~ N(0, I)`` of shape ``[1, B, N, A]``; for ``k = T-1..0``
       ``x <- (x - beta_k / sqrt(1 - alpha_bar_k) eps_hat(x, k, s)) / sqrt(alpha_k)``, plus ``sqrt(beta_k) z``
       when ``k > 0``, clipped to ``[-clip, clip]`` after every step; ``eps_hat`` is the EMA score network.
    2. Scores ``min(Q1_target, Q2_target)(s, a)`` of every candidate.
    3. ``extraction="argmax"``: the best candidate (Eq. 13); ``"implicit"``: one candidate drawn with
       probability ``w / sum(w)``, ``log w`` the implicit-actor weights of ``u = Q - V(s)`` (Eq. 8-12).

    Noise (``randn`` for ``x_T`` and each step's ``z``, ``multinomial`` for the implicit draw) comes from the
    global generator, in the order ``IDQL.act`` draws it.
    """

    def __init__(self, *, obs_dim: int, action_dim: int, num_samples: int, extraction: str, state_proj: Dense,
                 action_proj: Dense, time_proj: Tensor, blocks: list[ResidualBlock], head: MLPStack,
                 activation: str, coefficients: list[tuple[float, float, float]], clip: float,
                 q_target: MLPStack, v: MLPStack, value_loss: str, loss_param: float):
        super().__init__()
        if extraction not in EXTRACTIONS:
            raise ConfigError(f"unknown extraction {extraction!r}: use one of {', '.join(EXTRACTIONS)}")
        if value_loss not in VALUE_LOSSES:
            raise ConfigError(f"unknown value_loss {value_loss!r}: use one of {', '.join(VALUE_LOSSES)}")
        if int(num_samples) < 1:
            raise ConfigError(f"num_samples must be >= 1 (got {num_samples}); the paper uses 32-128")
        self.obs_dim, self.action_dim, self.num_samples = int(obs_dim), int(action_dim), int(num_samples)
        self.extraction, self.activation, self.value_loss = extraction, activation, value_loss
        self.T = len(coefficients)
        self.inv_sqrt_alpha = [float(c[0]) for c in coefficients]
        self.eps_coef = [float(c[1]) for c in coefficients]
        self.sigma = [float(c[2]) for c in coefficients]
        self.clip = float(clip)
        self.state_proj, self.action_proj = state_proj, action_proj
        # time_proj[k]: the time block of the first Dense on time_emb(k), [T, 1, 1, 1, H]
        self.register_buffer("time_proj", time_proj.detach().clone().float().reshape(self.T, 1, 1, 1, -1))
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.q_target, self.v = q_target, v
        self.register_buffer("loss_param", torch.full((1, 1, 1), float(loss_param)))

    def denoise(self, x: Tensor, state_proj: Tensor, k: int) -> Tensor:
        """``eps_hat(x, k, s)`` of the EMA score network (App. G), the state block ``state_proj`` given."""
        h = self.action_proj(x) + state_proj + self.time_proj[k]
        for block in self.blocks:
            h = block(h)
        return self.head(activate(h, self.activation))

    def candidates(self, states: Tensor) -> Tensor:
        """``N`` samples of the behavior model per state (Eq. 5): ``states [1, B, S] -> [1, B, N, A]``."""
        state_proj = self.state_proj(states).unsqueeze(2)
        x = torch.randn([1, states.shape[1], self.num_samples, self.action_dim], dtype=states.dtype,
                        device=states.device)
        for i in range(self.T):
            k = self.T - 1 - i
            x = torch.add(x, self.denoise(x, state_proj, k),
                          alpha=-self.eps_coef[k]).mul_(self.inv_sqrt_alpha[k])
            if k > 0:
                x.add_(torch.randn(x.shape, dtype=x.dtype, device=x.device), alpha=self.sigma[k])
            x.clamp_(-self.clip, self.clip)
        return x

    def forward(self, obs: Tensor) -> Tensor:
        if obs.dim() != 2 or obs.shape[1] != self.obs_dim:
            raise ValueError(f"the policy takes observations of shape [batch, {self.obs_dim}]")
        states = obs.to(torch.float32).unsqueeze(0)  # [1, B, S]: one agent
        batch, n, obs_dim, action_dim = states.shape[1], self.num_samples, self.obs_dim, self.action_dim
        x = self.candidates(states)
        flat_states = states.unsqueeze(2).expand(1, batch, n, obs_dim).reshape(1, -1, obs_dim)
        sa = torch.cat([flat_states, x.reshape(1, -1, action_dim)], dim=-1)  # [1, B N, S + A]
        pair = sa.unsqueeze(1).expand(1, 2, batch * n, obs_dim + action_dim).reshape(2, batch * n, -1)
        q = self.q_target(pair).view(1, 2, batch * n).amin(dim=1).view(1, batch, n)
        if self.extraction == "argmax":
            index = q.argmax(dim=-1)
        else:
            u = q - self.v(states).squeeze(-1).unsqueeze(-1)
            probs = torch.softmax(implicit_log_weights(u, self.value_loss, self.loss_param), dim=-1)
            index = torch.multinomial(probs.view(-1, n), 1).view(1, batch)
        picked = index.view(batch, 1, 1).expand(batch, 1, action_dim)
        return torch.gather(x.view(batch, n, action_dim), 1, picked).view(batch, action_dim)

    # ------------------------------------------------------------------------------------- building
    @classmethod
    def from_model(cls, model: Any, agent: int = 0, num_samples: int | None = None,
                   extraction: str | None = None) -> StandalonePolicy:
        """Agent ``agent``'s policy from a trained model with a diffusion ``behavior`` and a ``critic`` (IDQL,
        OnlineIDQL): copies of its tensors, the model's own ``num_samples`` and ``extraction`` unless
        given."""
        behavior, critic = getattr(model, "behavior", None), getattr(model, "critic", None)
        if behavior is None or not hasattr(behavior, "ema_net") or critic is None \
                or not hasattr(critic, "q_target_net"):
            raise ConfigError(f"{type(model).__name__} is not a model with a diffusion behavior and a critic"
                              " (IDQL): only those can be exported as a policy")
        agents = int(getattr(model, "num_agents", 1))
        if not 0 <= agent < agents:
            raise ConfigError(f"the model holds {agents} agent(s):"
                              f" the agent must lie in 0..{agents - 1} (got {agent})")
        hp = model.hparams
        if num_samples is None:
            own = hp.get("num_samples", 128)
            num_samples = int(own[agent]) if isinstance(own, list | tuple) else int(own)
        net = behavior.ema_net

        def dense(layer: Any, members: int = 1) -> Dense:
            rows = slice(agent * members, (agent + 1) * members)
            bias = getattr(layer, "bias", None)
            return Dense(layer.weight[rows], None if bias is None else bias[rows])

        with torch.no_grad():
            time_proj = net.time_table()[agent]  # [T, H], as the model computes it for all agents
        score_act = activation_name(net.out_act if hasattr(net, "out_act") else net.act)
        if hasattr(net, "blocks"):  # LNResNet
            blocks = [ResidualBlock(b.norm.weight[agent : agent + 1], b.norm.bias[agent : agent + 1],
                                    b.norm.eps, dense(b.fc1), dense(b.fc2), activation_name(b.act))
                      for b in net.blocks]
            head = MLPStack([dense(net.out)], score_act)
        else:  # MLPScoreNet: act, then Dense -> act -> ... -> Dense
            blocks = []
            head = MLPStack([dense(m) for m in net.rest.net if hasattr(m, "weight")], score_act)
        ensemble = critic.q_target_net.ensemble
        members = int(critic.q_target_net.num_members)
        q_target = MLPStack([Dense(w[agent * members : (agent + 1) * members],
                                   b[agent * members : (agent + 1) * members])
                             for w, b in zip(ensemble.weights, ensemble.biases, strict=True)],
                            activation_name(ensemble.act))
        v_layers = [m for m in critic.v_net.net if hasattr(m, "weight")]
        v_act = next((activation_name(m) for m in critic.v_net.net if not hasattr(m, "weight")), "relu")
        return cls(
            obs_dim=int(hp.obs_dim), action_dim=int(hp.action_dim), num_samples=int(num_samples),
            extraction=extraction or hp.get("extraction", "argmax"), state_proj=dense(net.in_state),
            action_proj=dense(net.in_action), time_proj=time_proj, blocks=blocks, head=head,
            activation=score_act, coefficients=list(behavior._reverse_coefs),
            clip=float(behavior.hparams.clip_actions), q_target=q_target,
            v=MLPStack([dense(m) for m in v_layers], v_act), value_loss=critic.hparams.value_loss,
            loss_param=critic.loss_param_of(agent),
        )


def activation_name(module: nn.Module) -> str:
    """The :func:`activate` name of an activation module of :mod:`idql_pl.nets`."""
    names = {"Mish": "mish", "SiLU": "silu", "ReLU": "relu", "GELU": "gelu", "Tanh": "tanh", "ELU": "elu"}
    name = names.get(type(module).__name__)
    if name is None or (name == "gelu" and getattr(module, "approximate", "none") != "none") or (
            name == "elu" and getattr(module, "alpha", 1.0) != 1.0):
        raise ConfigError(f"cannot export the activation {module!r}: use one of mish, swish, relu,"
                          " gelu, tanh, elu")
    return name

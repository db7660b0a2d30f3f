"""The networks, as the paper draws them (App. G), in standard PyTorch, for ``K`` agents at once:
:mod:`~idql_pl.nets.layers` (agent-batched Dense and LayerNorm, initialization, EMA), :mod:`~idql_pl.nets.mlp`
(the critic's V and twin Q), :mod:`~idql_pl.nets.score` (the diffusion score network)."""

from idql_pl.nets.layers import (
    ACTIVATIONS,
    AgentLayerNorm,
    AgentLinear,
    Mish,
    build_agents,
    ema_update_,
    lecun_linear,
    make_activation,
    per_agent,
    strip_dropout_,
    xavier_linear,
)
from idql_pl.nets.mlp import MLP, AgentMLP, EnsembleMLP, TwinQ
from idql_pl.nets.score import FourierTimeEmbedding, LNResNet, MLPScoreNet, ResidualBlock, ScoreNet

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

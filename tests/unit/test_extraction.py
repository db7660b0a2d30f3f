"""Reweighting extraction (Alg. 2, Eq. 13): argmax picks the best-scored candidate; implicit resampling
follows w / sum(w); outputs are float32 and one per state."""

from __future__ import annotations

import pytest
import torch

from idql_pl.algorithm.extraction import extract_actions
from idql_pl.algorithm.losses import implicit_weights
from idql_pl.errors import ConfigError


class FixedCandidates:
    """A behavior model whose N candidates per state are fixed points 0..N-1 on the first action axis."""

    def sample(self, states, num_samples=1, generator=None):
        cand = torch.zeros(1, states.shape[-2], num_samples, 2)  # one agent
        cand[..., 0] = torch.arange(num_samples, dtype=torch.float32) / num_samples
        return cand


class QuadraticCritic:
    """Q peaks at a = 0.5 on the first axis; V = 0."""

    def q_target(self, states, actions):
        return -(actions[..., 0] - 0.5) ** 2

    def v(self, states):
        return torch.full(states.shape[:-1], -0.05)


def test_argmax_picks_the_best_candidate_for_every_state():
    states = torch.randn(7, 3)
    actions = extract_actions(FixedCandidates(), QuadraticCritic(), states, num_samples=10)
    assert actions.shape == (1, 7, 2) and actions.dtype == torch.float32  # [agents, B, A]
    assert torch.all(actions[..., 0] == 0.5)


@pytest.mark.parametrize("kind, param", [("expectile", 0.9), ("quantile", 0.8), ("exponential", 2.0)])
def test_implicit_resampling_follows_the_normalized_weights(kind, param):
    n, draws = 8, 40_000
    states = torch.zeros(draws, 1)
    gen = torch.Generator().manual_seed(0)
    actions = extract_actions(FixedCandidates(), QuadraticCritic(), states, num_samples=n,
                              extraction="implicit", value_loss=kind, loss_param=param, generator=gen)
    picked = torch.round(actions[0, :, 0] * n).long()
    freq = torch.bincount(picked, minlength=n).float() / draws
    cand = torch.arange(n, dtype=torch.float32) / n
    u = -(cand - 0.5) ** 2 + 0.05
    w = implicit_weights(u, kind, param)
    assert torch.allclose(freq, w / w.sum(), atol=0.01)


def test_invalid_extraction_is_a_config_error():
    with pytest.raises(ConfigError, match="extraction"):
        extract_actions(FixedCandidates(), QuadraticCritic(), torch.zeros(1, 1), 4, extraction="softmax")
    with pytest.raises(ConfigError, match="num_samples"):
        extract_actions(FixedCandidates(), QuadraticCritic(), torch.zeros(1, 1), 0)


class NearSixty:
    """Four candidates per state whose Q values, ``60 + a_0``, lie 0.07-0.2 apart: closer than bf16's
    resolution at 60 (0.25), where Q values of locomotion critics live."""

    CANDIDATES = (0.30, 0.20, 0.37, 0.10)  # the best: index 2 (Q 60.37)

    def __init__(self) -> None:
        self.q = torch.nn.Linear(2, 1)
        with torch.no_grad():
            self.q.weight.copy_(torch.tensor([[1.0, 0.0]]))
            self.q.bias.fill_(60.0)

    def sample(self, states, num_samples=4, generator=None):
        cand = torch.zeros(1, states.shape[-2], num_samples, 2)
        cand[..., 0] = torch.tensor(self.CANDIDATES)
        return cand

    def q_target(self, states, actions):
        return self.q(actions).squeeze(-1)

    def v(self, states):
        return torch.full(states.shape[:-1], 60.0)


def test_candidates_are_scored_in_float32_under_bf16_sampling():
    """bf16 is for the behavior sampler only: Q values are computed in float32, so the argmax picks what it
    picks in float32 (under bf16 scoring, 60.20 / 60.30 / 60.37 all round to 60.25 and index 0 would win)."""
    model = NearSixty()
    states = torch.zeros(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what bf16 scoring would compute
        assert model.q_target(states, model.sample(states)).argmax(-1).unique().tolist() == [0]
    for precision in ("32", "bf16"):
        actions = extract_actions(model, model, states, num_samples=4, precision=precision)
        assert torch.all(actions[..., 0] == torch.tensor(0.37)), precision

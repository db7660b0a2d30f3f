"""Reweighting extraction (Alg. 2, Eq. 13): argmax picks the best-scored candidate; implicit resampling
follows w / sum(w); outputs are float32 and one per state."""

from __future__ import annotations

import pytest
import torch

from idql_pl.errors import ConfigError
from idql_pl.losses import implicit_weights
from idql_pl.sampler import extract_actions


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
    actions = extract_actions(FixedCandidates(), QuadraticCritic(), states, num_samples=n, extraction="implicit",
                              value_loss=kind, loss_param=param, generator=gen)
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

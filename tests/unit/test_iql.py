"""IQL baseline: AWR weights (IDQL Eq. 3 / IQL Eq. 7), the Gaussian actor, the CLI fit + evaluation with each
IQL config, exact resume, and diffusion BC (the behavior model alone) through the CLI."""

from __future__ import annotations

import math

import pytest
import torch

from idql_pl import IQL, ImplicitCritic
from idql_pl.data.buffer import TransitionBuffer
from idql_pl.errors import ConfigError
from idql_pl.models.iql import EXP_ADV_MAX, GaussianActor, awr_loss, awr_weights
from tests.helpers import random_transitions

TINY_IQL = ["--model.critic.hidden_dims", "[32, 32]", "--model.critic.batch_size", "32",
            "--model.actor_hidden_dims", "[32, 32]"]


# ---------------------------------------------------------------------------------------------- AWR
def test_awr_weights_are_exp_beta_adv_clipped_at_100():
    adv = torch.tensor([-2.0, -0.1, 0.0, 0.3, 1.0, 1.5, 50.0, 1e6])
    w = awr_weights(adv, beta=3.0)
    expected = torch.exp(3.0 * adv).clamp(max=100.0)
    assert torch.allclose(w, expected, rtol=1e-6)
    assert EXP_ADV_MAX == 100.0 and w.max() == 100.0 and torch.isfinite(w).all()
    assert w[3] == pytest.approx(math.exp(0.9)) and w[0] == pytest.approx(math.exp(-6.0))
    assert awr_weights(torch.tensor([0.4]), beta=10.0).item() == pytest.approx(math.exp(4.0))  # antmaze beta
    assert awr_weights(torch.tensor([0.5]), beta=10.0).item() == 100.0  # exp(5) = 148 is clipped
    assert awr_weights(torch.tensor([0.4]), beta=10.0, max_weight=20.0).item() == 20.0
    assert torch.equal(awr_weights(adv, beta=0.0), torch.ones_like(adv))  # beta 0: plain behavior cloning


def test_awr_loss_weights_the_log_likelihood_and_trains_only_the_actor():
    torch.manual_seed(0)
    buf = TransitionBuffer(random_transitions(200, obs_dim=5, action_dim=2), seed=0)
    critic, actor = ImplicitCritic(5, 2, hidden_dims=(16, 16)), GaussianActor(5, 2, (16, 16))
    batch = buf.sample(64)
    loss, weights, adv = awr_loss(actor, critic, batch, beta=3.0)
    with torch.no_grad():
        s, a = batch.observations[None], batch.actions[None]  # the critic's one agent
        adv_ref = (critic.q_target_net(s, a).amin(1) - critic.v_net(s)[..., 0])[0]
        mean, log_std = actor(batch.observations)
        logp = torch.distributions.Normal(mean, log_std.exp()).log_prob(batch.actions).sum(-1)
    assert torch.allclose(adv, adv_ref, atol=1e-6)
    assert torch.allclose(weights, torch.exp(3.0 * adv_ref).clamp(max=100.0), rtol=1e-5)
    assert loss.item() == pytest.approx(-(weights * logp).mean().item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in actor.parameters())
    assert all(p.grad is None for p in critic.parameters())


@pytest.mark.parametrize("state_dependent_std", [False, True])
def test_gaussian_actor_mean_in_range_log_std_clipped(state_dependent_std):
    torch.manual_seed(0)
    actor = GaussianActor(3, 2, (16, 16), state_dependent_std=state_dependent_std)
    states = 100 * torch.randn(50, 3)
    mean, log_std = actor(states)
    # tanh; 1.0 when saturated in float32
    assert mean.shape == log_std.shape == (50, 2) and mean.abs().max() <= 1.0
    assert log_std.min() >= -5.0 and log_std.max() <= 2.0
    if state_dependent_std:  # log-std head initialized near 0 (IQL's log_std_scale 1e-3)
        assert actor(torch.randn(8, 3))[1].abs().max() < 0.05
    else:
        assert torch.equal(log_std, torch.zeros(50, 2))
    samples = actor.sample(states[:4], 1000, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, 1000, 2) and samples.abs().max() <= 1.0


def test_act_returns_the_mean_action():
    model = IQL(4, 2, critic=lambda o, a: ImplicitCritic(o, a, hidden_dims=(16,)), actor_hidden_dims=(16,))
    states = torch.randn(7, 4)
    a = model.act(states, num_samples=8, extraction="implicit", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, model.actor(states)[0]) and a.dtype == torch.float32
    assert torch.equal(a, model.act(states, precision="32"))


@pytest.mark.parametrize(
    "kwargs,match",
    [({"beta": -1.0}, "beta"), ({"max_weight": 0.0}, "max_weight"),
     ({"actor_hidden_dims": []}, "actor_hidden_dims"),
     ({"log_std_min": 2.0}, "log_std_min"), ({"actor_lr": 0.0}, "actor_lr"),
     ({"lr_decay_steps": 0}, "lr_decay_steps")],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        IQL(4, 2, **kwargs)


# ---------------------------------------------------------------------------------------------- CLI





"""The torch-only policy (paper Alg. 2 with the Eq. 5 sampler, :mod:`idql_pl.algorithm.policy`): the same
actions as ``IDQL.act`` given the same noise, eager, scripted and exported, for one agent of K = 1 and K = 2
models."""

from __future__ import annotations

import contextlib
import warnings
from functools import partial

import lightning as L
import pytest
import torch

from idql_pl import IDQL, DiffusionBehavior, ImplicitCritic
from idql_pl.algorithm import losses
from idql_pl.algorithm.policy import StandalonePolicy, implicit_log_weights

S, A = 5, 3


def tiny_idql(num_agents: int = 1, **kwargs) -> IDQL:
    """A small IDQL with random weights: the EMA net and the target Qs perturbed away from their online
    copies, so a wrong copy would show."""
    L.seed_everything(0, verbose=False)
    critic = partial(ImplicitCritic, hidden_dims=[32, 32], **kwargs.pop("critic", {}))
    behavior = partial(DiffusionBehavior, hidden_dim=16, ff_dim=32, num_blocks=2,
                       **kwargs.pop("behavior", {}))
    model = IDQL(S, A, critic=critic, behavior=behavior, num_agents=num_agents, num_samples=16,
                 **kwargs).eval()
    with torch.no_grad():
        for p in [*model.behavior.ema_net.parameters(), *model.critic.q_target_net.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    return model


@contextlib.contextmanager
def same_noise_for_every_agent(agent: int, num_agents: int):
    """While active, ``IDQL.act`` of a K-agent model draws one agent's noise and gives it to every agent:
    ``randn`` of shape ``[K, ...]`` draws ``[...]`` once, ``multinomial`` draws for agent ``agent``'s rows
    only. Agent ``agent`` then gets the noise a single-agent policy draws after the same seed."""
    randn, multinomial = torch.randn, torch.multinomial

    def shared_randn(*size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        assert shape[0] == num_agents
        return randn(shape[1:], **kwargs).expand(shape).contiguous()

    def shared_multinomial(probs, n, *args, **kwargs):
        rows = probs.view(num_agents, -1, probs.shape[-1])[agent]
        return multinomial(rows, n, *args, **kwargs).repeat(num_agents, 1)

    torch.randn, torch.multinomial = shared_randn, shared_multinomial
    try:
        yield
    finally:
        torch.randn, torch.multinomial = randn, multinomial


def reference_actions(model: IDQL, obs: torch.Tensor, agent: int, seed: int, extraction: str,
                      num_samples: int | None = None) -> torch.Tensor:
    """``IDQL.act``'s actions of agent ``agent`` after ``torch.manual_seed(seed)`` (every agent given the
    noise of a single agent)."""
    torch.manual_seed(seed)
    if model.num_agents == 1:
        return model.act(obs, num_samples=num_samples, extraction=extraction)[0]
    with same_noise_for_every_agent(agent, model.num_agents):
        return model.act(obs, num_samples=num_samples, extraction=extraction)[agent]


def compiled(policy: StandalonePolicy, how: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "script":
            return torch.jit.script(policy)
        if how == "export":
            batch = torch.export.Dim("batch", min=1)
            return torch.export.export(policy, (torch.zeros(2, S),), dynamic_shapes=({0: batch},)).module()
    return policy


@pytest.mark.parametrize("how", ["eager", "script", "export"])
@pytest.mark.parametrize("extraction", ["argmax", "implicit"])
@pytest.mark.parametrize("num_agents, agent", [(1, 0), (2, 1)])
def test_policy_acts_as_idql_act_given_the_same_noise(num_agents, agent, extraction, how):
    """Bit for bit: the same candidates (Eq. 5), the same target-Q scores and the same argmax / implicit
    draw."""
    model = tiny_idql(num_agents, critic={"tau": [0.7, 0.9][:num_agents] if num_agents > 1 else 0.8})
    policy = compiled(StandalonePolicy.from_model(model, agent, extraction=extraction), how)
    obs = torch.randn(9, S)
    for seed in (0, 1):
        torch.manual_seed(seed)
        actions = policy(obs)
        expected = reference_actions(model, obs, agent, seed, extraction)
        assert actions.shape == (9, A) and actions.dtype == torch.float32
        assert torch.equal(actions, expected)
    assert actions.abs().max() <= 1.0
    torch.manual_seed(5)
    first = policy(obs)
    torch.manual_seed(5)
    assert torch.equal(policy(obs), first)  # the seed reproduces the actions
    assert not torch.equal(policy(obs), first)  # and the noise moves on


def test_policy_of_the_mlp_score_net_with_swish_and_another_num_samples():
    model = tiny_idql(behavior={"score_net": "mlp", "activation": "swish"}, critic={"value_loss": "quantile"})
    policy = StandalonePolicy.from_model(model, num_samples=5, extraction="implicit")
    obs = torch.randn(4, S)
    torch.manual_seed(2)
    actions = policy(obs)
    torch.manual_seed(2)
    assert torch.equal(actions, model.act(obs, num_samples=5, extraction="implicit")[0])


@pytest.mark.parametrize("kind, param", [("expectile", 0.7), ("quantile", 0.6), ("exponential", 2.0)])
def test_implicit_log_weights_equal_the_losses_module(kind, param):
    u = torch.cat([torch.randn(64) * 3, torch.tensor([0.0, 1e-8, -1e-8, 40.0, -40.0])])
    expected = losses.implicit_log_weights(u, kind, torch.tensor([[param]]).view(1, 1))
    assert torch.equal(implicit_log_weights(u.view(1, -1), kind, torch.full((1, 1), param)).view(-1),
                       expected.view(-1))


def test_policy_refuses_wrong_observations_and_agents():
    model = tiny_idql()
    policy = StandalonePolicy.from_model(model)
    with pytest.raises(ValueError, match=r"\[batch, 5\]"):
        policy(torch.zeros(2, S + 1))
    from idql_pl.errors import ConfigError

    with pytest.raises(ConfigError, match="agent must lie in 0..0"):
        StandalonePolicy.from_model(model, agent=1)
    with pytest.raises(ConfigError, match="not a model with a diffusion behavior and a critic"):
        StandalonePolicy.from_model(model.critic)

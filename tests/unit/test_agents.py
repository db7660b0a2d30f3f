"""Many agents per process (``num_agents = K``): agent k starts as a single run seeded seed + k, agents are
independent (own init, own batches, no gradient across agents), per-agent hyperparameters, evaluation of every
agent, export of one agent."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from idql_pl import IDQL, DiffusionBehavior, ImplicitCritic
from idql_pl.algorithm.diffusion import ddpm_loss
from idql_pl.algorithm.losses import value_loss
from idql_pl.data.buffer import TransitionBuffer
from idql_pl.errors import ConfigError
from idql_pl.training.evaluation import interquartile_mean
from tests.helpers import IndexedCandidates, QIsTheAction, random_transitions

S, A = 5, 3
TINY_CRITIC = dict(hidden_dims=[32, 32], batch_size=24)
TINY_BEHAVIOR = dict(hidden_dim=16, ff_dim=32, num_blocks=2, batch_size=24)


def buffer(seed: int = 0) -> TransitionBuffer:
    return TransitionBuffer(random_transitions(300, seed=1, obs_dim=S, action_dim=A, terminal_prob=0.1),
                            seed=seed)


def agent_slice(module: torch.nn.Module, k: int, num_agents: int) -> dict[str, torch.Tensor]:
    """Agent ``k``'s block of every state tensor (1 row per agent, the twin Q's 2 members per agent)."""
    out = {}
    for key, value in module.state_dict().items():
        rows = value.shape[0] // num_agents
        out[key] = value[k * rows : (k + 1) * rows].clone()
    return out


# ------------------------------------------------------------------------------------------ independence
def test_agent_k_of_four_critics_is_a_single_critic_seeded_k():
    """The critic has no noise besides its batches: agent k of a K = 4 critic (seed s) starts as a K = 1
    critic seeded s + k (bit for bit), draws the same batches, and follows it over the first steps (float
    tolerance: one batched matmul for 4 agents rounds like four plain ones only up to the last bits)."""
    seed, K, steps = 3, 4, 4
    L.seed_everything(seed, verbose=False)
    many = ImplicitCritic(S, A, num_agents=K, **TINY_CRITIC)
    buf = buffer(seed)
    init = [agent_slice(many, k, K) for k in range(K)]
    opts = many.configure_optimizers()
    losses = []
    for _ in range(steps):
        batch = buf.sample(24, K)
        losses.append(many.update(batch, *opts))
    for k in range(K):
        L.seed_everything(seed + k, verbose=False)
        one = ImplicitCritic(S, A, **TINY_CRITIC)
        for key, value in one.state_dict().items():
            assert torch.equal(value, init[k][key]), key
        own_buf, own_opts = buffer(seed + k), one.configure_optimizers()
        ref_buf = buffer(seed)
        for _ in range(steps):
            own = own_buf.sample(24, 1)
            shared = ref_buf.sample(24, K)
            assert torch.equal(own.observations[0], shared.observations[k])  # agent k's own rows
            one.update(own, *own_opts)
        for key, value in one.state_dict().items():
            torch.testing.assert_close(agent_slice(many, k, K)[key], value, rtol=1e-5, atol=1e-6)


def test_behavior_agent_init_is_a_single_run_seeded_k_and_the_forward_is_per_agent():
    """Agent k of a K = 3 behavior model starts as a K = 1 model seeded s + k, and its score network computes
    exactly agent k's single network on agent k's inputs (to float tolerance). Dropout and diffusion noise are
    drawn as one [K, ...] tensor, so the training streams differ from single runs by construction."""
    seed, K = 5, 3
    L.seed_everything(seed, verbose=False)
    many = DiffusionBehavior(S, A, num_agents=K, **TINY_BEHAVIOR)
    x, k, s = torch.randn(K, 7, A), torch.randint(5, (K, 7)), torch.randn(K, 7, S)
    out = many.net(x, k, s)
    for j in range(K):
        L.seed_everything(seed + j, verbose=False)
        one = DiffusionBehavior(S, A, **TINY_BEHAVIOR)
        for key, value in one.state_dict().items():
            assert torch.equal(value, agent_slice(many, j, K)[key]), key
        one.eval()
        many.eval()
        torch.testing.assert_close(many.net(x, k, s)[j], one.net(x[j : j + 1], k[j : j + 1], s[j : j + 1])[0])
    many.train()
    assert out.shape == (K, 7, A)


@pytest.mark.parametrize("part", ["v", "q", "score"])
def test_no_gradient_flows_between_agents(part):
    """d(loss of agent j) / d(parameters of agent k) is exactly 0 for k != j, and nonzero for k = j."""
    K, j = 3, 1
    torch.manual_seed(0)
    batch = buffer().sample(24, K)
    if part == "score":
        model = DiffusionBehavior(S, A, num_agents=K, **TINY_BEHAVIOR)
        net = model.net
        steps = torch.randint(5, (K, 24))
        loss = net(batch.actions, steps, batch.observations)[j].square().sum()
    else:
        model = ImplicitCritic(S, A, num_agents=K, **TINY_CRITIC)
        net = model.v_net if part == "v" else model.q_net
        if part == "v":
            _, u, _ = model.v_loss(batch)
            loss = value_loss(u, "expectile", 0.7)[j].mean()
        else:
            loss = model.q_net(batch.observations, batch.actions)[j].square().mean()
    params = dict(net.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    for (name, p), g in zip(params.items(), grads):
        rows = p.shape[0] // K
        g = torch.zeros_like(p) if g is None else g
        for k in range(K):
            block = g[k * rows : (k + 1) * rows]
            if k != j:
                assert torch.count_nonzero(block) == 0, (name, k)
        assert (torch.count_nonzero(g[j * rows : (j + 1) * rows]) > 0 or "bias" in name
                or "in_time" in name), name


def test_batches_of_agents_come_from_their_own_generators_and_resume():
    buf = buffer(7)
    first = buf.sample(16, 3)
    assert first.observations.shape == (3, 16, S) and first.rewards.shape == (3, 16)
    single = buffer(7).sample(16)  # agent 0 draws the single run's rows
    assert torch.equal(first.observations[0], single.observations)
    assert torch.equal(first.observations[2], buffer(9).sample(16).observations)  # agent 2: seed + 2
    state = buf.state_dict()
    nxt = buf.sample(16, 3)
    fresh = buffer(7)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.sample(16, 3).observations, nxt.observations)
    legacy = buffer(7)
    legacy.load_state_dict({"generator": buffer(7).generator.get_state()})  # a state saved before agents
    assert torch.equal(legacy.sample(16, 1).observations[0], single.observations)


# ------------------------------------------------------------------------------------------ hyperparameters
def test_per_agent_tau_and_a_clear_error_for_a_wrong_length():
    taus = [0.6, 0.7, 0.9]
    critic = ImplicitCritic(S, A, num_agents=3, tau=taus, **TINY_CRITIC)
    batch = buffer().sample(24, 3)
    loss, u, _ = critic.v_loss(batch)
    want = sum(value_loss(u[k], "expectile", tau).mean() for k, tau in enumerate(taus))
    torch.testing.assert_close(loss, want)
    assert [critic.loss_param_of(k) for k in range(3)] == pytest.approx(taus)
    model = IDQL(S, A, critic=partial(ImplicitCritic, tau=taus, **TINY_CRITIC),
                 behavior=partial(DiffusionBehavior, **TINY_BEHAVIOR), num_samples=4, num_agents=3).eval()
    acts = model.act(torch.randn(5, S), extraction="implicit", generator=torch.Generator().manual_seed(0))
    assert acts.shape == (3, 5, A)  # each agent resamples with its own tau's weights
    with pytest.raises(ConfigError, match="critic tau has 2 values but num_agents is 3"):
        ImplicitCritic(S, A, num_agents=3, tau=[0.6, 0.7])
    with pytest.raises(ConfigError, match="tau must lie in"):
        ImplicitCritic(S, A, num_agents=2, tau=[0.6, 1.7])


def test_idql_acts_for_every_agent_and_losses_sum_per_agent_means():
    model = IDQL(S, A, critic=partial(ImplicitCritic, **TINY_CRITIC),
                 behavior=partial(DiffusionBehavior, **TINY_BEHAVIOR), num_samples=4, num_agents=2)
    model.eval()
    for extraction in ("argmax", "implicit"):
        actions = model.act(torch.randn(6, S), extraction=extraction,
                            generator=torch.Generator().manual_seed(0))
        assert actions.shape == (2, 6, A) and actions.abs().max() <= 1.0
    batch = buffer().sample(24, 2)
    torch.manual_seed(0)
    total = ddpm_loss(lambda x, k: torch.zeros_like(x), model.behavior.schedule, batch.actions)
    torch.manual_seed(0)
    k = torch.randint(5, (2, 24))
    noise = torch.randn(2, 24, A)
    torch.testing.assert_close(total, noise.square().sum(-1).mean(-1).sum())
    assert k.shape == (2, 24)


def test_interquartile_mean():
    assert interquartile_mean([1.0, 2.0, 3.0, 4.0]) == pytest.approx(2.5)
    assert interquartile_mean([0.0, 10.0, 10.0, 100.0]) == pytest.approx(10.0)
    assert interquartile_mean([5.0]) == pytest.approx(5.0)
    assert interquartile_mean([1.0, 2.0, 3.0]) == pytest.approx(2.0)


# ---------------------------------------------------------------------------------- per-agent N, independence
def test_per_agent_num_samples_extracts_from_each_agents_own_candidates():
    """``num_samples`` as one count per agent (a sweep over N): agent k picks among its first N_k candidates
    only, under argmax and implicit resampling; a list of the wrong length is a one-line error."""
    from idql_pl.algorithm.extraction import extract_actions

    states = torch.zeros(3, 50, 2)
    counts = [1, 4, 8]
    best = extract_actions(IndexedCandidates(), QIsTheAction(), states, counts)  # [K, B, 1]
    assert [sorted(set(best[k, :, 0].tolist())) for k in range(3)] == [[0.0], [3 / 8], [7 / 8]]
    drawn = extract_actions(IndexedCandidates(), QIsTheAction(), states, counts, extraction="implicit",
                            generator=torch.Generator().manual_seed(0))
    for k, n in enumerate(counts):
        assert drawn[k].max() <= (n - 1) / 8 + 1e-6  # never one of the masked candidates
    assert len(set(drawn[2, :, 0].tolist())) > 1  # implicit draws spread over the kept ones
    with pytest.raises(ConfigError, match="num_samples has 2 values but num_agents is 3"):
        IDQL(S, A, critic=partial(ImplicitCritic, **TINY_CRITIC),
             behavior=partial(DiffusionBehavior, **TINY_BEHAVIOR), num_samples=[4, 8], num_agents=3)


def _behavior_loss_fluctuations(shared: bool, steps: int = 60) -> torch.Tensor:
    """Per-agent Eq. 4 training losses of a K = 4 behavior model, step to step differences ``[steps - 1, 4]``.
    ``shared``: the control, every agent on the same rows with the same diffusion steps and noise."""
    import idql_pl.models.behavior as behavior_module
    from idql_pl.algorithm.diffusion import q_sample

    per_agent: list[torch.Tensor] = []

    # Eq. 4 as ddpm_loss, recording each agent's
    def recording_loss(denoise_fn, schedule, x0, generator=None):
        shape = (1, *x0.shape[1:]) if shared else x0.shape
        k = torch.randint(schedule.T, shape[:-1]).expand(x0.shape[:-1])
        noise = torch.randn(shape).expand(x0.shape)
        losses = (denoise_fn(q_sample(schedule, x0, k, noise), k) - noise).square().sum(dim=-1).mean(dim=-1)
        per_agent.append(losses.detach())
        return losses.sum()

    L.seed_everything(0, verbose=False)
    model = DiffusionBehavior(S, A, num_agents=4, dropout=0.0, **TINY_BEHAVIOR)
    opt, sched = model.make_optimizer(steps)
    buf = buffer()
    original = behavior_module.ddpm_loss
    behavior_module.ddpm_loss = recording_loss
    try:
        for _ in range(steps):
            model.update(buf.sample(24) if shared else buf.sample(24, 4), opt, sched)
    finally:
        behavior_module.ddpm_loss = original
    return torch.diff(torch.stack(per_agent), dim=0)


def test_behavior_agents_train_on_uncorrelated_streams():
    """The behavior agents' streams (rows, diffusion steps, noise) are not a single run's, so independence is
    shown directly: step-to-step changes of the agents' training losses are uncorrelated (|r| < 0.35 for
    every pair over 59 steps), while agents fed the same rows and noise (the control) correlate (r > 0.5)."""
    independent = torch.corrcoef(_behavior_loss_fluctuations(shared=False).T)
    control = torch.corrcoef(_behavior_loss_fluctuations(shared=True).T)
    off = ~torch.eye(4, dtype=torch.bool)
    assert independent[off].abs().max() < 0.35, independent
    assert control[off].min() > 0.5, control

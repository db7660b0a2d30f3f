"""Networks: fused twin-Q, Fourier time embedding, LN-ResNet / MLP score nets, EMA update."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from idql_pl.errors import ConfigError
from idql_pl.nets import (
    MLP,
    AgentLayerNorm,
    AgentLinear,
    AgentMLP,
    EnsembleMLP,
    FourierTimeEmbedding,
    LNResNet,
    Mish,
    MLPScoreNet,
    TwinQ,
    build_agents,
    ema_update_,
    make_activation,
    strip_dropout_,
)

S, A = 7, 3


def test_twin_q_equals_two_separate_mlps():
    torch.manual_seed(0)
    mlps = [MLP(S + A, [32, 16], 1) for _ in range(2)]
    twin = TwinQ(S, A, [32, 16])
    linears = [[m for m in mlp.net if isinstance(m, nn.Linear)] for mlp in mlps]
    with torch.no_grad():
        for layer, (w, b) in enumerate(zip(twin.ensemble.weights, twin.ensemble.biases, strict=True)):
            for e in range(2):
                w[e].copy_(linears[e][layer].weight)
                b[e].copy_(linears[e][layer].bias)
    s, a = torch.randn(1, 50, S), torch.randn(1, 50, A)  # one agent
    out = twin(s, a)
    assert out.shape == (1, 2, 50)
    expected = torch.stack([m(torch.cat([s[0], a[0]], 1)).squeeze(-1) for m in mlps])
    assert torch.allclose(out[0], expected, atol=1e-6)
    # gradients flow to both members through the one batched op
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in twin.parameters())


def test_ensemble_members_are_independent_and_accept_per_member_inputs():
    torch.manual_seed(0)
    ens = EnsembleMLP(4, [8], 2, num_members=3)
    assert not torch.equal(ens.weights[0][0], ens.weights[0][1])  # independent init
    x = torch.randn(3, 5, 4)
    out = ens(x)
    assert out.shape == (3, 5, 2)
    assert torch.allclose(ens(x[1])[1], out[1])  # member 1 on its own rows


def test_fourier_time_embedding():
    torch.manual_seed(0)
    emb = FourierTimeEmbedding(64, 128)
    assert emb.kernel.shape == (1, 32, 1)  # [agents, fourier_dim / 2, 1]
    big = FourierTimeEmbedding(20_000, 8)
    assert big.kernel.std().item() == pytest.approx(0.2, rel=0.03)  # W ~ N(0, 0.2^2)
    k = torch.tensor([[0.0, 1.0, 4.0]])
    features = {}

    def grab(module, inputs, output):
        features["x"] = inputs[0]

    emb.mlp.register_forward_hook(grab)
    out = emb(k)
    assert out.shape == (1, 3, 128)
    f = 2 * math.pi * k[0, :, None] * emb.kernel[0, :, 0][None, :]
    assert torch.allclose(features["x"][0], torch.cat([torch.cos(f), torch.sin(f)], 1))
    assert emb(torch.zeros(1, 2, 5)).shape == (1, 2, 5, 128)
    three = FourierTimeEmbedding(8, 16, num_agents=3)
    assert three(torch.zeros(3, 4)).shape == (3, 4, 16) and not torch.equal(three.kernel[0], three.kernel[1])
    with pytest.raises(ConfigError):
        FourierTimeEmbedding(63)


@pytest.mark.parametrize("cls", [LNResNet, MLPScoreNet])
@pytest.mark.parametrize("num_timesteps", [None, 5])
@pytest.mark.parametrize("K", [1, 3])
def test_score_net_projected_paths_equal_forward(cls, num_timesteps, K):
    torch.manual_seed(0)
    net = cls(S, A, hidden_dim=32, num_timesteps=num_timesteps, num_agents=K).eval()
    x, s = torch.randn(K, 20, A), torch.randn(K, 20, S)
    k = torch.randint(5, (K, 20))
    ref = net(x, k, s)
    assert ref.shape == (K, 20, A)
    assert torch.allclose(net.forward_parts(x, net.project_state(s), net.project_time(k)), ref, atol=1e-6)
    # float k (direct embedding) equals integer k (table lookup when num_timesteps is set)
    assert torch.allclose(net(x, k.float(), s), ref, atol=1e-5)
    # one state projection broadcast over N candidates equals repeating the state per candidate
    states = torch.randn(K, 4, S)
    cand = torch.randn(K, 4, 6, A)
    sp = net.project_state(states).unsqueeze(2)
    fast = net.forward_parts(cand, sp, net.project_time(3).view(K, 1, 1, -1))
    slow = net(cand.reshape(K, -1, A), torch.full((K, 24), 3),
               states.repeat_interleave(6, 1)).view(K, 4, 6, A)
    assert fast.shape == (K, 4, 6, A) and torch.allclose(fast, slow, atol=1e-5)
    assert torch.allclose(net(cand, 3, states.unsqueeze(2).expand(K, 4, 6, S)), slow, atol=1e-5)  # int k
    if num_timesteps:
        assert torch.allclose(net.time_table()[:, 3], net.project_time(3), atol=1e-6)


def test_first_dense_split_equals_dense_on_concat():
    """App. G: Dense(H) on concat[noisy action, state, time embedding]."""
    torch.manual_seed(0)
    net = LNResNet(S, A, hidden_dim=32, ff_dim=64).eval()
    x, s, k = torch.randn(1, 5, A), torch.randn(1, 5, S), torch.tensor([[0, 1, 2, 3, 4]])
    temb = net.time_embedding(k.float())
    w = torch.cat([net.in_action.weight[0], net.in_state.weight[0], net.in_time.weight[0]], 1)
    h = torch.cat([x, s, temb], -1) @ w.T + net.in_action.bias[0]
    assert torch.allclose(net.trunk(h), net(x, k, s), atol=1e-6)


def test_ln_resnet_architecture_and_dropout():
    net = LNResNet(S, A)  # paper size
    assert len(net.blocks) == 3
    block = net.blocks[0]
    assert (block.fc1.in_dim, block.fc1.out_dim, block.fc2.out_dim) == (256, 1024, 256)
    assert isinstance(block.dropout, nn.Dropout) and block.dropout.p == 0.1
    assert isinstance(block.act, Mish) and isinstance(block.norm, AgentLayerNorm) and block.norm.eps == 1e-6
    assert net.out.out_dim == A and net.in_time.in_dim == 128
    assert isinstance(LNResNet(S, A, activation="swish").out_act, nn.SiLU)
    x, s, k = torch.randn(1, 64, A), torch.randn(1, 64, S), torch.zeros(1, 64, dtype=torch.long)
    net.train()
    assert not torch.allclose(net(x, k, s), net(x, k, s))  # dropout active in training
    net.eval()
    assert torch.equal(net(x, k, s), net(x, k, s))
    # the dropout-free copy computes the eval-mode network in either mode
    ema = strip_dropout_(LNResNet(S, A)).train()
    ema.load_state_dict(net.state_dict())
    assert torch.equal(ema(x, k, s), net(x, k, s))
    with pytest.raises(ConfigError, match="unknown activation"):
        make_activation("sigmoidish")


@pytest.mark.parametrize("rate", [0.005, 0.001, 0.5])
def test_ema_update_moves_by_exactly_the_rate(rate, monkeypatch):
    torch.manual_seed(0)
    target = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    source = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    expected = [(1 - rate) * t + rate * s for t, s in zip(target, source, strict=True)]
    calls = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: (calls.append(1), real(*a)))
    ema_update_(target, source, rate)
    assert len(calls) == 1  # one fused call for all tensors
    for t, e in zip(target, expected, strict=True):
        assert torch.allclose(t, e, rtol=0, atol=1e-15)
    with pytest.raises(ValueError):
        ema_update_(target, source[:1], rate)


def test_mish_identity_equals_torch_mish():
    x = torch.cat([torch.linspace(-100, 100, 2001), torch.tensor([-1e4, -1e-6, 0.0, 1e-6, 1e4])]).double()
    x = x.requires_grad_(True)
    y = Mish()(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.mish(ref_x)
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)
    y.sum().backward()
    ref.sum().backward()
    assert torch.allclose(x.grad, ref_x.grad, rtol=1e-10, atol=1e-12)
    x32 = (torch.randn(256, 64) * 4).requires_grad_(True)
    assert torch.autograd.gradcheck(Mish(), (x32[:4, :3].double().detach().requires_grad_(True),))
    with torch.no_grad():
        assert torch.allclose(Mish()(x32), torch.nn.functional.mish(x32), atol=1e-5)


def test_score_net_uses_standard_dropout_and_the_ema_copy_strips_it():
    """The residual blocks use ``nn.Dropout(0.1)`` (App. G); ``strip_dropout_`` removes every one of them."""
    net = LNResNet(S, A, hidden_dim=32, ff_dim=64)
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 3
    stripped = strip_dropout_(net)
    assert not any(isinstance(m, nn.Dropout) for m in stripped.modules())
    assert sum(isinstance(m, nn.Identity) for m in stripped.modules()) == 3


@pytest.mark.parametrize("K", [1, 3])
def test_agent_layers_equal_one_plain_layer_per_agent(K):
    """AgentLinear / AgentLayerNorm / AgentMLP of K agents compute, agent by agent, nn.Linear / nn.LayerNorm /
    MLP with that agent's parameters (to float rounding: one batched matmul for all agents)."""
    torch.manual_seed(0)
    lin = AgentLinear(K, 6, 4)
    norm = AgentLayerNorm(K, 6)
    mlp = AgentMLP(6, [8], 2, num_agents=K)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(K, 5, 3, 6)
    for k in range(K):
        plain = nn.Linear(6, 4)
        plain_norm = nn.LayerNorm(6, eps=1e-6)
        single = MLP(6, [8], 2)
        with torch.no_grad():
            plain.weight.copy_(lin.weight[k])
            plain.bias.copy_(lin.bias[k])
            plain_norm.weight.copy_(norm.weight[k])
            plain_norm.bias.copy_(norm.bias[k])
            for layer, agent_layer in zip(single.net[::2], mlp.net[::2]):
                layer.weight.copy_(agent_layer.weight[k])
                layer.bias.copy_(agent_layer.bias[k])
        check = partial(torch.allclose, atol=1e-6)
        assert check(lin(x)[k], plain(x[k]))
        assert check(norm(x)[k], plain_norm(x[k]))
        assert check(mlp(x)[k], single(x[k]))


def test_build_agents_leaves_the_gpu_generators_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Agent k's initialization draws from the CPU generator seeded ``seed + k``; the GPUs' generators (which
    ``torch.manual_seed`` would reseed, and ``fork_rng(devices=[])`` would not restore) are not touched, and
    the CPU generator is as before."""
    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    torch.manual_seed(7)
    reseeded.clear()
    before = torch.get_rng_state()
    net = build_agents(lambda k: AgentLinear(k, 3, 2), 2, seed=7)
    assert reseeded == []
    assert torch.equal(torch.get_rng_state(), before)
    for k in range(2):
        torch.manual_seed(7 + k)
        single = AgentLinear(1, 3, 2)
        assert torch.equal(net.weight[k], single.weight[0])

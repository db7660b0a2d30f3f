"""ImplicitCritic: one step in the spec's order, expectile regression, Lightning fit/checkpoint/resume."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from idql_pl.data.buffer import BufferStream, TransitionBuffer
from idql_pl.errors import ConfigError
from idql_pl.models.critic import ImplicitCritic
from tests.helpers import random_transitions

S, A = 5, 2


def make_arrays(n: int = 500, seed: int = 0, obs_dim: int = S, action_dim: int = A) -> dict[str, np.ndarray]:
    return random_transitions(n, seed, obs_dim, action_dim, terminal_prob=0.1)


def small_critic(**kw) -> ImplicitCritic:
    return ImplicitCritic(S, A, hidden_dims=(32, 32), batch_size=32, **kw)


def member_forward(ensemble: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Member ``e`` of a stacked ensemble, evaluated as a plain per-layer MLP (reference implementation)."""
    n = len(ensemble.weights)
    for i, (w, b) in enumerate(zip(ensemble.weights, ensemble.biases, strict=True)):
        x = x @ w[e].T + b[e]
        if i < n - 1:
            x = torch.relu(x)
    return x.squeeze(-1)


@pytest.mark.parametrize("kind", ["expectile", "quantile", "exponential"])
def test_update_matches_a_hand_written_step(kind):
    """V step on min target Q, then Q step with the *updated* V, then Polyak target (docs/fidelity.md §1)."""
    L.seed_everything(0, verbose=False)
    critic = small_critic(value_loss=kind, tau=0.8, alpha=0.5)
    with torch.no_grad():  # make the target differ from the online pair, so using the wrong one would show
        for p in critic.q_target_net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = copy.deepcopy(critic)
    batch = TransitionBuffer(make_arrays(), seed=1).sample(64)
    v_opt, q_opt = critic.configure_optimizers()
    out = critic.update(batch, v_opt, q_opt)

    s, a, r, s2, m = batch
    sa = torch.cat([s, a], 1)
    ref_v_opt = torch.optim.Adam(ref.v_net.parameters(), lr=3e-4)
    ref_q_opt = torch.optim.Adam(ref.q_net.parameters(), lr=3e-4)
    with torch.no_grad():
        q_hat = torch.minimum(member_forward(ref.q_target_net.ensemble, 0, sa),
                              member_forward(ref.q_target_net.ensemble, 1, sa))
    u = q_hat - ref.v_net(s).squeeze(-1)
    if kind == "expectile":
        f = torch.where(u < 0, 0.2, 0.8) * u**2
    elif kind == "quantile":
        f = torch.where(u < 0, 0.2, 0.8) * u.abs()
    else:
        f = (torch.exp(0.5 * u.detach()).clamp(max=6.0) - 1) * u
    v_loss = f.mean()
    ref_v_opt.zero_grad()
    v_loss.backward()
    ref_v_opt.step()
    with torch.no_grad():
        y = r + 0.99 * m * ref.v_net(s2).squeeze(-1)  # the just-updated V
    q_loss = 0.5 * sum(((member_forward(ref.q_net.ensemble, e, sa) - y) ** 2).mean() for e in range(2))
    ref_q_opt.zero_grad()
    q_loss.backward()
    ref_q_opt.step()
    old_target = [p.detach().clone() for p in ref.q_target_net.parameters()]
    with torch.no_grad():
        for t, o in zip(ref.q_target_net.parameters(), ref.q_net.parameters(), strict=True):
            t.copy_(0.995 * t + 0.005 * o)

    assert out["train/critic/v_loss"].item() == pytest.approx(v_loss.item(), rel=1e-5)
    assert out["train/critic/q_loss"].item() == pytest.approx(q_loss.item(), rel=1e-5)
    assert set(out) == {f"train/critic/{k}" for k in ("q_loss", "v_loss", "q_mean", "v_mean", "abs_u_mean")}
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad and v.dim() == 0 for v in out.values())
    for (name, p), p_ref in zip(critic.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.allclose(p, p_ref, atol=1e-6), name
    # the target moved by exactly the rate towards the new online weights
    for t, t_old, o in zip(critic.q_target_net.parameters(), old_target, critic.q_net.parameters(),
                           strict=True):
        assert torch.allclose(t, 0.995 * t_old + 0.005 * o, atol=1e-7)


class FixedQ(nn.Module):
    """Stands in for the target pair: ``min`` over its two outputs is ``values[action index]``."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.register_buffer("values", values)

    def forward(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        q = self.values[actions[..., 0].round().long()]  # [K, B]
        return torch.stack([q, q + 1.0], dim=1)  # [K, 2, B]


def _root(fn, lo: float, hi: float) -> float:
    """Bisection for the increasing function ``fn``."""
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("kind,param", [("expectile", 0.7), ("expectile", 0.9), ("exponential", 1.0)])
def test_value_step_converges_to_the_expectile(kind, param):
    """One state, five actions with known Q: V converges to the tau-expectile (Eq. 1), or for the guarded
    linex loss (Eq. 11) to the root of E_mu[min(exp(alpha (Q - V)), clip)] = 1 (log E_mu[exp(alpha Q)] / alpha
    without the clip)."""
    values = torch.tensor([-1.0, 0.5, 1.5, 2.0, 4.0], dtype=torch.float64)
    counts = [3, 1, 2, 3, 1]
    idx = np.repeat(np.arange(5), counts)
    n = len(idx)
    arrays = {
        "observations": np.ones((n, 1), np.float32),
        "actions": idx[:, None].astype(np.float32),
        "rewards": np.zeros(n, np.float32),
        "next_observations": np.ones((n, 1), np.float32),
        "masks": np.ones(n, np.float32),
    }
    batch = TransitionBuffer(arrays).all()
    L.seed_everything(0, verbose=False)
    critic = ImplicitCritic(1, 1, hidden_dims=(16, 16), value_loss=kind, tau=param, alpha=param)
    critic.q_target_net = FixedQ(values.float())
    v_opt = torch.optim.Adam(critic.v_net.parameters(), lr=3e-3)
    for _ in range(3000):
        critic.eager_step(v_opt, critic.v_loss, batch)  # the V step of Algorithm 1 alone
    v = critic.v(torch.ones(1, 1)).item()

    mu = torch.tensor(counts, dtype=torch.float64) / n
    if kind == "expectile":
        target = _root(
            lambda x: -(mu * torch.where(values < x, 1 - param, param) * (values - x)).sum().item(), -1, 4)
        assert target > (mu * values).sum().item() + 0.3  # distinct from the mean
    else:
        linex = (torch.log((mu * torch.exp(param * values)).sum()) / param).item()
        # the guarded loss's stationary point: E_mu[min(exp(alpha u), 6)] = 1 (clip active for Q = 4 here)
        target = _root(lambda x: 1 - (mu * torch.exp(param * (values - x)).clamp(max=6.0)).sum().item(),
                       -1, 4)
        assert linex - 0.1 < target < linex
    assert v == pytest.approx(target, abs=2e-3)


def test_accessors_and_weights():
    critic = small_critic()
    s, a = torch.randn(9, S), torch.randn(9, A)
    for out in (critic.q(s, a), critic.q_target(s, a), critic.v(s), critic.implicit_weights(s, a)):
        assert out.shape == (1, 9)  # [agents, B]
    three = small_critic(num_agents=3)
    for out in (three.q(s, a), three.q_target(s, a), three.v(s), three.implicit_weights(s, a)):
        assert out.shape == (3, 9)
    assert not torch.equal(three.v(s)[0], three.v(s)[1])  # agents start apart (seed + k)
    assert torch.equal(critic.q(s, a), critic.q_target(s, a))  # the target starts as an exact copy
    assert (critic.implicit_weights(s, a) > 0).all()
    assert critic.loss_param.tolist() == [[pytest.approx(0.7)]]  # [K, 1]
    assert small_critic(value_loss="exponential", alpha=0.5).loss_param.tolist() == [[0.5]]
    assert not any(p.requires_grad for p in critic.q_target_net.parameters())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tau": 1.0}, "tau must lie in"),
        ({"value_loss": "quantile", "tau": 0.0}, "tau must lie in"),
        ({"value_loss": "exponential", "alpha": 0.0}, "alpha must be > 0"),
        ({"value_loss": "huber"}, "unknown value_loss"),
        ({"discount": 1.5}, "discount"),
        ({"target_update_rate": 0.0}, "target_update_rate"),
        ({"lr": -1.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"hidden_dims": ()}, "hidden_dims"),
    ],
)
def test_config_errors(kwargs, match):
    args = {"hidden_dims": (32, 32), **kwargs}
    with pytest.raises(ConfigError, match=match):
        ImplicitCritic(S, A, **args)


def test_validation_losses_fixed_and_side_effect_free():
    critic = small_critic()
    buf = TransitionBuffer(make_arrays(), seed=0)
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    rng, buf_rng = torch.get_rng_state(), buf.generator.get_state()
    a, b = critic.validation_losses(buf), critic.validation_losses(buf)
    assert set(a) >= {"q_loss", "v_loss"} and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(rng, torch.get_rng_state()) and torch.equal(buf_rng, buf.generator.get_state())
    assert all(torch.equal(before[k], v) for k, v in critic.state_dict().items())


# ------------------------------------------------------------------------------------- Lightning
def trainer(max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def fit(make_model, max_steps: int, ckpt: str | None = None, buffer_state=None, **trainer_kw):
    L.seed_everything(0, verbose=False)
    model = make_model()
    buf = TransitionBuffer(make_arrays(), seed=0)
    if buffer_state is not None:
        buf.load_state_dict(buffer_state)
    tr = trainer(max_steps, **trainer_kw)
    tr.fit(model, train_dataloaders=BufferStream(buf), ckpt_path=ckpt, weights_only=True if ckpt else None)
    return model, tr, buf


def assert_same_training_state(a: L.LightningModule, ta: L.Trainer, b: L.LightningModule,
                               tb: L.Trainer) -> None:
    assert ta.global_step == tb.global_step
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for oa, ob in zip(ta.optimizers, tb.optimizers, strict=True):
        da, db = oa.state_dict(), ob.state_dict()
        assert da["param_groups"] == db["param_groups"]
        for i in da["state"]:
            for key in da["state"][i]:
                assert torch.equal(da["state"][i][key], db["state"][i][key]), (i, key)


def test_fit_checkpoint_and_exact_resume(tmp_path):
    k = 4
    model, tr, buf = fit(small_critic, k, log_every_n_steps=1)
    assert tr.global_step == k  # one critic step per training_step
    assert {"train/critic/q_loss", "train/critic/v_loss",
            "perf/critic_steps_per_s"} <= set(tr.callback_metrics)
    path = str(tmp_path / "critic.ckpt")
    tr.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert "idql_rng" in ckpt and len(ckpt["optimizer_states"]) == 2
    assert any(key.startswith("q_target_net.") for key in ckpt["state_dict"])
    restored = ImplicitCritic.load_from_checkpoint(path, map_location="cpu")
    assert all(torch.equal(v, model.state_dict()[key]) for key, v in restored.state_dict().items())

    resumed, tr_resumed, _ = fit(small_critic, 2 * k, ckpt=path, buffer_state=buf.state_dict())
    full, tr_full, _ = fit(small_critic, 2 * k)
    assert tr_full.global_step == 2 * k
    assert_same_training_state(resumed, tr_resumed, full, tr_full)



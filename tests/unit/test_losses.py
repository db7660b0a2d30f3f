"""Value losses and implicit weights (paper Eq. 1, 8-12; Theorem 4.1)."""

from __future__ import annotations

import math

import pytest
import torch

from idql_pl.algorithm.losses import implicit_log_weights, implicit_weights, value_loss
from idql_pl.errors import ConfigError

KINDS = [("expectile", 0.7), ("quantile", 0.6), ("exponential", 1.0), ("exponential", 0.5)]


def test_value_loss_hand_values():
    u = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    # expectile tau 0.7: 0.3 u^2 for u < 0, 0.7 u^2 otherwise
    assert torch.allclose(value_loss(u, "expectile", 0.7), torch.tensor([1.2, 0.075, 0.0, 0.175, 2.8]))
    # quantile tau 0.6: 0.4 |u| / 0.6 |u|
    assert torch.allclose(value_loss(u, "quantile", 0.6), torch.tensor([0.8, 0.2, 0.0, 0.3, 1.2]))
    # exponential alpha 1, clip 6: (min(e^u, 6) - 1) u
    expected = torch.tensor([(math.exp(-2) - 1) * -2, (math.exp(-0.5) - 1) * -0.5, 0.0,
                             (math.exp(0.5) - 1) * 0.5, 5 * 2.0])
    assert torch.allclose(value_loss(u, "exponential", 1.0), expected)
    # alpha 0.5 and a custom clip
    assert torch.allclose(value_loss(torch.tensor([4.0]), "exponential", 0.5, exp_clip=3.0),
                          torch.tensor([8.0]))
    assert value_loss(torch.zeros(3, 4), "expectile", 0.9).shape == (3, 4)  # elementwise


def test_expectile_gradient_matches_analytic():
    u = torch.linspace(-3, 3, 61, dtype=torch.float64).requires_grad_(True)
    tau = 0.7
    value_loss(u, "expectile", tau).sum().backward()
    analytic = 2 * torch.where(u.detach() < 0, 1 - tau, tau) * u.detach()
    assert torch.allclose(u.grad, analytic)


def test_exponential_surrogate_gradient_is_clipped_linex_gradient():
    """d/du of the guarded surrogate = min(exp(alpha u), clip) - 1 = f'(u) / alpha of the linex loss
    (Eq. 11)."""
    alpha, clip = 0.5, 6.0
    u = torch.linspace(-5, 8, 53, dtype=torch.float64).requires_grad_(True)
    value_loss(u, "exponential", alpha, clip).sum().backward()
    assert torch.allclose(u.grad, torch.exp(alpha * u.detach()).clamp(max=clip) - 1)
    big = torch.tensor([1e4, -1e4], requires_grad=True)
    loss = value_loss(big, "exponential", 1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(big.grad).all()


def test_implicit_weights_hand_values():
    u = torch.tensor([-2.0, -0.5, 0.5, 3.0], dtype=torch.float64)
    assert torch.allclose(implicit_weights(u, "expectile", 0.7),
                          torch.tensor([0.3, 0.3, 0.7, 0.7], dtype=torch.float64))
    assert torch.allclose(implicit_weights(u, "quantile", 0.6),
                          torch.tensor([0.2, 0.8, 1.2, 0.2], dtype=torch.float64))
    for alpha in (1.0, 0.5):
        expected = alpha * (torch.exp(alpha * u) - 1).abs() / u.abs()
        assert torch.allclose(implicit_weights(u, "exponential", alpha), expected)
    assert implicit_weights(torch.tensor(0.0), "expectile", 0.7) == pytest.approx(0.7)  # u >= 0 branch


@pytest.mark.parametrize("kind,param", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_implicit_weights_positive_and_finite(kind, param, dtype):
    big = 1e30 if dtype == torch.float32 else 1e200
    u = torch.tensor([-big, -1e4, -1.0, -1e-3, -1e-7, -1e-30, 0.0, 1e-30, 1e-7, 1e-3, 1.0, 1e4, big],
                     dtype=dtype)
    w = implicit_weights(u, kind, param)
    assert w.dtype == dtype and w.shape == u.shape
    assert torch.isfinite(w).all() and (w > 0).all(), w
    assert torch.isfinite(implicit_log_weights(u, kind, param)).all()
    # weights summed over many candidates stay finite (what the resampler does)
    assert torch.isfinite(w.expand(4096, -1).sum(0)).all()


def test_exponential_weight_limit_at_zero():
    for alpha in (1.0, 0.5, 2.0):
        for u0 in (0.0, 1e-9, -1e-9, 5e-7, -5e-7):
            assert (implicit_weights(torch.tensor(u0, dtype=torch.float64), "exponential", alpha).item()
                    == pytest.approx(alpha**2, rel=1e-5))
        # the guarded branch (|u| < 1e-6) agrees with the exact formula on both sides of the threshold
        for u0 in (0.99e-6, -0.99e-6, 1.01e-6, -1.01e-6):
            exact = alpha * math.expm1(alpha * u0) / u0
            w = implicit_weights(torch.tensor(u0, dtype=torch.float64), "exponential", alpha).item()
            assert w == pytest.approx(exact, rel=1e-10)


def test_quantile_weights_never_negative():
    """The reference code divides by the signed u; weights must stay positive for u < 0
    (docs/fidelity.md §2)."""
    u = -torch.rand(1000) * 10 - 1e-3
    assert (implicit_weights(u, "quantile", 0.8) > 0).all()


def test_config_errors():
    u = torch.zeros(2)
    with pytest.raises(ConfigError, match="unknown value_loss"):
        value_loss(u, "huber", 0.5)
    for tau in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="tau must lie in"):
            value_loss(u, "expectile", tau)
        with pytest.raises(ConfigError, match="tau must lie in"):
            implicit_weights(u, "quantile", tau)
    for alpha in (0.0, -1.0, math.inf):
        with pytest.raises(ConfigError, match="alpha must be > 0"):
            value_loss(u, "exponential", alpha)
    with pytest.raises(ConfigError, match="exp_clip"):
        value_loss(u, "exponential", 1.0, exp_clip=1.0)


# ----------------------------------------------------------------------------------- Theorem 4.1
Q = torch.tensor([-1.3, -0.4, 0.0, 0.35, 0.9, 1.6, 2.4], dtype=torch.float64)
MU = torch.tensor([0.10, 0.25, 0.05, 0.20, 0.15, 0.15, 0.10], dtype=torch.float64)


def _expected_loss(v: torch.Tensor, kind: str, param: float) -> torch.Tensor:
    return (MU * value_loss(Q - v, kind, param, exp_clip=1e6)).sum()


def _argmin_v(kind: str, param: float) -> float:
    """V* = argmin_V E_mu[f(Q - V)]: bisection on the (monotone) autograd derivative in V."""
    lo, hi = Q.min().item() - 1, Q.max().item() + 1
    for _ in range(200):
        mid = torch.tensor((lo + hi) / 2, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(_expected_loss(mid, kind, param), mid)
        lo, hi = (mid.item(), hi) if grad < 0 else (lo, mid.item())
    return (lo + hi) / 2


@pytest.mark.parametrize("kind,param", KINDS + [("expectile", 0.9), ("quantile", 0.8)])
def test_theorem_4_1_implicit_policy_has_zero_advantage(kind, param):
    v_star = _argmin_v(kind, param)
    # cross-check the minimizer by a fine 1-D search on the true objective (linex for the exponential loss)
    grid = torch.linspace(Q.min().item(), Q.max().item(), 200_001, dtype=torch.float64)
    u = Q[None, :] - grid[:, None]
    if kind == "exponential":
        objective = (MU * (torch.exp(param * u) - param * u)).sum(1)
    else:
        objective = (MU * value_loss(u, kind, param)).sum(1)
    assert v_star == pytest.approx(grid[objective.argmin()].item(), abs=2e-5)

    adv = Q - v_star
    assert abs((MU * adv).sum().item()) > 0.05  # V* is not the mean: the check below is not vacuous
    w = implicit_weights(adv, kind, param)
    pi = MU * w / (MU * w).sum()
    assert (pi * adv).sum().item() == pytest.approx(0.0, abs=1e-6 if kind != "quantile" else 1e-4)

"""Generalized-IQL value losses and the implicit-actor weights they induce (paper Sec. 4.1, Eq. 1, 8-12).

``u = Q(s, a) - V(s)`` throughout. Every ``value_loss`` is convex in ``V`` with ``f'(u)`` of the sign of
``u``, so by Theorem 4.1 the minimizer ``V*`` of ``E_mu[f(Q - V)]`` satisfies ``E_{pi_imp}[Q - V*] = 0`` for
``pi_imp(a|s) ∝ mu(a|s) |f'(u)| / |u|`` (Eq. 8): ``implicit_weights`` returns that ``|f'(u)| / |u|``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from idql_pl.errors import ConfigError

ValueLossKind = Literal["expectile", "quantile", "exponential"]
VALUE_LOSSES: tuple[str, ...] = ("expectile", "quantile", "exponential")

# |u| below this counts as 0 for the quantile weight (tau / |u|, Eq. 10) and switches the exponential weight
# to its Taylor expansion around 0 (Eq. 12).
WEIGHT_EPS = 1e-6


def check_value_loss(kind: str, tau_or_alpha: float, exp_clip: float = 6.0) -> None:
    """Raise :class:`ConfigError` for an unknown loss kind or an out-of-range parameter."""
    if kind not in VALUE_LOSSES:
        raise ConfigError(f"unknown value_loss {kind!r}: use one of {', '.join(VALUE_LOSSES)}")
    if kind in ("expectile", "quantile"):
        if not 0.0 < tau_or_alpha < 1.0:
            raise ConfigError(
                f"{kind} tau must lie in (0, 1) (got {tau_or_alpha}); the paper uses "
                f"{'0.7 locomotion / 0.9 antmaze' if kind == 'expectile' else '0.6 locomotion / 0.8 antmaze'}"
            )
    else:
        if not (tau_or_alpha > 0.0 and math.isfinite(tau_or_alpha)):
            raise ConfigError(
                f"exponential alpha must be > 0 (got {tau_or_alpha});"
                " the paper uses 1.0 locomotion / 0.5 antmaze"
            )
        if not exp_clip > 1.0:
            raise ConfigError(f"exp_clip must be > 1 (got {exp_clip}); the reference code uses 6")


# one value, or a tensor of per-agent values broadcasting against ``u`` (checked at init)
Param = float | Tensor


def _check(kind: str, tau_or_alpha: Param, exp_clip: float = 6.0) -> None:
    if not isinstance(tau_or_alpha, Tensor):
        check_value_loss(kind, tau_or_alpha, exp_clip)


def _log(x: Param) -> Param:
    return torch.log(x) if isinstance(x, Tensor) else math.log(x)


def _asymmetric(u: Tensor, tau: Param) -> Tensor:
    """``|tau - 1[u < 0]|``: tau where u >= 0, 1 - tau where u < 0."""
    return torch.where(u < 0, 1.0 - tau, tau).to(u.dtype)


def value_loss(u: Tensor, kind: str, tau_or_alpha: Param, exp_clip: float = 6.0) -> Tensor:
    """Elementwise value loss ``f(u)`` (same shape as ``u``; callers take the mean). ``tau_or_alpha``: a float
    or a tensor of per-agent values (e.g. ``[K, 1]`` for ``u [K, B]``).

    - ``"expectile"`` (IQL, Eq. 1): ``|tau - 1[u<0]| u^2``.
    - ``"quantile"`` (the loss of Eq. 10): ``|tau - 1[u<0]| |u|``.
    - ``"exponential"`` (linex, Eq. 11): the paper's ``f(u) = exp(alpha u) - alpha u`` is unstable, so, as the
      reference code does (docs/fidelity.md §1), this returns the guarded surrogate
      ``(stopgrad(min(exp(alpha u), exp_clip)) - 1) * u``. Its gradient in ``u`` is
      ``min(exp(alpha u), exp_clip) - 1`` = ``f'(u) / alpha`` wherever the clip is inactive, so it has the
      same minimizer in ``V``; its *value* is not the linex value (it is >= 0 and 0 only at u = 0).
    """
    _check(kind, tau_or_alpha, exp_clip)
    if kind == "expectile":
        return _asymmetric(u, tau_or_alpha) * u.square()
    if kind == "quantile":
        return _asymmetric(u, tau_or_alpha) * u.abs()
    # exp(alpha u) overflows to inf for large u; min(., clip) caps it either way, clamp first to avoid inf.
    scale = torch.exp((tau_or_alpha * u.detach()).clamp(max=math.log(exp_clip)))
    return (scale - 1.0) * u


def implicit_log_weights(u: Tensor, kind: str, tau_or_alpha: Param, eps: float = WEIGHT_EPS) -> Tensor:
    """``log w(u)`` with ``w = |f'(u)| / |u|`` (Eq. 8), computed stably (finite for every finite ``u``).

    - expectile (Eq. 9): ``w = tau`` if u >= 0 else ``1 - tau`` (the constant factor 2 of f' cancels in
      pi_imp).
    - quantile (Eq. 10): ``w = (tau or 1 - tau) / max(|u|, eps)``; always positive (the reference code divides
      by the signed ``u`` and so produces negative weights for u < 0; docs/fidelity.md, Deviations).
    - exponential (Eq. 12): ``w = alpha |exp(alpha u) - 1| / |u|``, with ``log|expm1|`` evaluated without
      overflow and the limit ``alpha^2 (1 + alpha u / 2)`` for ``|u| < eps``.
    """
    _check(kind, tau_or_alpha)
    if kind == "expectile":
        return torch.log(_asymmetric(u, tau_or_alpha))
    if kind == "quantile":
        return torch.log(_asymmetric(u, tau_or_alpha)) - u.abs().clamp(min=eps).log()
    alpha = tau_or_alpha
    small = u.abs() < eps
    u_safe = torch.where(small, torch.ones_like(u), u)  # keeps the unused branch (and its gradient) finite
    au = alpha * u_safe
    # log|exp(x) - 1| = log(1 - exp(-|x|)) + max(x, 0): expm1 of a non-positive argument, never overflows.
    log_abs_expm1 = torch.log(-torch.expm1(-au.abs())) + au.clamp(min=0)
    log_w = _log(alpha) + log_abs_expm1 - u_safe.abs().log()
    limit = 2.0 * _log(alpha) + torch.log1p(alpha * u / 2.0)
    return torch.where(small, limit, log_w)


def implicit_weights(u: Tensor, kind: str, tau_or_alpha: Param, eps: float = WEIGHT_EPS) -> Tensor:
    """Implicit-actor weights ``w = |f'(u)| / |u|`` (Eq. 8; Eq. 9, 10, 12 per kind): positive and finite.

    Exponential weights grow like ``exp(alpha u)``; they are capped below float32's max (use
    :func:`implicit_log_weights` to resample among candidates whose ``alpha u`` exceeds ~80).
    """
    log_w = implicit_log_weights(u, kind, tau_or_alpha, eps)
    cap = math.log(torch.finfo(u.dtype).max) - 10.0  # leaves room for summing thousands of capped weights
    return torch.exp(log_w.clamp(max=cap))

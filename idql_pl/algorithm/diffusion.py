"""DDPM pieces of the behavior policy (paper Sec. 3 Eq. 4-5, App. F.3, G; docs/fidelity.md §3).

Step indices ``k`` run over ``0..T-1``; ``alpha_bars[k] = prod_{j<=k} alphas[j]`` is the signal kept after
``k + 1`` noising steps, so ``k = T - 1`` is the (almost) pure-noise end and ``k = 0`` the last denoising
step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from idql_pl.errors import ConfigError

SCHEDULES: tuple[str, ...] = ("vp", "cosine", "linear")

DenoiseFn = Callable[[Tensor, int], Tensor]


class Schedule(NamedTuple):
    """Noise schedule, float32 tensors of shape ``[T]``: ``alphas = 1 - betas``,
    ``alpha_bars = cumprod(alphas)``."""

    betas: Tensor
    alphas: Tensor
    alpha_bars: Tensor

    @property
    def T(self) -> int:  # noqa: N802 - the paper's symbol
        return self.betas.shape[0]

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(*(t.to(device) for t in self))


def make_schedule(name: str = "vp", T: int = 5) -> Schedule:
    """Noise schedule by name (paper App. F.3 compares them; computed in float64, returned as float32).

    - ``"vp"`` (default, paper Sec. 5 / App. G):
      ``alpha_t = exp(-b_min/T - (b_max - b_min)(2t - 1)/(2 T^2))``, ``t = 1..T``, ``b_min = 0.1``,
      ``b_max = 10`` (the discretized variance-preserving SDE).
    - ``"cosine"`` (Nichol & Dhariwal 2021): ``alpha_bar(t) = cos^2((t/T + s)/(1 + s) pi/2)`` normalized by
      ``alpha_bar(0)``, ``s = 0.008``, betas clipped to ``[0, 0.999]``.
    - ``"linear"`` (Ho et al. 2020): ``betas = linspace(1e-4, 0.02, T)``, as in the reference code. Designed
      for T ~ 1000: at T = 5 it leaves ``alpha_bar_T ~ 0.95`` (almost no noise), so use it with large T only.
    """
    if name not in SCHEDULES:
        raise ConfigError(f"unknown diffusion schedule {name!r}:"
                          f" use one of {', '.join(SCHEDULES)} (the paper uses vp)")
    if not isinstance(T, int) or T < 1:
        raise ConfigError(f"diffusion steps T must be an integer >= 1 (got {T!r}); the paper uses T = 5")
    if name == "vp":
        b_min, b_max = 0.1, 10.0
        t = torch.arange(1, T + 1, dtype=torch.float64)
        alphas = torch.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * t - 1) / T**2)
        betas = 1.0 - alphas
    elif name == "cosine":
        s = 0.008
        t = torch.linspace(0, T, T + 1, dtype=torch.float64) / T
        f = torch.cos((t + s) / (1 + s) * math.pi * 0.5) ** 2
        f = f / f[0]
        betas = (1.0 - f[1:] / f[:-1]).clamp(0.0, 0.999)
    else:
        betas = torch.linspace(1e-4, 2e-2, T, dtype=torch.float64)
    alphas = 1.0 - betas
    alpha_bars = torch.cumprod(alphas, dim=0)
    return Schedule(betas.float(), alphas.float(), alpha_bars.float())


def _per_row(values: Tensor, k: Tensor, like: Tensor) -> Tensor:
    """``values[k]`` shaped to broadcast against ``like`` (``k`` indexes its leading dimensions)."""
    out = values.to(like.device).index_select(0, k.reshape(-1)).view(*k.shape)
    return out.reshape(*k.shape, *([1] * (like.dim() - k.dim()))).to(like.dtype)


def q_sample(schedule: Schedule, x0: Tensor, k: Tensor, noise: Tensor) -> Tensor:
    """Forward noising (Eq. 4's input): ``x_k = sqrt(alpha_bar_k) x0 + sqrt(1 - alpha_bar_k) eps``.

    ``k``: integer tensor over ``x0``'s leading dimensions (e.g. ``[B]`` for ``x0 [B, A]``).
    """
    a_bar = _per_row(schedule.alpha_bars, k, x0)
    return a_bar.sqrt() * x0 + (1.0 - a_bar).sqrt() * noise


def ddpm_loss(
    denoise_fn: Callable[[Tensor, Tensor], Tensor],
    schedule: Schedule,
    x0: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Denoising loss of Eq. 4: ``k ~ U{0..T-1}``, ``eps ~ N(0, I)``,
    ``E_batch[ sum_dims (eps_hat(x_k, k) - eps)^2 ]`` (mean over the batch of the per-sample squared norm).

    ``x0 [B, A]``, or ``[K, B, A]`` for K agents: then each agent's mean over its own rows, summed over agents
    (each agent's gradient is its own loss's). ``denoise_fn(x_k, k)`` gets ``x_k`` and the integer steps
    ``k`` (``x0``'s shape without the last dimension). Noise comes from ``generator`` or, if None, the global
    torch RNG (so ``seed_everything`` makes it reproducible), drawn for all agents as one tensor.
    """
    k = torch.randint(schedule.T, x0.shape[:-1], device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    eps_hat = denoise_fn(q_sample(schedule, x0, k, noise), k)
    return (eps_hat - noise).square().sum(dim=-1).mean(dim=-1).sum()


def reverse_coefficients(schedule: Schedule) -> list[tuple[float, float, float]]:
    """Per step ``k``: ``(1/sqrt(alpha_k), beta_k/sqrt(1 - alpha_bar_k), sqrt(beta_k))`` as Python floats
    (read once on the host, so the sampler's loop launches no device reads)."""
    betas, alphas, alpha_bars = (t.detach().double().cpu().tolist() for t in schedule)
    return [
        (1.0 / math.sqrt(a), b / math.sqrt(1.0 - ab), math.sqrt(b))
        for b, a, ab in zip(betas, alphas, alpha_bars, strict=True)
    ]


def reverse_sample(
    denoise_fn: DenoiseFn,
    schedule: Schedule | list[tuple[float, float, float]],
    x_T: Tensor,
    generator: torch.Generator | None = None,
    clip: float | None = 1.0,
) -> Tensor:
    """DDPM ancestral sampler of Eq. 5, batched over every leading dimension of ``x_T ~ N(0, I)``.

    For ``k = T-1..0``: ``x <- (x - beta_k / sqrt(1 - alpha_bar_k) eps_hat(x, k)) / sqrt(alpha_k)``; if
    ``k > 0`` add ``sqrt(beta_k) z`` (variance ``beta_k``, not the posterior variance, as in the paper and
    reference code); clip to ``[-clip, clip]`` after every step (``clip=None``: no clipping).
    ``denoise_fn(x, k)`` gets the Python int ``k``. ``schedule`` may be pre-converted with
    :func:`reverse_coefficients`.
    """
    coefs = reverse_coefficients(schedule) if isinstance(schedule, Schedule) else schedule
    x = x_T
    for k in range(len(coefs) - 1, -1, -1):
        inv_sqrt_alpha, eps_coef, sigma = coefs[k]
        eps_hat = denoise_fn(x, k)
        x = torch.add(x, eps_hat, alpha=-eps_coef).mul_(inv_sqrt_alpha)  # new tensor: x_T is not modified
        if k > 0:
            x.add_(torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator), alpha=sigma)
        if clip is not None:
            x.clamp_(-clip, clip)
    return x

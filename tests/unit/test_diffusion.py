"""Noise schedules, forward noising, the Eq. 4 loss and the Eq. 5 reverse sampler."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from idql_pl.algorithm.diffusion import (
    Schedule,
    ddpm_loss,
    make_schedule,
    q_sample,
    reverse_coefficients,
    reverse_sample,
)
from idql_pl.errors import ConfigError


def test_vp_schedule_matches_spec_numbers():
    s = make_schedule("vp", 5)
    assert isinstance(s, Schedule) and s.T == 5
    assert all(t.dtype == torch.float32 and t.shape == (5,) for t in s)
    assert torch.allclose(s.betas, torch.tensor([0.19588, 0.45882, 0.63578, 0.75488, 0.83503]), atol=1e-4)
    assert torch.allclose(s.alpha_bars, torch.tensor([0.80413, 0.43518, 0.15850, 0.03885, 0.00641]),
                          atol=1e-4)
    assert torch.allclose(s.alphas, 1 - s.betas)
    assert torch.allclose(s.alpha_bars, torch.cumprod(s.alphas, 0))
    assert make_schedule().T == 5  # default is vp, T = 5


@pytest.mark.parametrize("name", ["vp", "cosine", "linear"])
@pytest.mark.parametrize("T", [1, 2, 5, 20, 100, 1000])
def test_schedules_are_sane(name, T):
    s = make_schedule(name, T)
    assert ((s.betas > 0) & (s.betas < 1)).all()
    assert ((s.alpha_bars > 0) & (s.alpha_bars < 1)).all()
    assert (s.alpha_bars[1:] < s.alpha_bars[:-1]).all()  # strictly decreasing signal
    assert torch.allclose(s.alpha_bars, torch.cumprod(1 - s.betas.double(), 0).float(), rtol=1e-5)


def test_linear_and_cosine_reference_values():
    lin = make_schedule("linear", 1000)
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    cos = make_schedule("cosine", 1000)
    s = 0.008
    f = lambda t: math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert cos.alpha_bars[499].item() == pytest.approx(f(500) / f(0), rel=1e-5)
    assert cos.betas.max().item() <= 0.999 + 1e-7


def test_schedule_errors():
    with pytest.raises(ConfigError, match="unknown diffusion schedule"):
        make_schedule("sigmoid", 5)
    for T in (0, -3):
        with pytest.raises(ConfigError, match="T must be an integer >= 1"):
            make_schedule("vp", T)


def test_q_sample_formula():
    s = make_schedule("vp", 5)
    x0, noise = torch.randn(4, 3), torch.randn(4, 3)
    k = torch.tensor([0, 2, 4, 1])
    out = q_sample(s, x0, k, noise)
    for i in range(4):
        ab = s.alpha_bars[k[i]]
        assert torch.allclose(out[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * noise[i])
    # k over two leading dims
    out2 = q_sample(s, x0.view(2, 2, 3), k.view(2, 2), noise.view(2, 2, 3))
    assert torch.allclose(out2.view(4, 3), out)


def test_ddpm_loss_is_batch_mean_of_squared_norm():
    s = make_schedule("vp", 5)
    x0 = torch.randn(64, 3)
    seen = {}

    def denoise(x, k):
        seen["x"], seen["k"] = x, k
        return torch.zeros_like(x)

    loss = ddpm_loss(denoise, s, x0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    k = torch.randint(5, (64,), generator=g)
    noise = torch.randn(64, 3, generator=g)
    assert torch.equal(seen["k"], k)
    assert torch.allclose(seen["x"], q_sample(s, x0, k, noise))
    assert loss.item() == pytest.approx(noise.square().sum(1).mean().item(), rel=1e-6)
    # the global RNG is used without a generator, so seeding makes it reproducible
    L.seed_everything(7, verbose=False)
    a = ddpm_loss(lambda x, k: x, s, x0)
    L.seed_everything(7, verbose=False)
    assert ddpm_loss(lambda x, k: x, s, x0) == a


def test_reverse_sample_step_order_and_formula():
    s = make_schedule("vp", 5)
    steps = []

    def denoise(x, k):
        steps.append(k)
        return torch.full_like(x, 0.1)

    x_T = torch.randn(8, 2)
    gen = torch.Generator().manual_seed(0)
    out = reverse_sample(denoise, s, x_T, generator=gen, clip=None)
    assert steps == [4, 3, 2, 1, 0]
    # replay Eq. 5 by hand with the same noise stream
    gen = torch.Generator().manual_seed(0)
    x = x_T.clone()
    for k in range(4, -1, -1):
        b, a, ab = s.betas[k].double(), s.alphas[k].double(), s.alpha_bars[k].double()
        x = (x - (b / (1 - ab).sqrt()).float() * 0.1) / a.sqrt().float()
        if k > 0:
            x = x + b.sqrt().float() * torch.randn(x.shape, generator=gen)
    assert torch.allclose(out, x, atol=1e-5)
    assert not torch.equal(out, x_T) and x_T.abs().max() > 0  # x_T is not modified in place
    assert len(reverse_coefficients(s)) == 5


def test_reverse_sample_clips_every_step_and_no_noise_at_last_step():
    s = make_schedule("vp", 5)
    seen_max = []

    def denoise(x, k):
        seen_max.append(x.abs().max().item())
        return -10 * torch.ones_like(x)  # pushes far outside [-1, 1]

    out = reverse_sample(denoise, s, torch.randn(100, 2), clip=1.0)
    assert out.abs().max() <= 1.0 and all(m <= 1.0 for m in seen_max[1:])
    # T = 1: the only step is k = 0, which adds no noise, so the generator does not matter
    one = make_schedule("vp", 1)
    x_T = torch.randn(5, 2)
    a = reverse_sample(lambda x, k: x, one, x_T, generator=torch.Generator().manual_seed(1))
    b = reverse_sample(lambda x, k: x, one, x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_reverse_sample_reproducible_from_global_seed():
    s = make_schedule("vp", 5)
    L.seed_everything(11, verbose=False)
    a = reverse_sample(lambda x, k: 0.5 * x, s, torch.randn(16, 3))
    L.seed_everything(11, verbose=False)
    b = reverse_sample(lambda x, k: 0.5 * x, s, torch.randn(16, 3))
    assert torch.equal(a, b)


def test_reverse_sample_with_exact_denoiser_recovers_gaussian():
    """With the exact eps for 1-D data N(m, sd^2) and many steps, Eq. 5 samples (unclipped)
    have the data's mean and std."""
    m, sd = 0.3, 0.2
    s = make_schedule("vp", 200)

    def exact_eps(x, k):
        ab = s.alpha_bars[k].item()
        mean_a = m + math.sqrt(ab) * sd**2 / (ab * sd**2 + 1 - ab) * (x - math.sqrt(ab) * m)
        return (x - math.sqrt(ab) * mean_a) / math.sqrt(1 - ab)

    out = reverse_sample(exact_eps, s, torch.randn(40_000, 1, generator=torch.Generator().manual_seed(0)),
                         generator=torch.Generator().manual_seed(1), clip=None)
    assert out.mean().item() == pytest.approx(m, abs=0.01)
    assert out.std().item() == pytest.approx(sd, rel=0.05)

"""Reported, not asserted: step timings at paper size (the benchmark measures them properly)."""

from __future__ import annotations

import time

import pytest
import torch

from idql_pl.data.buffer import BufferStream, TransitionBuffer
from idql_pl.models.behavior import DiffusionBehavior
from idql_pl.models.critic import ImplicitCritic
from tests.unit.test_critic import make_arrays, trainer


@pytest.mark.slow
def test_wall_time_1000_steps_paper_size():
    """Reported, not asserted: 1,000 critic steps at paper size (2x256, batch 256), bare and under
    Lightning."""
    arrays = make_arrays(n=100_000, obs_dim=17, action_dim=6)
    buf = TransitionBuffer(arrays, seed=0)
    critic = ImplicitCritic(17, 6)
    v_opt, q_opt = critic.configure_optimizers()
    for _ in range(20):
        critic.update(buf.sample(256), v_opt, q_opt)
    start = time.perf_counter()
    for _ in range(1000):
        critic.update(buf.sample(256), v_opt, q_opt)
    bare = time.perf_counter() - start
    model = ImplicitCritic(17, 6)
    tr = trainer(1000)
    start = time.perf_counter()
    tr.fit(model, train_dataloaders=BufferStream(buf))
    lightning_s = time.perf_counter() - start
    print(f"\n[critic] 1000 steps (batch 256, obs 17, act 6): bare loop {bare:.2f} s ({1000 / bare:.0f}"
          f" steps/s), Lightning fit {lightning_s:.2f} s incl. start-up ({1000 / lightning_s:.0f} steps/s)")
    assert tr.global_step == 1000


@pytest.mark.slow
def test_wall_time_paper_size():
    """Reported, not asserted: paper-size actor steps (LN-ResNet 256/1024 x 3, batch 1024); 100 timed, x10."""
    buf = TransitionBuffer(make_arrays(n=100_000, obs_dim=17, action_dim=6), seed=0)
    model = DiffusionBehavior(17, 6)
    opt, sched = model.make_optimizer(1_000_000)
    for _ in range(5):
        model.update(buf.sample(1024), opt, sched)
    start = time.perf_counter()
    for _ in range(100):
        model.update(buf.sample(1024), opt, sched)
    per_step = (time.perf_counter() - start) / 100
    states = torch.randn(10, 17)
    model.sample(states, 128)
    start = time.perf_counter()
    for _ in range(20):
        model.sample(states, 128)
    sample_s = (time.perf_counter() - start) / 20
    print(f"\n[behavior] paper size, batch 1024: {1000 * per_step:.1f} ms/step ({1 / per_step:.1f} steps/s)"
          f" -> 1000 steps ~ {1000 * per_step:.0f} s (100 timed, extrapolated); sample(10 states x 128, T=5):"
          f" {1000 * sample_s:.1f} ms")

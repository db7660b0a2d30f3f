"""DiffusionBehavior: multimodal behavior cloning, EMA, cosine LR, batched sampling, Lightning fit/resume."""

from __future__ import annotations

import math
import time
import types

import lightning as L
import numpy as np
import pytest
import torch

from idql_pl.algorithm.diffusion import reverse_sample
from idql_pl.data.buffer import BufferStream, TransitionBuffer
from idql_pl.errors import ConfigError
from idql_pl.models.behavior import CosineDecay, DiffusionBehavior
from tests.helpers import random_transitions

S, A = 5, 2


def make_arrays(n: int = 500, seed: int = 0, obs_dim: int = S, action_dim: int = A) -> dict[str, np.ndarray]:
    return random_transitions(n, seed, obs_dim, action_dim)


def small_behavior(**kw) -> DiffusionBehavior:
    args = {"hidden_dim": 32, "ff_dim": 64, "time_dim": 16, "batch_size": 64, **kw}
    return DiffusionBehavior(S, A, **args)


# --------------------------------------------------------------------------- 2-D multimodal (Fig. 1)
CENTERS = torch.tensor([[-0.6, -0.4], [0.6, -0.4], [0.0, 0.6]])
STD = 0.05


def three_clusters(n: int = 3000, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    actions = CENTERS[torch.randint(3, (n,), generator=g)] + STD * torch.randn(n, 2, generator=g)
    states = torch.zeros(n, 1)
    return {"observations": states, "actions": actions.clamp(-1, 1), "rewards": torch.zeros(n),
            "next_observations": states, "masks": torch.ones(n)}


def coverage(score_net: str, steps: int = 3000) -> tuple[float, list[float], float]:
    L.seed_everything(0, verbose=False)
    model = DiffusionBehavior(1, 2, T=50, hidden_dim=64, ff_dim=256, score_net=score_net, batch_size=256,
                              lr=1e-3, ema_rate=0.02)
    opt, sched = model.make_optimizer(steps)
    buf = TransitionBuffer(three_clusters(), seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        model.update(buf.sample(256), opt, sched)
    seconds = time.perf_counter() - start
    # agent 0, state 0
    x = model.sample(torch.zeros(1, 1), 4000, generator=torch.Generator().manual_seed(0))[0, 0]
    dist = torch.cdist(x, CENTERS)
    near, label = dist.min(1)
    far = (near > 4 * STD).float().mean().item()
    per_mode = [((label == j) & (near <= 4 * STD)).float().mean().item() for j in range(3)]
    return far, per_mode, seconds


def test_ln_resnet_covers_all_modes():
    """Three 2-D Gaussian clusters (paper Fig. 1 style), one state: after 3000 steps (width 64) the
    LN-ResNet's samples cover every mode and few lie off them (the plain MLP's comparison is the paper's
    Fig. 3: tests/unit/test_figures.py).

    T = 50 here: with T = 5 even the *exact* denoiser leaves ~46% of Eq. 5 samples more than 4 sd from every
    mode (the last step returns a posterior mean at noise sd 0.44), so T = 5 cannot show mode coverage.
    """
    far, per_mode, seconds = coverage("ln_resnet")
    print(f"\n[2d modes] ln_resnet: {100 * far:.1f}% of samples > 4 sd from every mode; per-mode share "
          f"{', '.join(f'{100 * p:.1f}%' for p in per_mode)}; {seconds:.1f} s for 3000 steps")
    assert far <= 0.05
    assert min(per_mode) >= 0.25


# ------------------------------------------------------------------------------ optimizer, EMA, loss
def test_make_optimizer_adamw_and_cosine_decay():
    model = small_behavior(lr=1e-3)
    opt, sched = model.make_optimizer(100)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.0
    assert small_behavior(weight_decay=0.01).make_optimizer(10)[0].param_groups[0]["weight_decay"] == 0.01
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert (lrs[0] == pytest.approx(1e-3) and lrs[50] == pytest.approx(5e-4)
            and opt.param_groups[0]["lr"] == 0.0)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert CosineDecay(10)(25) == 0.0
    # plain types in checkpoints
    assert sched.state_dict()["lr_lambdas"][0] == {"total_steps": 100, "start": 0}
    with pytest.raises(ConfigError, match="max_steps"):
        model.make_optimizer(0)
    model._trainer = types.SimpleNamespace(max_steps=-1)
    with pytest.raises(ConfigError, match="max_steps"):
        model.configure_optimizers()


def test_update_steps_once_and_ema_moves_by_exactly_the_rate():
    L.seed_everything(0, verbose=False)
    model = small_behavior(ema_rate=0.001)
    with torch.no_grad():
        for p in model.ema_net.parameters():
            p.add_(torch.randn_like(p))
    ema_before = [p.detach().clone() for p in model.ema_net.parameters()]
    net_before = [p.detach().clone() for p in model.net.parameters()]
    opt, sched = model.make_optimizer(10)
    out = model.update(TransitionBuffer(make_arrays()).sample(64), opt, sched)
    loss = out["train/behavior/loss"]
    assert set(out) == {"train/behavior/loss"} and not loss.requires_grad and torch.isfinite(loss)
    assert sched.last_epoch == 1
    moved = [not torch.equal(a, b) for a, b in zip(net_before, model.net.parameters(), strict=True)]
    assert all(moved)
    for e, e_old, p in zip(model.ema_net.parameters(), ema_before, model.net.parameters(), strict=True):
        assert torch.allclose(e, 0.999 * e_old + 0.001 * p, atol=1e-7)
        assert not e.requires_grad


def test_dropout_only_in_training():
    model = small_behavior(dropout=0.5)
    batch = TransitionBuffer(make_arrays()).sample(64)

    def loss() -> torch.Tensor:
        return model.loss(batch, generator=torch.Generator().manual_seed(0))

    model.train()
    assert loss() != loss()
    model.eval()
    assert loss() == loss()
    # the EMA net (used for sampling) has no dropout whatever the mode
    model.train()
    states = torch.randn(3, S)
    a = model.sample(states, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, model.sample(states, 4, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"T": 0}, "T must be"),
        ({"schedule": "sigmoid"}, "schedule"),
        ({"score_net": "unet"}, "score_net"),
        ({"activation": "foo"}, "activation"),
        ({"dropout": 1.0}, "dropout"),
        ({"lr": 0.0}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"ema_rate": 0.0}, "ema_rate"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr_decay_steps": 0}, "lr_decay_steps"),
        ({"clip_actions": 0.0}, "clip_actions"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        small_behavior(**kwargs)


# ------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("score_net", ["ln_resnet", "mlp"])
def test_sample_shapes_range_and_equivalence_to_naive(score_net):
    L.seed_everything(0, verbose=False)
    model = small_behavior(score_net=score_net, clip_actions=0.5)
    with torch.no_grad():  # a non-trivial EMA net
        for p in model.ema_net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    states = torch.randn(4, S)
    out = model.sample(states, 16, generator=torch.Generator().manual_seed(3))
    # [agents, B, N, A]
    assert out.shape == (1, 4, 16, A) and out.abs().max() <= 0.5 and not out.requires_grad
    out = out[0]
    # naive: every (state, candidate) pair through the full forward, same noise stream
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn(4, 16, A, generator=gen)
    flat_states = states.repeat_interleave(16, 0)
    naive = reverse_sample(
        lambda x, k: model.ema_net(x.reshape(1, -1, A), torch.full((1, 64), k),
                                   flat_states[None]).view(4, 16, A),
        model.schedule, x_T, generator=gen, clip=0.5,
    )
    assert torch.allclose(out, naive, atol=1e-5)
    # reproducible from the global seed when no generator is given
    L.seed_everything(5, verbose=False)
    a = model.sample(states, 3)
    L.seed_everything(5, verbose=False)
    assert torch.equal(a, model.sample(states, 3))
    assert model.sample(states).shape == (1, 4, 1, A)


def test_validation_losses_fixed_and_side_effect_free():
    model = small_behavior()
    buf = TransitionBuffer(make_arrays(), seed=0)
    rng = torch.get_rng_state()
    a, b = model.validation_losses(buf), model.validation_losses(buf)
    assert torch.equal(a["loss"], b["loss"]) and torch.isfinite(a["loss"])
    assert torch.equal(rng, torch.get_rng_state())


# ------------------------------------------------------------------------------------------ Lightning
def trainer(max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def fit(max_steps: int, ckpt: str | None = None, buffer_state=None, **trainer_kw):
    L.seed_everything(0, verbose=False)
    model = small_behavior(lr_decay_steps=20)
    buf = TransitionBuffer(make_arrays(), seed=0)
    if buffer_state is not None:
        buf.load_state_dict(buffer_state)
    tr = trainer(max_steps, **trainer_kw)
    tr.fit(model, train_dataloaders=BufferStream(buf), ckpt_path=ckpt, weights_only=True if ckpt else None)
    tr.rng_after_fit = torch.get_rng_state()  # dropout and diffusion noise draw from the global RNG
    return model, tr, buf


def test_fit_checkpoint_and_exact_resume(tmp_path):
    k = 4
    model, tr, buf = fit(k, log_every_n_steps=1)
    assert tr.global_step == k  # one actor step per training_step
    assert {"train/behavior/loss", "perf/actor_steps_per_s"} <= set(tr.callback_metrics)
    assert tr.lr_scheduler_configs[0].scheduler.last_epoch == k
    assert (tr.optimizers[0].param_groups[0]["lr"]
            == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * k / 20))))
    path = str(tmp_path / "behavior.ckpt")
    tr.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert "idql_rng" in ckpt and ckpt["lr_schedulers"][0]["last_epoch"] == k
    assert any(key.startswith("ema_net.") for key in ckpt["state_dict"])
    restored = DiffusionBehavior.load_from_checkpoint(path, map_location="cpu")
    assert all(torch.equal(v, model.state_dict()[key]) for key, v in restored.state_dict().items())

    resumed, tr_resumed, _ = fit(2 * k, ckpt=path, buffer_state=buf.state_dict())
    full, tr_full, _ = fit(2 * k)
    assert tr_full.global_step == tr_resumed.global_step == 2 * k
    for key, v in full.state_dict().items():  # parameters and the EMA copy
        assert torch.equal(resumed.state_dict()[key], v), key
    sa, sb = tr_resumed.optimizers[0].state_dict(), tr_full.optimizers[0].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for key in sa["state"][i]:
            assert torch.equal(sa["state"][i][key], sb["state"][i][key])
    assert (tr_resumed.lr_scheduler_configs[0].scheduler.state_dict()
            == tr_full.lr_scheduler_configs[0].scheduler.state_dict())
    assert torch.equal(tr_resumed.rng_after_fit, tr_full.rng_after_fit)



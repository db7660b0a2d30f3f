"""Algorithm 1 as the paper writes it: the critic and behavior updates against hand-written plain-PyTorch
reference steps (paper-size networks, same init, same batches), the order and counts of IDQL's training step,
and decoupled training (a frozen pretrained behavior model stays bit-identical while the critic trains)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from idql_pl import DiffusionBehavior, ImplicitCritic
from idql_pl.data.buffer import Batch, TransitionBuffer
from tests.helpers import random_transitions

S, A = 17, 6  # hopper's dimensions


def batches(n: int, size: int, seed: int = 0) -> list[Batch]:
    buf = TransitionBuffer(random_transitions(4096, seed=seed, obs_dim=S, action_dim=A, terminal_prob=0.1),
                           seed=seed)
    return [buf.sample(size) for _ in range(n)]


def leaves(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def mlp(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Dense -> ReLU -> ... -> Dense from ``[W0, b0, W1, b1, ...]``."""
    for i in range(0, len(params), 2):
        x = x @ params[i].T + params[i + 1]
        if i < len(params) - 2:
            x = torch.relu(x)
    return x


def test_critic_update_equals_a_hand_written_reference_step():
    """docs/fidelity.md §1 written out by hand: V step (expectile, Eq. 1) on min of the target Qs, Q step
    (Eq. 2) with the new V, Polyak target; Adam 3e-4. Paper size (2x256), batch 256, 3 steps."""
    torch.manual_seed(0)
    critic = ImplicitCritic(S, A)
    tau, gamma, rate = 0.7, 0.99, 0.005
    v = leaves([p[0] for p in critic.v_net.parameters()])  # the one agent's layers
    v_init = [t.detach().clone() for t in v]
    ens = critic.q_net.ensemble
    q = [leaves([t for layer in zip(ens.weights, ens.biases) for t in (layer[0][e], layer[1][e])])
         for e in range(2)]
    tens = critic.q_target_net.ensemble
    q_target = [[t.detach().clone() for layer in zip(tens.weights, tens.biases)
                 for t in (layer[0][e], layer[1][e])]
                for e in range(2)]
    v_opt, q_opt = torch.optim.Adam(v, lr=3e-4), torch.optim.Adam(q[0] + q[1], lr=3e-4)
    ours = critic.configure_optimizers()
    for batch in batches(3, 256):
        critic.update(batch, *ours)
        s, a, r, s2, m = batch
        sa = torch.cat([s, a], 1)
        with torch.no_grad():
            q_hat = torch.minimum(mlp(q_target[0], sa), mlp(q_target[1], sa)).squeeze(1)
        u = q_hat - mlp(v, s).squeeze(1)
        v_loss = (torch.where(u < 0, 1 - tau, tau) * u**2).mean()
        v_opt.zero_grad()
        v_loss.backward()
        v_opt.step()
        with torch.no_grad():
            y = r + gamma * m * mlp(v, s2).squeeze(1)
        q_loss = sum(((mlp(q[e], sa).squeeze(1) - y) ** 2).mean() for e in range(2)) / 2
        q_opt.zero_grad()
        q_loss.backward()
        q_opt.step()
        with torch.no_grad():
            for e in range(2):
                for t, p in zip(q_target[e], q[e]):
                    t.mul_(1 - rate).add_(p, alpha=rate)
    close = dict(rtol=1e-4, atol=1e-6)
    for got, want in zip(critic.v_net.parameters(), v):
        torch.testing.assert_close(got[0], want, **close)
    for e in range(2):
        ours_q = [t for layer in zip(ens.weights, ens.biases) for t in (layer[0][e], layer[1][e])]
        ours_t = [t for layer in zip(tens.weights, tens.biases) for t in (layer[0][e], layer[1][e])]
        for got, want in zip(ours_q, q[e]):
            torch.testing.assert_close(got, want, **close)
        for got, want in zip(ours_t, q_target[e]):
            torch.testing.assert_close(got, want, **close)
    assert all(not torch.equal(a[0], b) for a, b in zip(critic.v_net.parameters(), v_init))  # it did train


def mish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tanh(F.softplus(x))


def score_net(p: dict[str, torch.Tensor], x: torch.Tensor, k: torch.Tensor, s: torch.Tensor, blocks: int,
              dropout: float) -> torch.Tensor:
    """App. G written out: Dense(256) on concat[x, s, fourier(k) -> Dense-mish-Dense], 3 x (x +
    Dense(mish(Dense(LayerNorm(Dropout(x)))))), mish, Dense(action_dim)."""
    f = 2 * math.pi * k.float()[:, None] * p["time_embedding.kernel"][:, 0]
    t = torch.cat([torch.cos(f), torch.sin(f)], 1)
    t = mish(t @ p["time_embedding.mlp.net.0.weight"].T + p["time_embedding.mlp.net.0.bias"])
    t = t @ p["time_embedding.mlp.net.2.weight"].T + p["time_embedding.mlp.net.2.bias"]
    w_in = torch.cat([p["in_action.weight"], p["in_state.weight"], p["in_time.weight"]], 1)
    h = torch.cat([x, s, t], 1) @ w_in.T + p["in_action.bias"]
    for i in range(blocks):
        b = f"blocks.{i}."
        z = F.layer_norm(F.dropout(h, dropout, training=True), (h.shape[1],), p[b + "norm.weight"],
                         p[b + "norm.bias"], eps=1e-6)
        z = mish(z @ p[b + "fc1.weight"].T + p[b + "fc1.bias"])
        h = h + z @ p[b + "fc2.weight"].T + p[b + "fc2.bias"]
    return mish(h) @ p["out.weight"].T + p["out.bias"]


def test_behavior_update_equals_a_hand_written_reference_step():
    """docs/fidelity.md §3 written out by hand: k ~ U{0..T-1}, eps ~ N(0, I), Eq. 4 loss through the LN-ResNet
    with dropout 0.1, AdamW (wd 0) with cosine decay, EMA 0.001. Paper size (256/1024 x 3), batch 1024, 3
    steps; the same seeds give both the same diffusion steps, noise and dropout masks."""
    torch.manual_seed(0)
    total = 10
    behavior = DiffusionBehavior(S, A).train()
    p = {k: t[0].detach().clone().requires_grad_(True) for k, t in behavior.net.named_parameters()}  # agent 0
    ema = {k: t[0].detach().clone() for k, t in behavior.ema_net.named_parameters()}
    opt = torch.optim.AdamW(list(p.values()), lr=3e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt,
                                              lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    alpha_bars = behavior.alpha_bars
    our_opt, our_sched = behavior.make_optimizer(total)
    for i, batch in enumerate(batches(3, 1024)):
        torch.manual_seed(100 + i)
        behavior.update(batch, our_opt, our_sched)
        torch.manual_seed(100 + i)
        k = torch.randint(5, (1024,))
        eps = torch.randn(1024, A)
        ab = alpha_bars[k][:, None]
        x_k = ab.sqrt() * batch.actions + (1 - ab).sqrt() * eps
        loss = ((score_net(p, x_k, k, batch.observations, 3, 0.1) - eps) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for name, t in ema.items():
                t.add_(0.001 * (p[name] - t))
    # Adam divides each gradient by its own running scale, so an element whose gradient is ~0 can move by a
    # fraction of lr (3e-4) on float rounding alone: the tolerance is a third of one step
    close = dict(rtol=1e-4, atol=1e-4)
    for name, got in behavior.net.named_parameters():
        torch.testing.assert_close(got[0], p[name], **close)
    for name, got in behavior.ema_net.named_parameters():
        torch.testing.assert_close(got[0], ema[name], **close, msg=name)
    assert our_sched.get_last_lr() == sched.get_last_lr()





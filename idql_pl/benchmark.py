"""``python -m idql_pl.benchmark``: IDQL throughput on this machine, each figure beside its ceiling.

One run measures (warm-up, then the median over ``--repeats`` timed blocks, competing variants interleaved):

- the float32 2048x2048 matmul rate through ``torch.mm`` (PyTorch's default BLAS) and, on CPU, oneDNN; the
  faster is the FLOP ceiling of everything below, re-measured interleaved with each figure compared to it
  (plus bf16 on CUDA);
- the critic step (``ImplicitCritic.update``, batch 256, 2x256 MLPs) and a naive eager loop of the same nets;
- the actor step (``DiffusionBehavior.update``, batch 1024, LN-ResNet 256/1024 x 3) vs its FLOP ceiling,
  and a naive eager loop of it;
- each step's own GEMMs replayed alone (same shapes and strides): the "GEMM floor", the best an eager step
  could do with zero non-matmul work;
- the joint IDQL step through ``Trainer.fit`` vs the same updates in a bare Python loop;
- batch sampling (``sample(256) + 2 x sample(1024)``) as a fraction of a joint step;
- the extraction sampler (10 states x N=128 x T=5) vs its FLOP ceiling;
- evaluation env-steps/s (10 vector envs, the IDQL policy) vs the sampler-bound rate;
- peak RSS when loading a 1M-transition dataset into the buffer (in a fresh subprocess);
- with ``--compile``: ``compile: true`` (the losses through ``torch.compile``) against eager, actor and critic.

``--only critic,actor,...`` runs just those sections (after the ceiling and the dataset).

FLOPs are counted analytically from the layer shapes (matmuls only; a training step is ~3x the forward).
``--tiny`` runs everything in seconds with small sizes (for the test suite). On a shared machine the figures
drop sharply (OpenMP threads spin-wait on busy cores): the 1-minute load average is printed before and after.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from idql_pl.nets import tune_cpu_allocator

DATASET = "local/pointmaze-umaze"


# ------------------------------------------------------------------------------------------ settings
@dataclass
class Sizes:
    """Problem sizes and timing budget of one benchmark run."""

    critic_hidden: tuple[int, ...] = (256, 256)
    critic_batch: int = 256
    actor_hidden: int = 256
    actor_ff: int = 1024
    actor_blocks: int = 3
    actor_batch: int = 1024
    time_dim: int = 128
    fourier_dim: int = 64
    T: int = 5  # noqa: N815 - the paper's symbol
    matmul_n: int = 2048
    sampler_states: int = 10
    sampler_n: int = 128
    eval_envs: int = 10
    eval_steps: int = 20  # env steps per episode in the eval measurement (TimeLimit)
    dataset_size: int = 1_000_000  # joint step and peak-memory figures
    block_s: float = 1.0  # target length of one timed block
    lightning_steps: int = 12  # timed joint steps per repeat (each path)
    warmup: int = 2

    @classmethod
    def tiny(cls) -> Sizes:
        return cls(critic_hidden=(32, 32), critic_batch=32, actor_hidden=32, actor_ff=64, actor_blocks=2,
                   actor_batch=64, time_dim=16, fourier_dim=8, matmul_n=256, sampler_states=2, sampler_n=8,
                   eval_envs=2, eval_steps=3, dataset_size=2_000, block_s=0.03, lightning_steps=3, warmup=1)


@dataclass
class Figure:
    """One row of the report: ``value`` beside ``reference`` (a ceiling or baseline) and their ``ratio``."""

    name: str
    label: str
    value: float
    unit: str
    reference: float | None = None
    reference_what: str = ""
    ratio: float | None = None
    flops_per_call: float | None = None
    target: str = ""
    ok: bool | None = None
    note: str = ""
    samples: list[float] = field(default_factory=list)
    ceiling_gflops: float | None = None  # the FLOP ceiling this figure was compared with, if any


# --------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_blocks(fn: Callable[[], Any], repeats: int, block_s: float, device: torch.device, warmup: int = 2,
                min_calls: int = 1) -> list[float]:
    """Seconds per call of ``fn`` for ``repeats`` blocks of ~``block_s`` each, after ``warmup`` calls."""
    return time_interleaved([fn], repeats, block_s, device, warmup, min_calls)[0]


def time_interleaved(fns: Sequence[Callable[[], Any]], repeats: int, block_s: float, device: torch.device,
                     warmup: int = 2, min_calls: int = 1) -> list[list[float]]:
    """Like :func:`time_blocks` for several functions, their blocks interleaved (A B C A B C ...), so a
    change in machine load hits all of them alike; returns seconds per call, per function, per block."""
    calls = []
    for fn in fns:
        for _ in range(max(1, warmup)):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        calls.append(max(min_calls, int(math.ceil(block_s / max(time.perf_counter() - t0, 1e-7)))))
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, n, res in zip(fns, calls, out):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            res.append((time.perf_counter() - t0) / n)
    return out


def median_rate(seconds_per_call: Sequence[float], per_call: float = 1.0) -> float:
    """Median over blocks of ``per_call / seconds``."""
    return float(statistics.median(per_call / s for s in seconds_per_call))


# ---------------------------------------------------------------------------------------------- FLOPs
def mlp_flops(dims: Sequence[int]) -> float:
    """Forward matmul FLOPs of one row through Dense layers ``dims[0] -> dims[1] -> ...``."""
    return float(sum(2 * a * b for a, b in zip(dims[:-1], dims[1:])))


def critic_step_flops(obs_dim: int, action_dim: int, hidden: Sequence[int], batch: int) -> float:
    """One critic update: V step (target twin-Q forward + V fwd/bwd) then Q step (V(s') + twin-Q fwd/bwd)."""
    q = mlp_flops([obs_dim + action_dim, *hidden, 1])
    v = mlp_flops([obs_dim, *hidden, 1])
    value_step = 2 * q + 3 * v
    q_step = v + 3 * 2 * q
    return batch * (value_step + q_step)


def _time_table_flops(s: Sizes) -> float:
    return mlp_flops([s.fourier_dim, s.time_dim, s.time_dim]) + 2 * s.time_dim * s.actor_hidden


def score_net_row_flops(obs_dim: int, action_dim: int, s: Sizes, with_state: bool = True) -> float:
    """Forward FLOPs of the LN-ResNet for one (state, noisy action) row, time embedding excluded."""
    h = s.actor_hidden
    flops = 2 * action_dim * h + s.actor_blocks * 2 * (2 * h * s.actor_ff) + 2 * h * action_dim
    return flops + (2 * obs_dim * h if with_state else 0)


def actor_step_flops(obs_dim: int, action_dim: int, s: Sizes) -> float:
    """One behavior update: 3 x forward (forward + backward) on ``actor_batch`` rows plus the ``T``-row time table."""
    return 3.0 * (s.actor_batch * score_net_row_flops(obs_dim, action_dim, s) + s.T * _time_table_flops(s))


def sampler_flops(obs_dim: int, action_dim: int, s: Sizes) -> float:
    """One ``extract_actions`` call: state projections once, T denoising passes over states x N candidates,
    then the target twin-Q on every candidate (argmax extraction)."""
    rows = s.sampler_states * s.sampler_n
    state = s.sampler_states * 2 * obs_dim * s.actor_hidden
    denoise = s.T * rows * score_net_row_flops(obs_dim, action_dim, s, with_state=False)
    q = rows * 2 * mlp_flops([obs_dim + action_dim, *s.critic_hidden, 1])
    return state + s.T * _time_table_flops(s) + denoise + q


# --------------------------------------------------------------------------------------- GEMM floor
_GEMMS = ("mm", "addmm", "bmm", "baddbmm", "_linear_pointwise")


class _TensorSpec(NamedTuple):
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def _spec(x: Any) -> Any:
    return _TensorSpec(tuple(x.shape), tuple(x.stride()), x.dtype, x.device) if isinstance(x, Tensor) else x


class GemmRecorder(TorchDispatchMode):
    """Records every mm/addmm/bmm/baddbmm a function runs (forward and backward): op, shapes, strides."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in _GEMMS:
            self.calls.append((func, tuple(_spec(a) for a in args), {k: _spec(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def gemm_flops(calls: Sequence[tuple[Any, tuple[Any, ...], dict[str, Any]]]) -> float:
    """Exact matmul FLOPs (2 n k m per product) of recorded GEMM calls."""
    total = 0.0
    for func, args, _ in calls:
        name = func.overloadpacket.__name__
        if name == "_linear_pointwise":  # oneDNN: X [..., K] @ W[N, K].T (the binary overload has `other` 2nd)
            x, w = args[0], args[2 if func._overloadname == "binary" else 1]
            total += 2.0 * math.prod(x.size) * w.size[0]
            continue
        a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
        total += 2.0 * math.prod(a.size) * b.size[-1]
    return total


class GemmReplay:
    """Re-runs recorded GEMMs on random tensors of the same shapes and strides: the step's GEMM-only time."""

    def __init__(self, calls: Sequence[tuple[Any, tuple[Any, ...], dict[str, Any]]]):
        def make(x: Any) -> Any:
            if not isinstance(x, _TensorSpec):
                return x
            extent = 1 + sum((n - 1) * st for n, st in zip(x.size, x.stride) if n > 0)
            base = torch.empty(extent, dtype=x.dtype, device=x.device).uniform_(-1, 1)
            return base.as_strided(x.size, x.stride)

        self.calls = [(f, tuple(make(a) for a in args), {k: make(v) for k, v in kw.items()}) for f, args, kw in calls]
        self.flops = gemm_flops(calls)

    def __call__(self) -> None:
        for func, args, kwargs in self.calls:
            func(*args, **kwargs)


def record_gemms(fn: Callable[[], Any]) -> GemmReplay:
    """Run ``fn`` once under :class:`GemmRecorder` and return the replay of its GEMMs."""
    with GemmRecorder() as rec:
        fn()
    return GemmReplay(rec.calls)


# ------------------------------------------------------------------------------------ naive baselines
class NaiveSampler:
    """The naive data path: one tensor per field, ``__getitem__``-style per-sample indexing, then
    ``torch.stack`` per field (what a ``Dataset`` + default collate does, minus the DataLoader)."""

    def __init__(self, data: Tensor, splits: Sequence[int], seed: int = 0):
        self.fields = [f.squeeze(1) if f.shape[1] == 1 else f.contiguous() for f in data.split(list(splits), dim=1)]
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.fields[0].shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        return tuple(f[i] for f in self.fields)

    def sample(self, batch: int) -> tuple[Tensor, ...]:
        items = [self[int(i)] for i in self.rng.integers(len(self), size=batch)]
        return tuple(torch.stack(column) for column in zip(*items))


def _naive_mlp(dims: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class NaiveCritic:
    """IQL critic written the plain way: two separate Q MLPs, separate default Adams (per-parameter loop on
    CPU), a per-parameter Python loop for the Polyak update, ``.item()`` logging, :class:`NaiveSampler` batches."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: Sequence[int], batch: int, sampler: NaiveSampler,
                 device: torch.device, tau: float = 0.7, discount: float = 0.99, rate: float = 0.005):
        self.q1 = _naive_mlp([obs_dim + action_dim, *hidden, 1]).to(device)
        self.q2 = _naive_mlp([obs_dim + action_dim, *hidden, 1]).to(device)
        self.v = _naive_mlp([obs_dim, *hidden, 1]).to(device)
        self.q1_t, self.q2_t = copy.deepcopy(self.q1), copy.deepcopy(self.q2)
        self.opt_v = torch.optim.Adam(self.v.parameters(), lr=3e-4)
        self.opt_q1 = torch.optim.Adam(self.q1.parameters(), lr=3e-4)
        self.opt_q2 = torch.optim.Adam(self.q2.parameters(), lr=3e-4)
        self.batch, self.sampler, self.device = batch, sampler, device
        self.tau, self.discount, self.rate = tau, discount, rate
        self.log: dict[str, float] = {}

    def step(self) -> None:
        s, a, r, s2, m = (t.to(self.device) for t in self.sampler.sample(self.batch))
        sa = torch.cat([s, a], dim=-1)
        with torch.no_grad():
            q_hat = torch.min(self.q1_t(sa), self.q2_t(sa)).squeeze(-1)
        u = q_hat - self.v(s).squeeze(-1)
        weight = torch.where(u < 0, 1 - self.tau, self.tau)
        v_loss = (weight * u**2).mean()
        self.opt_v.zero_grad()
        v_loss.backward()
        self.opt_v.step()
        with torch.no_grad():
            y = r + self.discount * m * self.v(s2).squeeze(-1)
        q_loss = 0.5 * (((self.q1(sa).squeeze(-1) - y) ** 2).mean() + ((self.q2(sa).squeeze(-1) - y) ** 2).mean())
        self.opt_q1.zero_grad()
        self.opt_q2.zero_grad()
        q_loss.backward()
        self.opt_q1.step()
        self.opt_q2.step()
        for net, target in ((self.q1, self.q1_t), (self.q2, self.q2_t)):
            for p, tp in zip(net.parameters(), target.parameters()):
                tp.data.mul_(1 - self.rate).add_(self.rate * p.data)
        self.log = {"v_loss": v_loss.item(), "q_loss": q_loss.item()}


class _NaiveBlock(nn.Module):
    def __init__(self, h: int, ff: int):
        super().__init__()
        self.drop, self.norm = nn.Dropout(0.1), nn.LayerNorm(h)
        self.fc1, self.act, self.fc2 = nn.Linear(h, ff), nn.Mish(), nn.Linear(ff, h)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(self.drop(x)))))


class _NaiveScoreNet(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int, s: Sizes):
        super().__init__()
        self.w = nn.Parameter(torch.randn(s.fourier_dim // 2) * 0.2)
        self.time = nn.Sequential(nn.Linear(s.fourier_dim, s.time_dim), nn.Mish(), nn.Linear(s.time_dim, s.time_dim))
        self.inp = nn.Linear(action_dim + obs_dim + s.time_dim, s.actor_hidden)
        self.blocks = nn.Sequential(*(_NaiveBlock(s.actor_hidden, s.actor_ff) for _ in range(s.actor_blocks)))
        self.out = nn.Sequential(nn.Mish(), nn.Linear(s.actor_hidden, action_dim))

    def forward(self, x: Tensor, k: Tensor, states: Tensor) -> Tensor:
        f = 2 * math.pi * k.unsqueeze(-1) * self.w
        t = self.time(torch.cat([torch.cos(f), torch.sin(f)], dim=-1))
        return self.out(self.blocks(self.inp(torch.cat([x, states, t], dim=-1))))


class NaiveBehavior:
    """DDPM behavior cloning written the plain way: ``nn.Mish``, time embedding per row, concat input,
    default AdamW + LambdaLR, per-parameter EMA loop, ``.item()`` logging, :class:`NaiveSampler` batches."""

    def __init__(self, obs_dim: int, action_dim: int, s: Sizes, sampler: NaiveSampler, device: torch.device):
        from idql_pl.diffusion import make_schedule

        self.net = _NaiveScoreNet(obs_dim, action_dim, s).to(device)
        self.ema = copy.deepcopy(self.net)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=3e-4, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, 10**6) / 10**6)))
        self.alpha_bars = make_schedule("vp", s.T).alpha_bars.to(device)
        self.s, self.sampler, self.device = s, sampler, device
        self.log: dict[str, float] = {}

    def step(self) -> None:
        states, actions, *_ = (t.to(self.device) for t in self.sampler.sample(self.s.actor_batch))
        k = torch.randint(self.s.T, (actions.shape[0],), device=self.device)
        noise = torch.randn_like(actions)
        ab = self.alpha_bars[k].unsqueeze(-1)
        x = ab.sqrt() * actions + (1 - ab).sqrt() * noise
        loss = ((self.net(x, k.float(), states) - noise) ** 2).sum(-1).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            for p, ep in zip(self.net.parameters(), self.ema.parameters()):
                ep.data.mul_(1 - 0.001).add_(0.001 * p.data)
        self.log = {"loss": loss.item()}


# ----------------------------------------------------------------------------------------- builders
def make_critic(obs_dim: int, action_dim: int, s: Sizes) -> Any:
    from idql_pl.critic import ImplicitCritic

    return ImplicitCritic(obs_dim, action_dim, hidden_dims=list(s.critic_hidden), batch_size=s.critic_batch)


def make_behavior(obs_dim: int, action_dim: int, s: Sizes) -> Any:
    from idql_pl.behavior import DiffusionBehavior

    return DiffusionBehavior(obs_dim, action_dim, T=s.T, hidden_dim=s.actor_hidden, num_blocks=s.actor_blocks,
                             ff_dim=s.actor_ff, time_dim=s.time_dim, batch_size=s.actor_batch)


def make_idql(obs_dim: int, action_dim: int, s: Sizes) -> Any:
    from idql_pl.idql import IDQL

    return IDQL(obs_dim, action_dim, critic=functools.partial(make_critic, s=s),
                behavior=functools.partial(make_behavior, s=s), num_samples=s.sampler_n)


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning\..*")
    warnings.filterwarnings("ignore", message=r".*(num_workers|does not have many workers|LeafSpec|isinstance).*")


def load_datamodule(s: Sizes, device: torch.device) -> Any:
    """``OfflineDataModule`` on the local pointmaze recipe (generated on first use), its buffer built."""
    from idql_pl.data.datamodule import OfflineDataModule

    dm = OfflineDataModule(DATASET, dataset_size=s.dataset_size, seed=0)
    dm.setup("fit")
    dm.train_buffer.move_to(device)
    return dm


# --------------------------------------------------------------------------------------- measurements
class Bench:
    """Runs every measurement and collects :class:`Figure` rows."""

    def __init__(self, sizes: Sizes, repeats: int, device: torch.device, log: Callable[[str], None] = print):
        self.s, self.repeats, self.device, self.log = sizes, repeats, device, log
        self.figures: dict[str, Figure] = {}
        self.gflops = self._gflops_now = float("nan")  # the first ceiling; the one measured with the current figure
        self.dm: Any = None
        self.obs_dim = self.action_dim = 0

    def add(self, fig: Figure) -> Figure:
        if fig.reference_what == "FLOP ceiling" and fig.ceiling_gflops is None:
            fig.ceiling_gflops = self._gflops_now
            if fig.ceiling_gflops != self.gflops and not math.isnan(fig.value):
                measured = f"ceiling {fig.ceiling_gflops:.0f} GFLOP/s, measured alongside"
                fig.note = f"{fig.note}; {measured}" if fig.note else measured
        self.figures[fig.name] = fig
        ratio = "" if fig.ratio is None else f"  ratio {fig.ratio:.3f}"
        self.log(f"  {fig.label}: {fig.value:.4g} {fig.unit}{ratio}")
        return fig

    def ceiling(self, flops: float, gflops: float | None = None) -> float:
        """Calls/s if every FLOP ran at the matmul rate (``gflops``; default: the one measured first)."""
        return (self.gflops if gflops is None else gflops) * 1e9 / flops

    def timed(self, fns: Sequence[Callable[[], Any]]) -> tuple[list[list[float]], float]:
        """:func:`time_interleaved` of ``fns`` with the ceiling matmul as one more interleaved function: the
        ceiling (GFLOP/s, returned) is re-measured under the same machine load as the figures compared to it."""
        *secs, ceiling_s = time_interleaved([*fns, self._ceiling_fn], self.repeats, self.s.block_s, self.device,
                                            self.s.warmup)
        self._gflops_now = median_rate(ceiling_s, self._ceiling_flops) / 1e9
        return secs, self._gflops_now

    # ---------------------------------------------------------------- ceiling
    def matmul(self) -> None:
        """torch.mm (PyTorch's default BLAS) and, on CPU, oneDNN's fp32 matmul; the ceiling is the faster."""
        from idql_pl.nets import onednn_linear_available

        n = self.s.matmul_n
        a = torch.randn(n, n, device=self.device)
        b = torch.randn(n, n, device=self.device)
        out = torch.empty(n, n, device=self.device)
        flops = 2.0 * n**3
        fns: dict[str, Callable[[], Any]] = {"torch.mm": lambda: torch.mm(a, b, out=out)}
        if self.device.type == "cpu" and onednn_linear_available():
            fns["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
        secs = time_interleaved(list(fns.values()), self.repeats, self.s.block_s, self.device, self.s.warmup)
        rates = {k: median_rate(x, flops) / 1e9 for k, x in zip(fns, secs)}
        self.gflops = max(rates.values())
        best = max(rates, key=rates.get)
        self._ceiling_fn, self._ceiling_flops = fns[best], flops
        self._gflops_now = self.gflops
        for (kind, rate), x in zip(rates.items(), secs):
            name = "matmul_f32" if kind == "torch.mm" else "matmul_f32_onednn"
            label = f"matmul f32 {n}x{n}, {kind}" + (" (default BLAS)" if kind == "torch.mm" else "")
            note = "FLOP ceiling = the faster fp32 matmul" if kind == best and len(rates) > 1 else ""
            self.add(Figure(name, label, rate, "GFLOP/s", self.gflops, "FLOP ceiling", rate / self.gflops, flops,
                            note=note, samples=[flops / y / 1e9 for y in x]))
        if self.device.type == "cuda":
            a16, b16 = a.bfloat16(), b.bfloat16()
            secs16 = time_blocks(lambda: a16 @ b16, self.repeats, self.s.block_s, self.device, self.s.warmup)
            rate = median_rate(secs16, flops) / 1e9
            self.add(Figure("matmul_bf16", f"matmul bf16 {n}x{n}", rate, "GFLOP/s", self.gflops, "f32 rate",
                            rate / self.gflops, flops))

    # ---------------------------------------------------------------- data
    def data(self) -> None:
        t0 = time.perf_counter()
        self.dm = load_datamodule(self.s, self.device)
        self.obs_dim, self.action_dim = self.dm.obs_dim, self.dm.action_dim
        self.log(f"  dataset {DATASET} n={len(self.dm.train_buffer):,} (obs {self.obs_dim}, action {self.action_dim}) "
                 f"loaded in {time.perf_counter() - t0:.1f} s")

    # ---------------------------------------------------------------- critic
    def critic(self) -> None:
        s, buf = self.s, self.dm.train_buffer
        flops = critic_step_flops(self.obs_dim, self.action_dim, s.critic_hidden, s.critic_batch)
        critic = make_critic(self.obs_dim, self.action_dim, s).to(self.device)
        v_opt, q_opt = critic.configure_optimizers()

        def step() -> None:
            critic.update(buf.sample(s.critic_batch), v_opt, q_opt)

        floor = record_gemms(step)
        naive_sampler = NaiveSampler(buf.data[: min(len(buf), 200_000)].cpu(), buf._splits)
        naive = NaiveCritic(self.obs_dim, self.action_dim, s.critic_hidden, s.critic_batch, naive_sampler, self.device)
        (ours, base, gemm), gflops = self.timed([step, naive.step, floor])
        ceiling = self.ceiling(flops, gflops)
        rate, base_rate, floor_rate = median_rate(ours), median_rate(base), median_rate(gemm)
        b = s.critic_batch
        self.add(Figure("critic_step", f"critic step (ImplicitCritic.update, B={b})", rate, "steps/s", ceiling,
                        "FLOP ceiling", rate / ceiling, flops, samples=[1 / x for x in ours],
                        note=f"{rate / floor_rate:.0%} of the step time is GEMMs"))
        self.add(Figure("critic_naive_step", f"critic naive eager loop (B={b})", base_rate, "steps/s", ceiling,
                        "FLOP ceiling", base_rate / ceiling, flops, samples=[1 / x for x in base]))
        self.add(Figure("critic_gemm_floor", f"critic step GEMMs alone (B={b}, {len(floor.calls)} calls)", floor_rate,
                        "steps/s", ceiling, "FLOP ceiling", floor_rate / ceiling, floor.flops,
                        samples=[1 / x for x in gemm],
                        note=(f"the step's own matmuls replayed: zero non-GEMM overhead would give "
                              f"{floor_rate / base_rate:.2f}x the naive loop")))
        speedup = [bb / o for o, bb in zip(ours, base)]
        self.add(Figure("critic_speedup", "critic step vs naive eager loop", rate, "steps/s", base_rate,
                        "naive loop", statistics.median(speedup), flops, ">= 2.5", statistics.median(speedup) >= 2.5,
                        samples=speedup))

    # ---------------------------------------------------------------- actor
    def actor(self) -> None:
        s, buf = self.s, self.dm.train_buffer
        flops = actor_step_flops(self.obs_dim, self.action_dim, s)
        behavior = make_behavior(self.obs_dim, self.action_dim, s).to(self.device).train()
        opt, sched = behavior.make_optimizer(10**7)

        def step() -> None:
            behavior.update(buf.sample(s.actor_batch), opt, sched)

        floor = record_gemms(step)
        naive_sampler = NaiveSampler(buf.data[: min(len(buf), 200_000)].cpu(), buf._splits)
        naive = NaiveBehavior(self.obs_dim, self.action_dim, s, naive_sampler, self.device)
        (ours, base, gemm), gflops = self.timed([step, naive.step, floor])
        ceiling = self.ceiling(flops, gflops)
        rate, base_rate, floor_rate = median_rate(ours), median_rate(base), median_rate(gemm)
        b = s.actor_batch
        self.add(Figure("actor_step", f"actor step (DiffusionBehavior.update, B={b})", rate, "steps/s", ceiling,
                        "FLOP ceiling", rate / ceiling, flops, ">= 0.85 of ceiling", rate / ceiling >= 0.85,
                        samples=[1 / x for x in ours], note=f"{rate / floor_rate:.0%} of the step time is GEMMs"))
        self.add(Figure("actor_naive_step", f"actor naive eager loop (B={b})", base_rate, "steps/s", ceiling,
                        "FLOP ceiling", base_rate / ceiling, flops, samples=[1 / x for x in base]))
        self.add(Figure("actor_gemm_floor", f"actor step GEMMs alone (B={b}, {len(floor.calls)} calls)", floor_rate,
                        "steps/s", ceiling, "FLOP ceiling", floor_rate / ceiling, floor.flops,
                        samples=[1 / x for x in gemm],
                        note="the step's own matmuls replayed: the best an eager step can do at these shapes"))

    # ---------------------------------------------------------------- joint + Lightning
    def joint(self) -> None:
        import lightning as L

        s, buf = self.s, self.dm.train_buffer
        flops = 2 * actor_step_flops(self.obs_dim, self.action_dim, s) + critic_step_flops(
            self.obs_dim, self.action_dim, s.critic_hidden, s.critic_batch)
        _quiet_lightning()

        class StepTimes(L.Callback):
            def __init__(self) -> None:
                self.times: list[float] = []

            def on_train_batch_end(self, *args: Any) -> None:
                self.times.append(time.perf_counter())

        bare_s, lit_s = [], []
        n, w = s.lightning_steps, s.warmup
        accelerator = "gpu" if self.device.type == "cuda" else "cpu"
        for _ in range(self.repeats):
            # bare loop: IDQL.training_step's updates, called directly
            model = make_idql(self.obs_dim, self.action_dim, s).to(self.device).train()
            actor_opt, sched = model.behavior.make_optimizer(10**7)
            v_opt, q_opt = model.critic.configure_optimizers()
            behavior, critic = model.behavior, model.critic

            def bare_step(behavior: Any = behavior, critic: Any = critic, actor_opt: Any = actor_opt,
                          sched: Any = sched, v_opt: Any = v_opt, q_opt: Any = q_opt) -> None:
                for _ in range(2):
                    behavior.update(buf.sample(s.actor_batch), actor_opt, sched)
                critic.update(buf.sample(s.critic_batch), v_opt, q_opt)

            for _ in range(w):
                bare_step()
            _sync(self.device)
            t0 = time.perf_counter()
            for _ in range(n):
                bare_step()
            _sync(self.device)
            bare_s.append((time.perf_counter() - t0) / n)

            # Lightning: the real Trainer on the real module
            model = make_idql(self.obs_dim, self.action_dim, s)
            timer = StepTimes()
            trainer = L.Trainer(
                accelerator=accelerator, devices=1, max_steps=w + n + 1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                log_every_n_steps=100, callbacks=[timer],
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(model, datamodule=self.dm)
            t = timer.times
            lit_s.append((t[w + n] - t[w]) / n)
        bare_rate, lit_rate = median_rate(bare_s), median_rate(lit_s)
        ceiling, self._gflops_now = self.ceiling(flops), self.gflops
        self.add(Figure("joint_step_bare", "joint step, bare Python loop (2 actor + 1 critic)", bare_rate, "steps/s",
                        ceiling, "FLOP ceiling", bare_rate / ceiling, flops, samples=[1 / x for x in bare_s]))
        ratios = [b / li for b, li in zip(bare_s, lit_s)]
        ratio = statistics.median(ratios)
        self.add(Figure("joint_step_lightning", "joint step, Lightning Trainer.fit", lit_rate, "steps/s", bare_rate,
                        "bare loop", ratio, flops, ">= 0.90 of bare loop", ratio >= 0.90, samples=ratios))
        self._joint_step_s = statistics.median(bare_s)

    # ---------------------------------------------------------------- batch sampling
    def sampling(self) -> None:
        s, buf = self.s, self.dm.train_buffer

        def draw() -> None:
            buf.sample(s.critic_batch)
            buf.sample(s.actor_batch)
            buf.sample(s.actor_batch)

        secs = time_blocks(draw, self.repeats, min(s.block_s, 0.3), self.device, s.warmup)
        per = statistics.median(secs)
        frac = per / self._joint_step_s
        self.add(Figure("batch_sampling", f"batch sampling (1x{s.critic_batch} + 2x{s.actor_batch} rows)", per * 1e6,
                        "us/step", self._joint_step_s * 1e6, "joint step (us)", frac, None, "< 0.03 of a step",
                        frac < 0.03, note=f"buffer of {len(buf):,} rows"))

    # ---------------------------------------------------------------- sampler + evaluation
    def sampler(self) -> None:
        s = self.s
        flops = sampler_flops(self.obs_dim, self.action_dim, s)
        model = make_idql(self.obs_dim, self.action_dim, s).to(self.device).eval()
        self._policy_model = model
        states = self.dm.train_buffer.all().observations[: s.sampler_states].clone()
        gen = torch.Generator(device=self.device).manual_seed(0)

        def act() -> None:
            model.act(states, num_samples=s.sampler_n, generator=gen)

        floor = record_gemms(act)
        (secs, gemm), gflops = self.timed([act, floor])
        calls, floor_calls = median_rate(secs), median_rate(gemm)
        self._sampler_calls_per_s = calls
        ceiling = self.ceiling(flops, gflops)
        label = f"sampler ({s.sampler_states} states x N={s.sampler_n} x T={s.T})"
        self.add(Figure("sampler", label, calls * s.sampler_states, "actions/s", ceiling * s.sampler_states,
                        "FLOP ceiling", calls / ceiling, flops, ">= 0.80 of ceiling", calls / ceiling >= 0.80,
                        samples=[s.sampler_states / x for x in secs],
                        note=f"{calls / floor_calls:.0%} of the call time is GEMMs"))
        self.add(Figure("sampler_gemm_floor", f"sampler GEMMs alone ({len(floor.calls)} calls)",
                        floor_calls * s.sampler_states, "actions/s", ceiling * s.sampler_states, "FLOP ceiling",
                        floor_calls / ceiling, floor.flops, samples=[s.sampler_states / x for x in gemm]))

    def evaluation(self) -> None:
        import gymnasium as gym

        from idql_pl.callbacks.evaluation import rollout

        s, dm, model = self.s, self.dm, self._policy_model

        def make() -> gym.Env:
            return gym.wrappers.TimeLimit(dm.make_env(), max_episode_steps=s.eval_steps)

        env = gym.vector.SyncVectorEnv([make] * s.eval_envs)
        gen = torch.Generator(device=self.device).manual_seed(0)

        def policy(states: Tensor, g: torch.Generator) -> Tensor:
            return model.act(states, num_samples=s.sampler_n, generator=g)

        seeds = list(range(s.eval_envs))
        try:
            rollout(env, policy, seeds, self.device, gen)  # warm-up
            rates = []
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                _, lengths = rollout(env, policy, seeds, self.device, gen)
                rates.append(float(lengths.sum()) / (time.perf_counter() - t0))
        finally:
            env.close()
        rate = statistics.median(rates)
        bound = self._sampler_calls_per_s * s.eval_envs
        self.add(Figure("eval_env_steps", f"evaluation rollout ({s.eval_envs} envs, N={s.sampler_n})", rate,
                        "env-steps/s", bound, "sampler-bound rate", rate / bound, None,
                        note=f"{s.eval_steps}-step episodes; env + host overhead = 1 - ratio", samples=rates))

    # ---------------------------------------------------------------- memory
    def memory(self) -> None:
        from idql_pl.data.local import ensure_local

        ensure_local(DATASET, self.s.dataset_size)  # generate outside the measured process
        cmd = [sys.executable, "-m", "idql_pl.benchmark", "--_memory-probe", str(self.s.dataset_size)]
        env = dict(os.environ)
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"memory probe failed: {out.stderr[-2000:]}")
        probe = json.loads(out.stdout.strip().splitlines()[-1])
        limit = 2 * probe["array_bytes"] + 2**30
        peak = probe["peak_rss_bytes"]
        self.add(Figure("peak_rss", f"peak RSS, {self.s.dataset_size:,}-transition dataset (load + buffer)",
                        peak / 2**20, "MiB", limit / 2**20, "2 x array bytes + 1 GiB", peak / limit, None, "< 1.0",
                        peak < limit, note=(f"arrays {probe['array_bytes'] / 2**20:.1f} MiB; RSS after imports "
                                            f"{probe['import_rss_bytes'] / 2**20:.0f} MiB; load {probe['load_s']:.1f} s")))

    # ---------------------------------------------------------------- torch.compile
    def compiled(self) -> None:
        """``compile: true`` against the eager step, same sizes, timed interleaved."""
        s, buf = self.s, self.dm.train_buffer

        def stepper(kind: str, compile_: bool) -> Callable[[], Any]:
            if kind == "actor":
                m = make_behavior(self.obs_dim, self.action_dim, s).to(self.device).train()
                opt, sched = m.make_optimizer(10**7)
                fn = functools.partial(lambda m, o, sc: m.update(buf.sample(s.actor_batch), o, sc), m, opt, sched)
            else:
                m = make_critic(self.obs_dim, self.action_dim, s).to(self.device)
                v_opt, q_opt = m.configure_optimizers()
                fn = functools.partial(lambda m, v, q: m.update(buf.sample(s.critic_batch), v, q), m, v_opt, q_opt)
            if compile_:
                m.compile_losses()  # what compile: true does under fit
            return fn

        for kind in ("actor", "critic"):
            name, label = f"{kind}_step_compiled", f"{kind} step, compile: true"
            flops = (actor_step_flops(self.obs_dim, self.action_dim, s) if kind == "actor" else
                     critic_step_flops(self.obs_dim, self.action_dim, s.critic_hidden, s.critic_batch))
            try:
                eager, compiled = stepper(kind, False), stepper(kind, True)
                t0 = time.perf_counter()
                compiled()
                compiled()
                compile_s = time.perf_counter() - t0
                eager_s, comp_s = time_interleaved([eager, compiled], self.repeats, s.block_s, self.device, s.warmup)
            except Exception as e:  # report, don't abort the benchmark
                msg = " ".join(str(e).split())[:200]
                self.add(Figure(name, label, float("nan"), "steps/s", note=f"compile failed: {type(e).__name__}: {msg}"))
                continue
            rate, eager_rate = median_rate(comp_s), median_rate(eager_s)
            verdict = "faster" if rate > eager_rate else "slower: keep eager"
            self.add(Figure(name, label, rate, "steps/s", eager_rate, "eager step", rate / eager_rate, flops,
                            note=f"compile {compile_s:.0f} s; {verdict}", samples=[1 / x for x in comp_s]))


# ------------------------------------------------------------------------------------------ memory probe
def _rss_bytes(field_name: str = "VmRSS") -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process's address space, in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # no /proc: ru_maxrss (may include the parent's pages copied at spawn on some systems)
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def memory_probe(size: int) -> dict[str, float]:
    """Load the dataset and build its buffer in this (fresh) process; report its peak RSS.

    ``VmHWM``, not ``ru_maxrss``: Linux carries the spawning parent's high-water mark into ``ru_maxrss``
    across ``vfork`` + ``exec``, which would report the benchmark process's own size."""
    import idql_pl.data.datamodule as datamodule
    import idql_pl.idql  # noqa: F401  (everything a training process imports)
    tune_cpu_allocator()  # as the CLI does

    import_rss = _rss_bytes()
    t0 = time.perf_counter()
    dm = datamodule.OfflineDataModule(DATASET, dataset_size=size, seed=0)
    array_bytes = sum(a.nbytes for a in dm._arrays.values())
    dm.setup("fit")
    load_s = time.perf_counter() - t0
    peak = _rss_bytes("VmHWM")
    return {"peak_rss_bytes": peak, "array_bytes": array_bytes, "import_rss_bytes": import_rss, "load_s": load_s,
            "rows": len(dm.train_buffer)}


# ------------------------------------------------------------------------------------------------ report
def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-2):
        return f"{x:.3e}"
    return f"{x:.{digits}g}"


def format_table(figures: Sequence[Figure]) -> str:
    """Fixed-width table: figure, value, FLOPs per call, reference (ceiling/baseline), ratio, target."""
    rows = [("figure", "value", "unit", "FLOP/call", "reference", "(what)", "ratio", "target", "ok")]
    for f in figures:
        ok = "-" if f.ok is None else ("yes" if f.ok else "NO")
        rows.append((f.label, _fmt(f.value), f.unit, _fmt(f.flops_per_call, 3), _fmt(f.reference), f.reference_what,
                     _fmt(f.ratio, 3), f.target or "-", ok))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in (0, 2, 5, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = [f"  {f.label}: {f.note}" for f in figures if f.note]
    return "\n".join(lines + (["notes:", *notes] if notes else []))


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes have been busy, CPU seconds of this process and its waited-for children);
    NaN without /proc."""
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan"), own
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), own


def _loadavg() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "device": str(device),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


SECTIONS = ("critic", "actor", "joint", "sampling", "sampler", "evaluation", "memory")


def run(sizes: Sizes, repeats: int, device: torch.device, do_compile: bool = False,
        log: Callable[[str], None] = print, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Every measurement in order (``only``: just these of :data:`SECTIONS`, after the matmul ceiling and the
    dataset, which the others need); returns the JSON-able report."""
    torch.manual_seed(0)
    bench = Bench(sizes, repeats, device, log)
    load_before = _loadavg()
    if device.type == "cpu" and load_before > 0.5 * (os.cpu_count() or 1):
        log(f"[bench] warning: 1-minute load average {load_before:.2f} on {os.cpu_count()} cores: other processes "
            f"compete for the CPU and the figures will be low and noisy (OpenMP threads spin-wait on busy cores)")
    t0 = time.perf_counter()
    sections = [("critic", bench.critic), ("actor", bench.actor), ("joint / Lightning", bench.joint),
                ("batch sampling", bench.sampling), ("sampler", bench.sampler), ("evaluation", bench.evaluation),
                ("peak memory", bench.memory)]
    steps = [("matmul ceiling", bench.matmul), ("dataset", bench.data)]
    steps += [(title, fn) for (title, fn), key in zip(sections, SECTIONS, strict=True) if only is None or key in only]
    if do_compile:
        steps.append(("torch.compile", bench.compiled))
    contention: dict[str, float] = {}
    for title, step in steps:
        log(f"[bench] {title}")
        (busy0, own0), w0 = _cpu_seconds(), time.perf_counter()
        step()
        (busy1, own1), w1 = _cpu_seconds(), time.perf_counter()
        contention[title] = max(0.0, ((busy1 - busy0) - (own1 - own0)) / max(w1 - w0, 1e-9))
        log(f"  (other processes used {contention[title]:.2f} CPU cores meanwhile)")
    figures = list(bench.figures.values())
    machine = machine_info(device)
    machine["loadavg_1m_before"], machine["loadavg_1m_after"] = load_before, _loadavg()
    machine["other_processes_cpu_cores"] = contention
    busiest = max(contention, key=contention.get)
    table = format_table(figures)
    if contention[busiest] > 0.1:
        table += (f"\nwarning: other processes used up to {contention[busiest]:.2f} CPU cores during '{busiest}'"
                  " (see machine.other_processes_cpu_cores): those figures are low")
    return {
        "machine": machine,
        "settings": {"repeats": repeats, "sizes": asdict(sizes), "dataset": DATASET, "obs_dim": bench.obs_dim,
                     "action_dim": bench.action_dim},
        "elapsed_s": time.perf_counter() - t0,
        "figures": {f.name: asdict(f) for f in figures},
        "table": table,
    }


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idql_pl.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--tiny", action="store_true", help="small sizes, seconds in all (for tests)")
    parser.add_argument("--repeats", type=int, default=None, help="timed blocks per figure (median; default 5)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile on/off (actor, critic)")
    parser.add_argument("--only", metavar="LIST", default=None,
                        help=f"comma-separated sections to run ({','.join(SECTIONS)}); default: all")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--_memory-probe", dest="memory_probe", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    malloc_tuned = tune_cpu_allocator()  # as the CLI does
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe is not None:
        print(json.dumps(memory_probe(args.memory_probe)))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MUJOCO_GL", "disable")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = Sizes.tiny() if args.tiny else Sizes()
    repeats = args.repeats or (2 if args.tiny else 5)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    only = None if args.only is None else [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(only or ()) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    report = run(sizes, repeats, device, args.compile, only=only)
    report["machine"]["malloc_tuned"] = malloc_tuned
    m = report["machine"]
    print(f"\nIDQL benchmark on {m['device']} ({m['torch_threads']} threads, torch {m['torch']}), "
          f"{report['elapsed_s']:.0f} s, load average {m['loadavg_1m_before']:.2f} -> {m['loadavg_1m_after']:.2f}\n")
    print(report["table"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_json_safe(report), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m idql_pl.benchmark``: IDQL throughput on this machine, each figure beside its ceiling.

One run measures (warm-up, then the median over ``--repeats`` timed blocks, competing variants interleaved):

- the float32 and bfloat16 2048x2048 matmul rates through ``torch.mm``; the float32 rate is the FLOP ceiling
  of everything below, re-measured interleaved with each figure compared to it;
- the critic step (``ImplicitCritic.update``, batch 256, 2x256 MLPs) and the actor step
  (``DiffusionBehavior.update``, batch 1024, LN-ResNet 256/1024 x 3) vs the ceiling, each also under bf16
  autocast (what ``--trainer.precision bf16-mixed`` runs) against float32;
- the joint IDQL step through ``Trainer.fit`` vs the same update functions in a bare Python loop;
- batch sampling (``sample(256) + 2 x sample(1024)``) as a fraction of a joint step;
- the extraction sampler (10 states x N=128 x T=5) vs the ceiling, and under bf16 (``--eval.precision bf16``);
- evaluation env-steps/s (10 vector envs, the IDQL policy) vs the sampler-bound rate;
- peak RSS when loading a 1M-transition dataset into the buffer (in a fresh subprocess);
- with ``--compile``: ``compile: true`` (a training step as one ``torch.compile`` graph) against eager, for
  the actor and the critic trained alone and for the whole joint step at each K of ``--agents`` (default 1);
  ``--compile joint``: just the joint step; ``--compile_mode`` (e.g. ``reduce-overhead``: CUDA graphs) as
  ``--model.compile_mode`` passes it;
- with ``--agents 1,8``: per-agent throughput of the critic, actor and joint steps of ``num_agents = K``
  models (K agents per step, paper-size networks, each agent on its own batch) against the first K,
  interleaved, in float32 and under bf16 autocast, each beside the most batching agents can give (the K = 1
  step's fixed cost, bounded by the step at batch 2, amortized to nothing).

Every figure runs the project's own functions; there is no second implementation to compare against. Large
tensors come from glibc's reused heap, as in the CLI's runs (``idql_pl/runtime/__init__.py``).
``--only critic,actor,...`` runs just those sections (after the ceiling and the dataset); ``--only agents``
just the many-agents section. ``--precisions f32`` (or ``bf16``) limits the many-agents and ``compile: true``
sections to that precision (default both).

FLOPs are counted analytically from the layer shapes (matmuls only; a training step is ~3x the forward).
``--tiny`` runs everything in seconds with small sizes (for the test suite). On a shared machine the figures
drop sharply (OpenMP threads spin-wait on busy cores): the 1-minute load average is printed before and after.
"""

from __future__ import annotations

import argparse
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
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from idql_pl.algorithm.extraction import autocast_for
from idql_pl.algorithm.iteration import IDQLOptimizers
from idql_pl.runtime import reuse_large_blocks

DATASET = "local/pointmaze-umaze"
PRECISIONS = ("f32", "bf16")  # float32, and bf16 autocast (--trainer.precision bf16-mixed)


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
    def quickstart(cls) -> Sizes:
        """configs/quickstart.yaml's networks and batches (score net 64/256 x 3, actor batch 256)."""
        return cls(actor_hidden=64, actor_ff=256, actor_batch=256, sampler_n=32, eval_envs=10)

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
    """One behavior update: 3 x forward (forward + backward) on ``actor_batch`` rows plus the ``T``-row time
    table."""
    return 3.0 * (s.actor_batch * score_net_row_flops(obs_dim, action_dim, s) + s.T * _time_table_flops(s))


def sampler_flops(obs_dim: int, action_dim: int, s: Sizes) -> float:
    """One ``extract_actions`` call: state projections once, T denoising passes over states x N candidates,
    then the target twin-Q on every candidate (argmax extraction)."""
    rows = s.sampler_states * s.sampler_n
    state = s.sampler_states * 2 * obs_dim * s.actor_hidden
    denoise = s.T * rows * score_net_row_flops(obs_dim, action_dim, s, with_state=False)
    q = rows * 2 * mlp_flops([obs_dim + action_dim, *s.critic_hidden, 1])
    return state + s.T * _time_table_flops(s) + denoise + q


# ----------------------------------------------------------------------------------------- builders
def make_critic(obs_dim: int, action_dim: int, s: Sizes, num_agents: int = 1) -> Any:
    from idql_pl.models.critic import ImplicitCritic

    return ImplicitCritic(obs_dim, action_dim, hidden_dims=list(s.critic_hidden), batch_size=s.critic_batch,
                          num_agents=num_agents)


def make_behavior(obs_dim: int, action_dim: int, s: Sizes, num_agents: int = 1) -> Any:
    from idql_pl.models.behavior import DiffusionBehavior

    return DiffusionBehavior(obs_dim, action_dim, T=s.T, hidden_dim=s.actor_hidden, num_blocks=s.actor_blocks,
                             ff_dim=s.actor_ff, time_dim=s.time_dim, batch_size=s.actor_batch,
                             num_agents=num_agents)


def make_idql(obs_dim: int, action_dim: int, s: Sizes, num_agents: int = 1) -> Any:
    from idql_pl.models.idql import IDQL

    return IDQL(obs_dim, action_dim, critic=functools.partial(make_critic, s=s),
                behavior=functools.partial(make_behavior, s=s), num_samples=s.sampler_n,
                num_agents=num_agents)


# the project's per-agent throughput targets at K = 8 vs K = 1 (docs/performance.md, "Many agents per
# process")
AGENT_TARGETS = {"critic": 1.7, "actor": 1.2, "joint": 1.3}


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning\..*")
    warnings.filterwarnings("ignore",
                            message=r".*(num_workers|does not have many workers|LeafSpec|isinstance).*")


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

    def __init__(self, sizes: Sizes, repeats: int, device: torch.device, log: Callable[[str], None] = print,
                 precisions: Sequence[str] = PRECISIONS, compile_mode: str | None = None):
        self.s, self.repeats, self.device, self.log = sizes, repeats, device, log
        self.figures: dict[str, Figure] = {}
        # the first ceiling; the one measured with the current figure
        self.gflops = self._gflops_now = float("nan")
        self.dm: Any = None
        self.obs_dim = self.action_dim = 0
        self.agent_counts: list[int] = [1, 8]
        self.precision_names, self.compile_mode = tuple(precisions), compile_mode

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
        ceiling (GFLOP/s, returned) is re-measured under the same machine load as the figures compared to
        it."""
        *secs, ceiling_s = time_interleaved([*fns, self._ceiling_fn], self.repeats, self.s.block_s,
                                            self.device, self.s.warmup)
        self._gflops_now = median_rate(ceiling_s, self._ceiling_flops) / 1e9
        return secs, self._gflops_now

    # ---------------------------------------------------------------- ceiling
    def matmul(self) -> None:
        """``torch.mm`` in float32 (the FLOP ceiling) and bfloat16, interleaved."""
        n = self.s.matmul_n
        a, b = torch.randn(n, n, device=self.device), torch.randn(n, n, device=self.device)
        a16, b16 = a.bfloat16(), b.bfloat16()
        out, out16 = torch.empty_like(a), torch.empty_like(a16)
        flops = 2.0 * n**3

        def mm32() -> None:
            torch.mm(a, b, out=out)

        secs32, secs16 = time_interleaved([mm32, lambda: torch.mm(a16, b16, out=out16)], self.repeats,
                                          self.s.block_s, self.device, self.s.warmup)
        self.gflops = self._gflops_now = median_rate(secs32, flops) / 1e9
        self._ceiling_fn, self._ceiling_flops = mm32, flops
        self.add(Figure("matmul_f32", f"matmul f32 {n}x{n} (torch.mm)", self.gflops, "GFLOP/s", self.gflops,
                        "FLOP ceiling", 1.0, flops, samples=[flops / y / 1e9 for y in secs32]))
        rate16 = median_rate(secs16, flops) / 1e9
        self.add(Figure("matmul_bf16", f"matmul bf16 {n}x{n} (torch.mm)", rate16, "GFLOP/s", self.gflops,
                        "f32 rate", rate16 / self.gflops, flops, samples=[flops / y / 1e9 for y in secs16]))

    # ---------------------------------------------------------------- data
    def data(self) -> None:
        t0 = time.perf_counter()
        self.dm = load_datamodule(self.s, self.device)
        self.obs_dim, self.action_dim = self.dm.obs_dim, self.dm.action_dim
        self.log(f"  dataset {DATASET} n={len(self.dm.train_buffer):,} (obs {self.obs_dim}, action"
                 f" {self.action_dim}) loaded in {time.perf_counter() - t0:.1f} s")

    def bf16(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` under bf16 autocast, as ``--trainer.precision bf16-mixed`` runs a training step."""

        def run() -> Any:
            with autocast_for(self.device, "bf16"):
                return fn()

        return run

    def precisions(self) -> list[tuple[str, Callable[[Callable[[], Any]], Callable[[], Any]], str]]:
        """(label, wrapper, figure-name suffix) of float32 (``fn`` as it is) and bf16 autocast (:meth:`bf16`),
        those of ``--precisions``."""
        both = {"f32": ("f32", lambda fn: fn, ""), "bf16": ("bf16 autocast", self.bf16, "_bf16")}
        return [both[name] for name in PRECISIONS if name in self.precision_names]

    def step_figures(self, name: str, label: str, step: Callable[[], Any], flops: float, per_call: int = 1,
                     unit: str = "steps/s") -> float:
        """Time ``step`` in float32 and under bf16 autocast, interleaved with the ceiling; add both figures
        and return the float32 calls/s."""
        (f32, b16), gflops = self.timed([step, self.bf16(step)])
        ceiling = self.ceiling(flops, gflops)
        rate, rate16 = median_rate(f32), median_rate(b16)
        self.add(Figure(name, f"{label}, f32", rate * per_call, unit, ceiling * per_call, "FLOP ceiling",
                        rate / ceiling, flops, samples=[per_call / x for x in f32]))
        speedups = [a / b for a, b in zip(f32, b16)]
        self.add(Figure(f"{name}_bf16", f"{label}, bf16 autocast", rate16 * per_call, unit, rate * per_call,
                        "f32", statistics.median(speedups), flops, samples=speedups))
        return rate

    def critic(self) -> None:
        s, buf = self.s, self.dm.train_buffer
        critic = make_critic(self.obs_dim, self.action_dim, s).to(self.device)
        v_opt, q_opt = critic.configure_optimizers()

        def step() -> None:
            critic.update(buf.sample(s.critic_batch), v_opt, q_opt)

        flops = critic_step_flops(self.obs_dim, self.action_dim, s.critic_hidden, s.critic_batch)
        self.step_figures("critic_step", f"critic step (ImplicitCritic.update, B={s.critic_batch})", step,
                          flops)

    def actor(self) -> None:
        s, buf = self.s, self.dm.train_buffer
        behavior = make_behavior(self.obs_dim, self.action_dim, s).to(self.device).train()
        opt, sched = behavior.make_optimizer(10**7)

        def step() -> None:
            behavior.update(buf.sample(s.actor_batch), opt, sched)

        flops = actor_step_flops(self.obs_dim, self.action_dim, s)
        self.step_figures("actor_step", f"actor step (DiffusionBehavior.update, B={s.actor_batch})", step,
                          flops)

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
            opts = IDQLOptimizers(actor_opt, *model.critic.configure_optimizers())

            def bare_step(model: Any = model, opts: IDQLOptimizers = opts, sched: Any = sched) -> None:
                model.update(buf, opts, sched)

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
                accelerator=accelerator, devices=1, max_steps=w + n + 1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=100, callbacks=[timer],
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(model, datamodule=self.dm)
            t = timer.times
            lit_s.append((t[w + n] - t[w]) / n)
        bare_rate, lit_rate = median_rate(bare_s), median_rate(lit_s)
        ceiling, self._gflops_now = self.ceiling(flops), self.gflops
        self.add(Figure("joint_step_bare", "joint step, bare Python loop (2 actor + 1 critic)", bare_rate,
                        "steps/s", ceiling, "FLOP ceiling", bare_rate / ceiling, flops,
                        samples=[1 / x for x in bare_s]))
        ratios = [b / li for b, li in zip(bare_s, lit_s)]
        ratio = statistics.median(ratios)
        self.add(Figure("joint_step_lightning", "joint step, Lightning Trainer.fit", lit_rate, "steps/s",
                        bare_rate, "bare loop", ratio, flops, ">= 0.90 of bare loop", ratio >= 0.90,
                        samples=ratios))
        self._joint_step_s = statistics.median(bare_s)

    # ---------------------------------------------------------------- many agents per process
    def agent_step(self, kind: str, num_agents: int, compiled: bool = False,
                   sizes: Sizes | None = None) -> Callable[[], Any]:
        """One ``kind`` step ("critic", "actor", "joint": 2 actor + 1 critic, ``IDQL.update`` as
        ``training_step`` runs it) of a model of ``num_agents`` agents, each agent on its own batch
        (``sample(B, K)``); ``compiled``: the joint step as ``compile: true`` compiles it; ``sizes``: other
        batch sizes (default: the run's)."""
        s, buf, k = sizes or self.s, self.dm.train_buffer, num_agents
        model = make_idql(self.obs_dim, self.action_dim, s, num_agents=k).to(self.device).train()
        behavior, critic = model.behavior, model.critic
        actor_opt, sched = behavior.make_optimizer(10**7)
        v_opt, q_opt = critic.configure_optimizers()
        if compiled:
            model.hparams.compile_mode = self.compile_mode  # as --model.compile_mode sets it
            model.compile_training()

        def critic_step() -> None:
            critic.update(buf.sample(s.critic_batch, k), v_opt, q_opt)

        def actor_step() -> None:
            behavior.update(buf.sample(s.actor_batch, k), actor_opt, sched)

        def joint_step() -> None:
            model.update(buf, IDQLOptimizers(actor_opt, v_opt, q_opt), sched)

        return {"critic": critic_step, "actor": actor_step, "joint": joint_step}[kind]

    def agents(self) -> None:
        """Per-agent steps/s (``K x`` steps/s) of each ``K`` in ``--agents`` against the first ``K``, in
        float32 and under bf16 autocast, the ``K`` variants of each step interleaved (same machine load).

        Beside them, the most any ``K`` can give per agent (``agents_<step>_bound``): batching agents shares a
        step's fixed cost (Python, dispatch, thread wake-ups), while FLOPs, activation memory traffic and the
        optimizer's per-parameter work grow with ``K``. The K = 1 step at batch 2 pays every fixed cost (and
        its optimizer, which is not fixed), so with ``t`` the step and ``t_2`` the batch-2 step, per-agent
        throughput at any ``K`` is at most ``t / (t - t_2)`` times K = 1's."""
        counts = self.agent_counts
        base = counts[0]
        batch2 = replace(self.s, critic_batch=2, actor_batch=2)
        labels = {"critic": f"critic step (B={self.s.critic_batch})",
                  "actor": f"actor step (B={self.s.actor_batch})", "joint": "joint step (2 actor + 1 critic)"}
        for kind in ("critic", "actor", "joint"):
            target = AGENT_TARGETS[kind] if base == 1 else None  # the target for K = 8 against K = 1
            for precision, wrap, suffix in self.precisions():
                fns = [wrap(self.agent_step(kind, k)) for k in counts]
                fns.append(wrap(self.agent_step(kind, 1, sizes=batch2)))
                *secs, fixed = time_interleaved(fns, self.repeats, self.s.block_s, self.device, self.s.warmup)
                base_rate = base * median_rate(secs[0])
                for k, sec in zip(counts, secs):
                    rate = k * median_rate(sec)
                    per_block = [(k / a) / (base / b) for a, b in zip(sec, secs[0])]
                    ratio = statistics.median(per_block)
                    aim = target if k == 8 else None
                    self.add(Figure(f"agents_{kind}_K{k}{suffix}",
                                    f"{labels[kind]}, K={k}, per agent, {precision}",
                                    rate, "agent-steps/s", base_rate, f"K={base} per agent", ratio, None,
                                    f">= {aim}x K=1" if aim else "", None if aim is None else ratio >= aim,
                                    samples=per_block))
                if base == 1:
                    t, t2 = statistics.median(secs[0]), statistics.median(fixed)
                    bounds = [a / (a - b) if a > b else math.inf for a, b in zip(secs[0], fixed)]
                    bound = statistics.median(bounds)
                    self.add(Figure(f"agents_{kind}_bound{suffix}",
                                    f"{labels[kind]}, most any K gives per agent, "
                                    f"{precision}", bound, "x K=1", None, "", None, None,
                                    f"target {target}x within reach" if target else "",
                                    None if target is None else bound >= target,
                                    note=f"K=1 step {t * 1e3:.2f} ms, of which at most {t2 * 1e3:.2f} ms"
                                         " fixed (the step at batch 2)", samples=bounds))

    def compiled_joint(self) -> None:
        """The joint step with ``compile: true`` (the whole iteration one graph) against eager, for each ``K``
        in ``--agents`` (default 1), in float32 and under bf16 autocast (``--trainer.precision bf16-mixed``),
        timed interleaved; the first two compiled calls (the compile) untimed."""
        flops = 2 * actor_step_flops(self.obs_dim, self.action_dim, self.s) + critic_step_flops(
            self.obs_dim, self.action_dim, self.s.critic_hidden, self.s.critic_batch)
        mode = f" ({self.compile_mode})" if self.compile_mode else ""
        for k in self.agent_counts or [1]:
            for precision, wrap, suffix in self.precisions():
                self.compile_figure(
                    f"joint_step_compiled_K{k}{suffix}",
                    f"joint step, compile: true{mode}, K={k}, {precision}",
                    lambda k=k, wrap=wrap: (wrap(self.agent_step("joint", k)),
                                            wrap(self.agent_step("joint", k, compiled=True))),
                    k * flops, f"eager joint step, K={k}, {precision}")

    def compile_figure(self, name: str, label: str,
                       make: Callable[[], tuple[Callable[[], Any], Callable[[], Any]]],
                       flops: float, reference: str) -> None:
        """Time the compiled step of ``make()`` (eager, compiled) against the eager one, interleaved; the
        first two compiled calls (the compile) are timed apart. A failed compile is reported, not raised."""
        try:
            eager, compiled = make()
            t0 = time.perf_counter()
            compiled()
            compiled()
            compile_s = time.perf_counter() - t0
            eager_s, comp_s = time_interleaved([eager, compiled], self.repeats, self.s.block_s, self.device,
                                               self.s.warmup)
        except Exception as e:  # report, don't abort the benchmark
            msg = " ".join(str(e).split())[:200]
            self.add(Figure(name, label, float("nan"), "steps/s",
                            note=f"compile failed: {type(e).__name__}: {msg}"))
            return
        rate, eager_rate = median_rate(comp_s), median_rate(eager_s)
        verdict = "faster" if rate > eager_rate else "slower: keep eager"
        self.add(Figure(name, label, rate, "steps/s", eager_rate, reference, rate / eager_rate, flops,
                        note=f"compile {compile_s:.0f} s; {verdict}", samples=[1 / x for x in comp_s]))

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
        self.add(Figure("batch_sampling", f"batch sampling (1x{s.critic_batch} + 2x{s.actor_batch} rows)",
                        per * 1e6, "us/step", self._joint_step_s * 1e6, "joint step (us)", frac, None,
                        "< 0.03 of a step", frac < 0.03, note=f"buffer of {len(buf):,} rows"))

    # ---------------------------------------------------------------- sampler + evaluation
    def sampler(self) -> None:
        s = self.s
        model = make_idql(self.obs_dim, self.action_dim, s).to(self.device).eval()
        self._policy_model = model
        states = self.dm.train_buffer.all().observations[: s.sampler_states].clone()
        gen = torch.Generator(device=self.device).manual_seed(0)

        def act() -> None:
            model.act(states, num_samples=s.sampler_n, generator=gen, precision="32")

        label = f"sampler ({s.sampler_states} states x N={s.sampler_n} x T={s.T})"
        flops = sampler_flops(self.obs_dim, self.action_dim, s)
        self._sampler_calls_per_s = self.step_figures("sampler", label, act, flops, s.sampler_states,
                                                      "actions/s")

    def evaluation(self) -> None:
        import gymnasium as gym

        from idql_pl.training.evaluation import rollout

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
                        peak / 2**20, "MiB", limit / 2**20, "2 x array bytes + 1 GiB", peak / limit, None,
                        "< 1.0", peak < limit,
                        note=(f"arrays {probe['array_bytes'] / 2**20:.1f} MiB; RSS after imports "
                              f"{probe['import_rss_bytes'] / 2**20:.0f} MiB; load {probe['load_s']:.1f} s")))

    # ---------------------------------------------------------------- torch.compile
    def compiled(self) -> None:
        """``compile: true`` against the eager step, same sizes, timed interleaved."""
        s, buf = self.s, self.dm.train_buffer

        def stepper(kind: str, compile_: bool) -> Callable[[], Any]:
            if kind == "actor":
                m = make_behavior(self.obs_dim, self.action_dim, s).to(self.device).train()
                opt, sched = m.make_optimizer(10**7)
                fn = functools.partial(lambda m, o, sc: m.update(buf.sample(s.actor_batch), o, sc), m, opt,
                                       sched)
            else:
                m = make_critic(self.obs_dim, self.action_dim, s).to(self.device)
                v_opt, q_opt = m.configure_optimizers()
                fn = functools.partial(lambda m, v, q: m.update(buf.sample(s.critic_batch), v, q), m, v_opt,
                                       q_opt)
            if compile_:
                m.compile_training()  # what compile: true does under fit
            return fn

        for kind in ("actor", "critic"):
            flops = (actor_step_flops(self.obs_dim, self.action_dim, s) if kind == "actor" else
                     critic_step_flops(self.obs_dim, self.action_dim, s.critic_hidden, s.critic_batch))
            self.compile_figure(f"{kind}_step_compiled", f"{kind} step, compile: true",
                                lambda kind=kind: (stepper(kind, False), stepper(kind, True)), flops,
                                "eager step")


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
    import idql_pl.models.idql  # noqa: F401  (everything a training process imports)

    import_rss = _rss_bytes()
    t0 = time.perf_counter()
    dm = datamodule.OfflineDataModule(DATASET, dataset_size=size, seed=0)
    dm.setup("fit")
    data = dm.train_buffer.data
    array_bytes = data.element_size() * data.numel()  # the transitions, float32
    load_s = time.perf_counter() - t0
    peak = _rss_bytes("VmHWM")
    return {"peak_rss_bytes": peak, "array_bytes": array_bytes, "import_rss_bytes": import_rss,
            "load_s": load_s, "rows": len(dm.train_buffer)}


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
        rows.append((f.label, _fmt(f.value), f.unit, _fmt(f.flops_per_call, 3), _fmt(f.reference),
                     f.reference_what, _fmt(f.ratio, 3), f.target or "-", ok))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in (0, 2, 5, 7) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths)))
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
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


SECTIONS = ("critic", "actor", "joint", "sampling", "sampler", "evaluation", "memory")
COMPILE_CHOICES = ("all", "joint")  # --compile: both compile sections; --compile joint: the whole joint step


def run(sizes: Sizes, repeats: int, device: torch.device, do_compile: bool | str = False,
        log: Callable[[str], None] = print, only: Sequence[str] | None = None,
        agents: Sequence[int] | None = None, precisions: Sequence[str] = PRECISIONS,
        compile_mode: str | None = None) -> dict[str, Any]:
    """Every measurement in order (``only``: just these of :data:`SECTIONS`, after the matmul ceiling and the
    dataset, which the others need; ``agents``: also the many-agents section for these K; ``do_compile``: True
    or "all" adds both compile sections, "joint" the whole-joint-step one; ``precisions``: of the many-agents
    and ``compile: true`` sections; ``compile_mode``: ``torch.compile``'s mode for ``compile: true``); returns
    the JSON-able report."""
    torch.manual_seed(0)
    malloc = reuse_large_blocks()  # as the CLI's runs do (idql_pl/runtime/__init__.py)
    log(f"[bench] memory: {malloc}")
    bench = Bench(sizes, repeats, device, log, precisions, compile_mode)
    if agents:
        bench.agent_counts = list(agents)
    load_before = _loadavg()
    if device.type == "cpu" and load_before > 0.5 * (os.cpu_count() or 1):
        log(f"[bench] warning: 1-minute load average {load_before:.2f} on {os.cpu_count()} cores: other"
            " processes compete for the CPU and the figures will be low and noisy"
            " (OpenMP threads spin-wait on busy cores)")
    t0 = time.perf_counter()
    sections = [("critic", bench.critic), ("actor", bench.actor), ("joint / Lightning", bench.joint),
                ("batch sampling", bench.sampling), ("sampler", bench.sampler),
                ("evaluation", bench.evaluation), ("peak memory", bench.memory)]
    steps = [("matmul ceiling", bench.matmul), ("dataset", bench.data)]
    steps += [(title, fn) for (title, fn), key in zip(sections, SECTIONS, strict=True)
              if only is None or key in only]
    if agents:
        steps.append(("many agents per process", bench.agents))
    if do_compile and do_compile != "joint":
        steps.append(("torch.compile", bench.compiled))
    if do_compile:
        steps.append(("torch.compile, whole joint step", bench.compiled_joint))
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
    machine["malloc"] = malloc
    busiest = max(contention, key=contention.get)
    table = format_table(figures)
    if contention[busiest] > 0.1:
        table += (f"\nwarning: other processes used up to {contention[busiest]:.2f} CPU cores during"
                  f" '{busiest}' (see machine.other_processes_cpu_cores): those figures are low")
    return {
        "machine": machine,
        "settings": {"repeats": repeats, "sizes": asdict(sizes), "dataset": DATASET, "obs_dim": bench.obs_dim,
                     "action_dim": bench.action_dim, "compile": do_compile, "compile_mode": compile_mode,
                     "precisions": list(bench.precision_names)},
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
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed blocks per figure (median; default 5)")
    parser.add_argument("--compile", nargs="?", const="all", default=None, choices=COMPILE_CHOICES,
                        help="also time compile: true against eager: the actor and critic steps alone and the"
                             " whole joint step (each K of --agents); --compile joint: only the joint step")
    parser.add_argument("--compile_mode", default=None,
                        help="torch.compile mode of compile: true, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--precisions", metavar="LIST", default=",".join(PRECISIONS),
                        help="precisions of the many-agents and compile: true sections (default f32,bf16)")
    parser.add_argument("--only", metavar="LIST", default=None,
                        help=f"comma-separated sections to run ({','.join(SECTIONS)}); default: all")
    parser.add_argument("--agents", metavar="LIST", default=None,
                        help="comma-separated agent counts K, e.g. 1,8:"
                             " per-agent step throughput vs the first")
    parser.add_argument("--sizes", choices=("paper", "quickstart"), default="paper",
                        help="network and batch sizes: the paper's (default) or configs/quickstart.yaml's")
    parser.add_argument("--dataset_size", type=int, default=None,
                        help="transitions of the local/pointmaze-umaze buffer"
                             " (default 1M; generated on first use)")
    parser.add_argument("--block_s", type=float, default=None,
                        help="seconds of one timed block (default 1.0; less suits fast steps, e.g. a GPU's)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--_memory-probe", dest="memory_probe", type=int, default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe is not None:
        print(json.dumps(memory_probe(args.memory_probe)))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MUJOCO_GL", "disable")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = Sizes.tiny() if args.tiny else Sizes.quickstart() if args.sizes == "quickstart" else Sizes()
    if args.dataset_size is not None:
        if args.dataset_size < 1:
            parser.error("--dataset_size must be >= 1")
        sizes.dataset_size = args.dataset_size
    if args.block_s is not None:
        if not args.block_s > 0:
            parser.error("--block_s must be > 0")
        sizes.block_s = args.block_s
    repeats = args.repeats or (2 if args.tiny else 5)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    only = None if args.only is None else [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(only or ()) - set(SECTIONS) - {"agents"})
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)};"
                     f" choose from {', '.join(SECTIONS)}, agents")
    if only is not None and "agents" in only:  # the many-agents section alone: --agents 1,8 --only agents
        only = [x for x in only if x != "agents"]
        args.agents = args.agents or "1,8"
    try:
        agents = None if args.agents is None else [int(x) for x in args.agents.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--agents: a comma-separated list of integers, e.g. 1,8 (got {args.agents!r})")
    if agents is not None and (not agents or min(agents) < 1):
        parser.error("--agents: agent counts must be >= 1")
    precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    if not precisions or set(precisions) - set(PRECISIONS):
        parser.error(f"--precisions: a comma-separated subset of {','.join(PRECISIONS)} "
                     f"(got {args.precisions!r})")
    report = run(sizes, repeats, device, args.compile or False, only=only, agents=agents,
                 precisions=precisions, compile_mode=args.compile_mode)
    m = report["machine"]
    print(f"\nIDQL benchmark on {m['device']} ({m['torch_threads']} threads, torch {m['torch']}), "
          f"{report['elapsed_s']:.0f} s, load average {m['loadavg_1m_before']:.2f} ->"
          f" {m['loadavg_1m_after']:.2f}\n")
    print(report["table"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_json_safe(report), f, indent=2)
    return 0


if __name__ == "__main__":
    from idql_pl.entrypoint import run_main

    run_main(main)

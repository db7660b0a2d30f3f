"""`python -m idql_pl.benchmark --tiny` runs end to end and reports every figure; analytic FLOP counts match
PyTorch's FLOP counter. No timing asserts (the machine is shared)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from idql_pl.experiments import benchmark as bench

FIGURES = (
    "matmul_f32",
    "matmul_bf16",
    "critic_step",
    "critic_step_bf16",
    "actor_step",
    "actor_step_bf16",
    "joint_step_bare",
    "joint_step_lightning",
    "batch_sampling",
    "sampler",
    "sampler_bf16",
    "eval_env_steps",
    "peak_rss",
)


def _finite_positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.timeout(120)
def test_tiny_benchmark_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "idql_pl.benchmark", "--tiny", "--repeats", "2", "--threads", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    figures = report["figures"]
    missing = [name for name in FIGURES if name not in figures]
    assert not missing, f"missing figures {missing}"
    for name, fig in figures.items():
        assert _finite_positive(fig["value"]), (name, fig)
        assert _finite_positive(fig["reference"]), (name, fig)
        assert _finite_positive(fig["ratio"]), (name, fig)
        assert fig["unit"] and fig["label"]
    for name in ("critic_step", "actor_step", "joint_step_bare", "sampler", "matmul_f32", "critic_step_bf16"):
        assert _finite_positive(figures[name]["flops_per_call"]), name
    # the FLOP ceiling is the fp32 matmul, re-measured beside each timed figure
    assert figures["joint_step_bare"]["ceiling_gflops"] == pytest.approx(figures["matmul_f32"]["value"])
    for name in ("critic_step", "actor_step", "sampler"):  # bf16: the f32 figure is its reference
        assert figures[f"{name}_bf16"]["reference"] == pytest.approx(figures[name]["value"])
    for name in ("critic_step", "actor_step", "sampler"):
        fig = figures[name]
        per_state = 1 if name != "sampler" else report["settings"]["sizes"]["sampler_states"]
        assert _finite_positive(fig["ceiling_gflops"]), name
        assert (fig["reference"] / per_state * fig["flops_per_call"]
                == pytest.approx(fig["ceiling_gflops"] * 1e9))
    for name in ("joint_step_lightning", "batch_sampling", "peak_rss"):
        assert isinstance(figures[name]["ok"], bool) and figures[name]["target"], name
    assert report["machine"]["torch_threads"] == 1
    contention = report["machine"]["other_processes_cpu_cores"]  # CPU used by others, per section
    assert contention and all(math.isfinite(v) and v >= 0 for v in contention.values())
    # the printed table carries every figure's label
    for fig in figures.values():
        assert fig["label"] in proc.stdout


def _counted_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def test_analytic_flops_match_pytorch_counter() -> None:
    """The benchmark's ~3x-forward FLOP counts agree with torch's FLOP counter (matmuls) within 15%."""
    torch.manual_seed(0)
    s = bench.Sizes.tiny()
    obs_dim, action_dim = 4, 2
    n = 4096
    data = {
        "observations": torch.randn(n, obs_dim), "actions": torch.rand(n, action_dim) * 2 - 1,
        "rewards": torch.randn(n), "next_observations": torch.randn(n, obs_dim), "masks": torch.ones(n),
    }
    from idql_pl.data.buffer import TransitionBuffer

    buf = TransitionBuffer(data)

    critic = bench.make_critic(obs_dim, action_dim, s)
    v_opt, q_opt = critic.configure_optimizers()
    batch = buf.sample(s.critic_batch)
    counted = _counted_flops(lambda: critic.update(batch, v_opt, q_opt))
    analytic = bench.critic_step_flops(obs_dim, action_dim, s.critic_hidden, s.critic_batch)
    assert 0.85 <= counted / analytic <= 1.05, (counted, analytic)

    behavior = bench.make_behavior(obs_dim, action_dim, s)
    opt, sched = behavior.make_optimizer(100)
    batch = buf.sample(s.actor_batch)
    counted = _counted_flops(lambda: behavior.update(batch, opt, sched))
    analytic = bench.actor_step_flops(obs_dim, action_dim, s)
    assert 0.85 <= counted / analytic <= 1.05, (counted, analytic)

    model = bench.make_idql(obs_dim, action_dim, s).eval()
    states = torch.randn(s.sampler_states, obs_dim)
    counted = _counted_flops(lambda: model.act(states, num_samples=s.sampler_n))
    analytic = bench.sampler_flops(obs_dim, action_dim, s)
    assert 0.95 <= counted / analytic <= 1.05, (counted, analytic)


@pytest.mark.timeout(120)
def test_only_runs_the_chosen_sections(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "idql_pl.benchmark", "--tiny", "--repeats", "1", "--threads", "1",
         "--only", "critic", "--json", str(out)], capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = set(json.loads(out.read_text())["figures"])
    assert {"critic_step", "critic_step_bf16", "matmul_f32"} <= names  # the ceiling always runs
    assert not any(n.startswith(("actor", "sampler", "joint", "peak")) for n in names), names
    bad = subprocess.run([sys.executable, "-m", "idql_pl.benchmark", "--only", "critc"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "unknown section(s) critc" in bad.stderr


@pytest.mark.timeout(120)
def test_tiny_benchmark_many_agents_section(tmp_path: Path) -> None:
    """``--agents 1,2 --only agents``: per-agent critic, actor and joint figures for each K against K = 1, in
    float32 and bf16 autocast, each with the batching bound (``t / (t - t_2)``, above 1 since the batch-2 step
    costs less than the full one but not nothing)."""
    out = tmp_path / "agents.json"
    proc = subprocess.run(
        [sys.executable, "-m", "idql_pl.benchmark", "--tiny", "--repeats", "1", "--threads", "1",
         "--agents", "1,2", "--only", "agents", "--json", str(out)],
        capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]
    for kind in ("critic", "actor", "joint"):
        for suffix in ("", "_bf16"):
            base, two = figures[f"agents_{kind}_K1{suffix}"], figures[f"agents_{kind}_K2{suffix}"]
            assert base["ratio"] == pytest.approx(1.0) and base["unit"] == "agent-steps/s"
            assert _finite_positive(two["value"]) and _finite_positive(two["ratio"])
            assert two["reference"] == pytest.approx(base["value"])
            bound = figures[f"agents_{kind}_bound{suffix}"]
            # None: JSON's inf, when at these tiny sizes the batch-2 step timed as long as the full one
            assert (bound["value"] is None or bound["value"] > 1) \
                and "fixed (the step at batch 2)" in bound["note"]
            assert bound["target"] == f"target {bench.AGENT_TARGETS[kind]}x within reach"
    assert json.loads(out.read_text())["machine"]["malloc"]
    assert "critic_step" not in figures  # --only agents: just the section (after the ceiling and the dataset)
    bad = subprocess.run([sys.executable, "-m", "idql_pl.benchmark", "--tiny", "--agents", "1,x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--agents" in bad.stderr


@pytest.mark.timeout(300)
def test_compile_joint_alone_in_one_precision_with_its_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--compile joint --precisions f32 --compile_mode M`` (what ``make gpu-check`` runs): the many-agents
    section and the whole joint step compiled for each K, float32 only, with mode M; neither half compiled
    alone, and no bf16 figure. Here K = 1 only, compiled with ``aot_eager`` (no C++ build)."""
    real, modes = torch.compile, []

    def compile_(fn, *args, **kwargs):
        modes.append(kwargs.pop("mode", None))
        return real(fn, *args, **kwargs, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    try:
        report = bench.run(bench.Sizes.tiny(), 1, torch.device("cpu"), do_compile="joint", log=lambda _: None,
                           only=[], agents=[1], precisions=["f32"], compile_mode="max-autotune-no-cudagraphs")
    finally:
        torch._dynamo.reset()
    figures = report["figures"]
    fig = figures["joint_step_compiled_K1"]
    assert _finite_positive(fig["value"]) and _finite_positive(fig["reference"]), fig["note"]
    assert "max-autotune-no-cudagraphs" in fig["label"]
    assert modes == ["max-autotune-no-cudagraphs"]  # one compile (per K), with the mode asked for
    assert not any(name.endswith("_bf16") for name in figures if name != "matmul_bf16"), sorted(figures)
    # the halves alone are not timed
    assert not {"actor_step_compiled", "critic_step_compiled"} & set(figures)
    assert "agents_joint_K1" in figures
    assert report["settings"]["precisions"] == ["f32"] and report["settings"]["compile"] == "joint"
    bad = subprocess.run([sys.executable, "-m", "idql_pl.benchmark", "--precisions", "f16"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--precisions" in bad.stderr

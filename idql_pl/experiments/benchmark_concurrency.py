"""``python -m idql_pl.benchmark_concurrency --runs 1,2,4 --steps N [--pythonpath DIR] [--json PATH]``

Throughput when several runs share one machine (researchers run seeds or W&B agents side by side): for each R,
start R quickstart-sized fits at once (``configs/quickstart.yaml`` with ``--trainer.max_steps N``, evaluation
off, W&B disabled, each in its own run root) and report the total critic steps/s summed over the R runs.

A run's rate is its training-time rate: the critic steps between its logging steps over the time they took,
from its ``csv/metrics.csv`` column ``perf/critic_steps_per_s`` (the harmonic mean over rows, since every row
covers the same number of steps), or, where a run logged none, its steps over its wall time (start-up
included, so lower). ``wall_total_critic_steps_per_s`` is all runs' steps over the wall time of the whole
batch. A run still going at ``--timeout`` is stopped and counts with the rate it logged so far (``timed_out``
in the JSON): that bounds the time a collapsed configuration takes to measure.

``--pythonpath DIR`` measures another checkout (a ``git worktree`` of an older commit) with the same tool: the
fits then run that checkout's code and config (``DIR/configs/quickstart.yaml``). The child processes get the
caller's environment except ``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``, ``MKL_NUM_THREADS`` (each checkout's own
defaults are what is measured; ``--keep-thread-env`` keeps them). A one-step warm-up fit first generates the
dataset, so no run pays for that.

Use a quiet machine: other load changes every figure. Nothing here runs in ``make test`` except a tiny smoke
test.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]  # the checkout this module runs from
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
METRIC = "perf/critic_steps_per_s"


def _child_env(pythonpath: str | None, keep_thread_env: bool) -> dict[str, str]:
    env = dict(os.environ)
    if not keep_thread_env:
        for key in THREAD_ENV:
            env.pop(key, None)
    env["WANDB_MODE"] = "disabled"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(pythonpath).resolve()),
                                             *filter(None, [env.get("PYTHONPATH")])])
    return env


def fit_command(config: Path, steps: int, run_root: Path, seed: int, extra: list[str]) -> list[str]:
    log_every = max(1, min(500, steps // 20))
    return [
        sys.executable, "-m", "idql_pl", "fit", "--config", str(config),
        "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", str(log_every),
        "--trainer.val_check_interval", str(10 * steps + 1), "--trainer.enable_progress_bar", "false",
        "--eval.every_n_steps", "0", "--eval.at_end", "false", "--checkpoint.every_n_train_steps", str(steps),
        "--seed_everything", str(seed), "--run_root", str(run_root), "--run_name", "run", *extra,
    ]


def run_rate(run_dir: Path) -> float | None:
    """Harmonic mean of a run's logged ``perf/critic_steps_per_s`` (None if it logged none)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    with open(path) as f:
        rates = [float(r[METRIC]) for r in csv.DictReader(f) if r.get(METRIC) not in (None, "")]
    rates = [r for r in rates if r > 0]
    return statistics.harmonic_mean(rates) if rates else None


def measure(runs: int, steps: int, config: Path, root: Path, env: dict[str, str], extra: list[str],
            cwd: Path, timeout: float) -> dict[str, Any]:
    procs, logs, starts = [], [], []
    t0 = time.perf_counter()
    for i in range(runs):
        run_root = root / f"R{runs}" / f"run{i}"
        run_root.mkdir(parents=True, exist_ok=True)
        log = open(run_root / "output.txt", "w")  # noqa: SIM115 (closed below)
        logs.append(log)
        starts.append(time.perf_counter())
        procs.append(subprocess.Popen(fit_command(config, steps, run_root, i, extra), env=env, cwd=cwd,
                                      stdout=log, stderr=subprocess.STDOUT))
    per_run = []
    for i, proc in enumerate(procs):
        timed_out = False
        try:
            code = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            code, timed_out = proc.wait(), True
        ended = time.perf_counter()
        logs[i].close()
        run_dir = root / f"R{runs}" / f"run{i}" / "run"
        rate = run_rate(run_dir)
        wall = ended - starts[i]
        per_run.append({"exit_code": code, "timed_out": timed_out, "critic_steps_per_s": rate,
                        "wall_s": round(wall, 2),
                        "wall_critic_steps_per_s": steps / wall if wall > 0 else None,
                        "source": METRIC if rate is not None else "wall time",
                        "output": str(root / f"R{runs}" / f"run{i}" / "output.txt")})
    wall = time.perf_counter() - t0
    # A run stopped by --timeout still counts with the rate it logged before the stop (flagged as timed out).
    ok = [r for r in per_run
          if r["exit_code"] == 0 or (r["timed_out"] and r["critic_steps_per_s"] is not None)]
    total = sum((r["critic_steps_per_s"] if r["critic_steps_per_s"] is not None
                 else r["wall_critic_steps_per_s"])
                for r in ok)
    return {"runs": runs, "steps_per_run": steps, "completed": len(ok),
            "timed_out": sum(r["timed_out"] for r in per_run),
            "total_critic_steps_per_s": total if len(ok) == runs else None,
            "per_run_mean_critic_steps_per_s": total / len(ok) if ok else None,
            "wall_s": round(wall, 2),
            "wall_total_critic_steps_per_s": runs * steps / wall
            if sum(r["exit_code"] == 0 for r in per_run) == runs else None,
            "per_run": per_run}


def _git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idql_pl.benchmark_concurrency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="1,2,4",
                        help="comma-separated numbers of concurrent runs (default 1,2,4)")
    parser.add_argument("--steps", type=int, default=2000, help="critic steps per run (default 2000)")
    parser.add_argument("--pythonpath", default=None, help="a checkout to measure instead of this one")
    parser.add_argument("--config", default=None, help="config (default: <checkout>/configs/quickstart.yaml)")
    parser.add_argument("--extra", default="",
                        help="more fit arguments for every run, one shell-quoted string")
    parser.add_argument("--workdir", default=None, help="where the runs' folders go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--keep-thread-env", action="store_true",
                        help="pass OMP_NUM_THREADS etc. on to the runs")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the one-step warm-up fit (dataset already there)")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds allowed per batch of runs;"
                             " a run stopped by it counts with the rate it logged")
    args = parser.parse_args(argv)

    counts = [int(x) for x in args.runs.split(",") if x.strip()]
    if not counts or min(counts) < 1 or args.steps < 1:
        parser.error("--runs needs positive counts and --steps a positive number")
    checkout = Path(args.pythonpath).resolve() if args.pythonpath else REPO
    config = Path(args.config).resolve() if args.config else checkout / "configs" / "quickstart.yaml"
    env = _child_env(args.pythonpath, args.keep_thread_env)
    extra = shlex.split(args.extra)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="idql_concurrency_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    print(f"[concurrency] checkout {checkout} ({_git_commit(checkout) or 'no git'}), config {config.name},"
          f" {args.steps} critic steps per run, {affinity} CPUs, runs under {root}", flush=True)

    if not args.no_warmup:
        warm = subprocess.run(fit_command(config, 1, root / "warmup", 0, extra), env=env, cwd=checkout,
                              capture_output=True, text=True, timeout=args.timeout)
        if warm.returncode != 0:
            print("[concurrency] warm-up fit failed"
                  f" ({warm.returncode}):\n{warm.stdout[-3000:]}{warm.stderr[-3000:]}",
                  file=sys.stderr)
            return 1

    results = []
    for runs in counts:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        res = measure(runs, args.steps, config, root, env, extra, checkout, args.timeout)
        res["load_average_before"] = load
        results.append(res)
        total = res["total_critic_steps_per_s"]
        shown = f"{total:.1f}" if total is not None else f"FAILED ({res['completed']}/{runs} completed)"
        print(f"[concurrency] R={runs}: total {shown} critic steps/s; per run "
              + ", ".join(f"{r['critic_steps_per_s']:.1f}" if r["critic_steps_per_s"] else "-"
                          for r in res["per_run"])
              + f" (wall {res['wall_s']} s"
              + (f", {res['timed_out']} stopped by --timeout" if res["timed_out"] else "")
              + ")", flush=True)

    solo = next((r["total_critic_steps_per_s"] for r in results if r["runs"] == 1), None)
    print(f"\n{'R':>3} {'total critic steps/s':>21} {'per run':>9} {'vs R=1':>7}")
    for r in results:
        total = r["total_critic_steps_per_s"]
        ratio = f"{total / solo:.2f}" if total and solo else "-"
        per = r["per_run_mean_critic_steps_per_s"]
        print(f"{r['runs']:>3} {total if total is not None else float('nan'):>21.1f} "
              f"{per if per is not None else float('nan'):>9.1f} {ratio:>7}")
    report = {"checkout": str(checkout), "commit": _git_commit(checkout), "config": str(config),
              "steps_per_run": args.steps, "cpus": affinity,
              "cpu_model": platform.processor() or platform.machine(),
              "thread_env_kept": args.keep_thread_env, "extra": extra, "workdir": str(root),
              "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"[concurrency] wrote {args.json}")
    return 0 if all(r["total_critic_steps_per_s"] is not None for r in results) else 1


if __name__ == "__main__":
    from idql_pl.entrypoint import run_main

    run_main(main)

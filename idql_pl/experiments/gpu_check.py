"""``python -m idql_pl.gpu_check`` (``make gpu-check``): the prepared check for one CUDA machine, one command.

For a machine that has PyTorch, Lightning and the scientific stack but not the simulators or the CLI's parser,
and no internet. Its steps, each a subprocess killed at its own time limit (the limits sum to at most
:data:`TOTAL_LIMIT_S`; ``--plan`` prints them):

1. ``install``: the distributions of :data:`WHEELS` this Python lacks are installed from ``--wheels``
   (filled on a networked machine by ``make gpu-wheels``) with ``pip install --no-index --no-deps --target``
   into ``<work>/site``, which every later step has on ``PYTHONPATH``: pip resolves nothing and never
   touches the installed torch or Lightning;
2. ``machine``: GPU, torch, CUDA and Python versions, and an import of every module the check needs;
3. ``cuda_tests``: ``tests/integration/test_cuda.py``, its pass/fail/skip counts; a skipped CUDA test on a
   machine with CUDA fails the check;
4. ``functional_step_tests``: the tests that pin this torch's functional Adam and ``torch.func`` gradients
   (``compile: true``'s update) to the eager step, bit for bit (CPU, eager: seconds);
5. ``fit`` and 6. ``resume``: a quickstart-sized fit on the GPU (bf16-mixed, ``compile: true`` with CUDA
   graphs) through evaluations and checkpoints, then ``--ckpt_path last`` to more steps;
7. ``benchmark``: ``python -m idql_pl.benchmark`` at K = 1 and K = 10, the joint step compiled and eager.

Everything it reports lands in ONE JSON, ``<out>/gpu_check.json`` (``--out``, default ``gpu_check/``; written
after each step): the machine, each step's command, exit code, seconds and output tail, the test counts, the
fit's critic steps/s, evaluation episodes/s and final score (read from its run folder), and the benchmark's
figures with its whole report. Scratch (installed wheels, datasets, run folders, compile caches) stays in
``--work`` (default ``.gpu_check/`` in the repository); nothing outside the repository is read. The exit code
is 1 when any step failed. This module imports only the standard library.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]  # the checkout this module runs from
TOTAL_LIMIT_S = 480  # the whole check: 8 minutes of device time
KILL_GRACE_S = 3  # SIGTERM this long before a step's limit, SIGKILL at it: a step never outlives its limit
TAIL_CHARS = 6000  # of each step's output, in the JSON
MAX_JSON_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Wheel:
    """One distribution the check needs beyond torch, Lightning and the scientific stack: its pinned version
    (the one this project is tested with), the module that proves it importable (None: no module of its own),
    and the oldest preinstalled version that is kept (older ones are replaced from the wheel; None: any)."""

    dist: str
    version: str
    module: str | None
    why: str
    keep_from: str | None = None


# Each runtime dependency named explicitly (installed with --no-deps); `make gpu-wheels` downloads the same
# list (tests/tooling/test_gpu_check.py checks that the Makefile matches). Not needed, so not here: wandb
# (WANDB_MODE=disabled), rliable and submitit (reports, Slurm), mujoco-studio and PyOpenGL (MuJoCo's viewer
# and rendering: MUJOCO_GL=disable), typer (minari's command line).
WHEELS: tuple[Wheel, ...] = (
    Wheel("gymnasium", "1.4.0", "gymnasium", "environments, vector envs"),
    Wheel("gymnasium-robotics", "1.4.2", "gymnasium_robotics", "the point maze of local/pointmaze-umaze"),
    Wheel("mujoco", "4.0.1", "mujoco", "the physics engine (Python package)"),
    Wheel("mujoco-core", "4.0.1", None, "mujoco 4's compiled core (part of the `mujoco` package)"),
    Wheel("minari", "0.5.4", "minari", "the local recipes' dataset format"),
    Wheel("pettingzoo", "1.27.0", "pettingzoo", "imported by gymnasium-robotics"),
    Wheel("imageio", "2.38.2", "imageio", "imported by gymnasium's MuJoCo renderer module"),
    Wheel("glfw", "2.11.0", "glfw", "imported by gymnasium's MuJoCo renderer module (no window is opened)"),
    Wheel("cloudpickle", "3.1.3", "cloudpickle", "gymnasium"),
    Wheel("farama-notifications", "0.0.6", "farama_notifications", "gymnasium"),
    Wheel("jsonargparse", "4.53.0", "jsonargparse", "the CLI (LightningCLI)"),
    Wheel("docstring-parser", "0.18.0", "docstring_parser", "jsonargparse[signatures]"),
    Wheel("typeshed-client", "2.15.0", "typeshed_client", "jsonargparse[signatures]"),
    Wheel("typing-extensions", "4.16.0", "typing_extensions", "gymnasium needs >= 4.12", keep_from="4.12"),
)
# Expected on the GPU machine already (checked and reported by the `machine` step, never installed).
PREINSTALLED = ("torch", "lightning", "torchmetrics", "numpy", "scipy", "pandas", "matplotlib", "h5py",
                "PyYAML", "pytest", "pytest-timeout", "Jinja2", "packaging", "pillow", "setuptools")
PREINSTALLED_MODULES = ("torch", "lightning", "torchmetrics", "numpy", "scipy", "matplotlib", "h5py", "yaml",
                        "pytest", "pytest_timeout", "jinja2")


@dataclass(frozen=True)
class FitSizes:
    """The quickstart-sized fit and its resume: steps, evaluations, checkpoints, dataset."""

    max_steps: int = 2000
    resume_max_steps: int = 3000
    every_n_steps: int = 1000  # evaluation, validation and checkpoint interval
    log_every_n_steps: int = 100
    eval_episodes: int = 10
    eval_envs: int = 10
    dataset_size: int = 50_000


@dataclass
class Step:
    """One step of the check: a subprocess killed at ``limit_s``."""

    name: str
    limit_s: int
    argv: list[str]
    what: str
    needs: tuple[str, ...] = ()  # earlier steps that must have exited 0, else this one is skipped
    result: dict[str, Any] = field(default_factory=dict)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def installed_version(dist: str) -> str | None:
    """The version of ``dist`` this Python sees (``importlib.metadata``), or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_wheels(wheels: Sequence[Wheel] = WHEELS,
                   version_of: Callable[[str], str | None] = installed_version) -> list[Wheel]:
    """The entries of ``wheels`` to install: not installed, or installed older than ``keep_from``."""
    out = []
    for w in wheels:
        have = version_of(w.dist)
        if have is None or (w.keep_from and _version_tuple(have) < _version_tuple(w.keep_from)):
            out.append(w)
    return out


def _wheel_stem(dist: str) -> str:
    """A distribution name as wheel file names spell it (runs of ``-_.`` become ``_``, lowercase)."""
    return re.sub(r"[-_.]+", "_", dist).lower()


def find_wheel_files(needed: Sequence[Wheel], folder: Path) -> tuple[list[Path], list[str]]:
    """The ``.whl`` in ``folder`` of each of ``needed`` at its pinned version, and the ``dist==version`` of
    those without one."""
    files = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    found, absent = [], []
    for w in needed:
        prefix = f"{_wheel_stem(w.dist)}-{w.version}-"
        match = [f for f in files if f.name.lower().startswith(prefix)]
        if match:
            found.append(match[0])
        else:
            absent.append(f"{w.dist}=={w.version}")
    return found, absent


def unzip_wheels(target: Path, wheel_files: Sequence[Path]) -> None:
    """Install wheels without pip (a Python without it): each archive's files into ``target``, its
    ``<name>.data/purelib`` and ``platlib`` too; scripts and headers are skipped (none of :data:`WHEELS` has
    any)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in wheel_files:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                parts = info.filename.split("/")
                if parts[0].endswith(".data"):
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    parts = parts[2:]
                dest = target.joinpath(*parts)
                if not dest.resolve().is_relative_to(target.resolve()):
                    raise ValueError(f"{path.name}: {info.filename} would land outside {target}")
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def install_argv(wheel_files: Sequence[Path], site: Path, python: str = sys.executable,
                 have_pip: bool | None = None) -> list[str]:
    """The install step's command: one ``pip install --no-index --no-deps --target`` of every file (one call,
    so the ``mujoco`` package that mujoco and mujoco-core share is merged, not replaced), or this module's
    unzip fallback when this Python has no pip."""
    if have_pip is None:
        have_pip = importlib.util.find_spec("pip") is not None
    files = [str(f) for f in wheel_files]
    if not have_pip:
        return [python, "-m", "idql_pl.gpu_check", "--_unzip", str(site), *files]
    return [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-warn-script-location",
            "--disable-pip-version-check", "--quiet", "--target", str(site), *files]


# The `machine` step: versions, the GPU, and an import of each module the check needs (JSON on the last line).
PROBE = r"""
import importlib, importlib.metadata as md, json, platform, subprocess, sys
needed, dists = json.loads(sys.argv[1]), json.loads(sys.argv[2])
info = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform()}
import torch
info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_capability=f"{p.major}.{p.minor}",
                bf16_supported=torch.cuda.is_bf16_supported())
try:
    q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=10)
    info["driver"] = q.stdout.strip() or None
except Exception as e:
    info["driver"] = f"nvidia-smi: {type(e).__name__}"
versions = {}
for d in dists:
    try:
        versions[d] = md.version(d)
    except md.PackageNotFoundError:
        versions[d] = None
info["versions"] = versions
errors = {}
for m in needed:
    try:
        importlib.import_module(m)
    except BaseException as e:
        errors[m] = f"{type(e).__name__}: {e}"[:300]
info["import_errors"] = errors
print(json.dumps(info))
"""


def plan(work: Path, python: str = sys.executable, wheel_files: Sequence[Path] = (),
         have_pip: bool | None = None, sizes: FitSizes = FitSizes(), accelerator: str = "gpu") -> list[Step]:
    """The check's steps, in order (the commands run in the repository root). Their limits are estimates for
    an H200 with a cold compile cache; each step's seconds in the JSON say how to resize them."""
    runs, site = work / "runs", work / "site"
    modules = [w.module for w in WHEELS if w.module] + list(PREINSTALLED_MODULES)
    dists = [w.dist for w in WHEELS] + list(PREINSTALLED)
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    gpu = accelerator != "cpu"

    def fit(max_steps: int, *extra: str) -> list[str]:
        every = str(sizes.every_n_steps)
        return [
            python, "-m", "idql_pl", "fit", "--config", "configs/quickstart.yaml",
            "--data.dataset", "local/pointmaze-umaze", "--data.dataset_size", str(sizes.dataset_size),
            "--trainer.accelerator", accelerator, "--trainer.devices", "1",
            *(["--trainer.precision", "bf16-mixed", "--model.compile", "true",
               "--model.compile_mode", "reduce-overhead"] if gpu else []),
            "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", every,
            "--trainer.log_every_n_steps", str(sizes.log_every_n_steps),
            "--trainer.enable_progress_bar", "false",
            "--eval.every_n_steps", every, "--eval.num_episodes", str(sizes.eval_episodes),
            "--eval.num_envs", str(sizes.eval_envs), "--checkpoint.every_n_train_steps", every,
            "--run_root", str(runs), "--run_name", "quickstart", *extra,
        ]

    # the many-agents section (eager) and compile: true at K = 1 and 10, float32 only: two compiles in all
    bench = [
        python, "-m", "idql_pl.benchmark", "--device", "cuda" if gpu else "cpu", "--agents", "1,10",
        "--only", "agents", "--compile", "joint", *(["--compile_mode", "reduce-overhead"] if gpu else []),
        "--precisions", "f32", "--repeats", "3", "--block_s", "0.25",
        "--dataset_size", str(sizes.dataset_size), "--json", str(work / "benchmark.json"),
    ]
    functional = [*pytest, "--junitxml", str(work / "functional_step_tests.xml"),
                  "tests/unit/test_compile.py", "-k", "functional_iteration_is_the_eager_one"]
    return [
        Step("install", 30, install_argv(wheel_files, site, python, have_pip),
             "install the missing packages from the wheels (pip --no-index --no-deps --target)"),
        Step("machine", 30, [python, "-c", PROBE, json.dumps(modules), json.dumps(dists)],
             "GPU, torch/CUDA/Python versions; every needed module imports"),
        Step("cuda_tests", 140,
             [*pytest, "--junitxml", str(work / "cuda_tests.xml"), "tests/integration/test_cuda.py"],
             "tests/integration/test_cuda.py (none may be skipped where CUDA is available)"),
        Step("functional_step_tests", 20, functional,
             "this torch's functional Adam and torch.func gradients == the eager step, bit for bit (CPU)"),
        Step("fit", 110, fit(sizes.max_steps),
             f"quickstart-sized fit to step {sizes.max_steps}"
             + (": bf16-mixed, compile: true (reduce-overhead)" if gpu else " on the CPU")
             + f", evaluations and checkpoints every {sizes.every_n_steps} steps"),
        Step("resume", 50, fit(sizes.resume_max_steps, "--ckpt_path", "last"),
             f"--ckpt_path last to step {sizes.resume_max_steps}", needs=("fit",)),
        Step("benchmark", 100, bench, "joint step at K = 1 and K = 10 (per agent), compile: true on and off"),
    ]


def plan_text(steps: Sequence[Step]) -> str:
    """Each step's limit, name and command, then ``total N s`` (``make gpu-check-plan``)."""
    lines = []
    for s in steps:
        lines.append(f"{s.limit_s:4d} s  {s.name}: {s.what}")
        lines.append(f"         {_show(s.argv)}")
    lines.append(f"total {sum(s.limit_s for s in steps)} s")
    return "\n".join(lines)


def _show(argv: Sequence[str]) -> str:
    """A command as one readable line (the machine probe's source shown as ``<probe>``)."""
    return " ".join("<probe>" if a == PROBE else shlex.quote(a) for a in argv)


# ------------------------------------------------------------------------------------------------- running
def run_step(
    argv: Sequence[str], limit_s: float, env: Mapping[str, str], log: Path, cwd: Path = REPO
) -> dict[str, Any]:
    """Run ``argv`` in its own process group, output to ``log``; SIGTERM the group ``KILL_GRACE_S`` before
    ``limit_s``, SIGKILL it at ``limit_s``. Returns exit code (124 when killed), seconds, whether it timed
    out, and the output's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timed_out = False
    with open(log, "wb") as out:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as e:
            return {
                "returncode": 127,
                "seconds": 0.0,
                "timed_out": False,
                "output_tail": f"cannot start: {e}",
            }
        try:
            code = proc.wait(timeout=max(0.1, limit_s - KILL_GRACE_S))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            proc.wait()
            code = 124
    seconds = time.perf_counter() - t0
    tail = log.read_bytes()[-TAIL_CHARS:].decode(errors="replace")
    if timed_out:
        tail += f"\n[gpu-check] killed at its limit of {limit_s:g} s"
    return {"returncode": code, "seconds": round(seconds, 1), "timed_out": timed_out, "output_tail": tail}


def junit_counts(path: Path) -> dict[str, Any] | None:
    """Pass/fail/error/skip counts of a pytest ``--junitxml`` report, with the skipped tests' reasons."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "skipped_reasons": {}}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "error" in kinds:
            counts["errors"] += 1
        elif "failure" in kinds:
            counts["failed"] += 1
        elif "skipped" in kinds:
            counts["skipped"] += 1
            counts["skipped_reasons"][name] = (case.find("skipped").get("message") or "")[:200]
        else:
            counts["passed"] += 1
    counts["total"] = counts["passed"] + counts["failed"] + counts["errors"] + counts["skipped"]
    return counts


def _floats(rows: Sequence[Mapping[str, str]], key: str) -> list[tuple[int, float]]:
    out = []
    for r in rows:
        if r.get(key) not in (None, ""):
            out.append((int(float(r.get("step") or 0)), float(r[key])))
    return out


def fit_summary(run_dir: Path, fit_steps: int) -> dict[str, Any]:
    """The fit's figures from its run folder's ``csv/metrics.csv``: critic steps/s (each logged value, and the
    median of those after the first of each process, which includes the compile), every evaluation (score,
    episodes, episodes/s = env steps/s over the mean episode length), and the final score."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return {"error": f"no {path}"}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, Any] = {"run_dir": str(run_dir), "metrics_rows": len(rows)}
    critic = _floats(rows, "perf/critic_steps_per_s")
    for label, part in (("fit", [v for s, v in critic if s <= fit_steps]),
                        ("resume", [v for s, v in critic if s > fit_steps])):
        out[f"critic_steps_per_s_{label}"] = {
            "logged": [round(v, 2) for v in part],
            "median_after_first": round(statistics.median(part[1:]), 2) if len(part) > 1 else None,
        }
    evals = []
    for r in rows:
        if r.get("eval/normalized_score") in (None, ""):
            continue
        rate = float(r.get("perf/eval_env_steps_per_s") or "nan")
        length = float(r.get("eval/episode_length") or "nan")
        evals.append({"step": int(float(r["step"])), "normalized_score": float(r["eval/normalized_score"]),
                      "return": float(r.get("eval/return") or "nan"),
                      "episodes": float(r.get("eval/num_episodes") or 0), "env_steps_per_s": round(rate, 1),
                      "episodes_per_s": round(rate / length, 3) if length > 0 else None})
    out["evaluations"] = evals
    if evals:
        out["final_score"] = evals[-1]["normalized_score"]
        out["final_step"] = evals[-1]["step"]
        out["eval_episodes_per_s"] = evals[-1]["episodes_per_s"]
    out["checkpoints"] = sorted(p.name for p in run_dir.glob("*.ckpt"))
    return out


def benchmark_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The benchmark's joint-step figures: steps/s at K = 1 and per agent at each K, eager and
    ``compile: true``, per precision (``joint_step_compiled_K<k>``: value compiled, reference eager)."""
    out: dict[str, Any] = {}
    for name, fig in report.get("figures", {}).items():
        m = re.fullmatch(r"joint_step_compiled_K(\d+)(_bf16)?", name)
        if not m:
            continue
        k, precision = int(m.group(1)), "bf16" if m.group(2) else "f32"
        per = out.setdefault(precision, {}).setdefault(f"K{k}", {})
        compiled, eager = fig.get("value"), fig.get("reference")
        per["compiled_steps_per_s"], per["eager_steps_per_s"] = compiled, eager
        per["compiled_agent_steps_per_s"] = None if compiled is None else compiled * k
        per["eager_agent_steps_per_s"] = None if eager is None else eager * k
        per["compiled_over_eager"] = fig.get("ratio")
        per["note"] = fig.get("note", "")
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def step_env(work: Path, base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The steps' environment: the installed wheels first on ``PYTHONPATH``; W&B off; offline; no rendering
    (MuJoCo never opens a GL context); datasets, matplotlib's and the compilers' caches inside ``work``."""
    site = str(work / "site")
    path = os.pathsep.join(p for p in (site, base.get("PYTHONPATH", "")) if p)
    return {**base, "PYTHONPATH": path, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
            "MUJOCO_GL": "disable", "PYTHONUNBUFFERED": "1", "PIP_NO_INPUT": "1",
            "MINARI_DATASETS_PATH": str(work / "datasets" / "minari"),
            "D4RL_DATASET_DIR": str(work / "datasets" / "d4rl"), "MPLCONFIGDIR": str(work / "matplotlib"),
            "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"), "TRITON_CACHE_DIR": str(work / "triton")}


class Report:
    """The check's one JSON, rewritten after every step."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path, self.data = path, data

    def write(self) -> None:
        text = json.dumps(self.data, indent=1, default=str)
        if len(text.encode()) > MAX_JSON_BYTES and "benchmark" in self.data:  # keep it returnable
            self.data["benchmark"].pop("report", None)
            text = json.dumps(self.data, indent=1, default=str)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.path)


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def evaluate_step(step: Step, report: dict[str, Any], work: Path, sizes: FitSizes) -> list[str]:
    """Read what ``step`` produced into ``report``; return its failures (empty: passed)."""
    res = step.result
    fails = []
    if res.get("returncode") != 0:
        killed = " (killed at its time limit)" if res.get("timed_out") else ""
        fails.append(f"{step.name}: exit {res.get('returncode')}{killed}")
    if step.name == "machine":
        info = _last_json_line(res.get("output_tail", ""))
        report["machine"].update(info or {})
        if info is None:
            fails.append("machine: no probe output")
        else:
            if not info.get("cuda_available"):
                fails.append("machine: torch sees no CUDA device")
            if info.get("import_errors"):
                fails.append(f"machine: cannot import {', '.join(sorted(info['import_errors']))}")
    elif step.name in ("cuda_tests", "functional_step_tests"):
        counts = junit_counts(work / f"{step.name}.xml")
        report[step.name] = counts
        if counts is None:
            fails.append(f"{step.name}: no junit report")
        else:
            if counts["failed"] or counts["errors"]:
                fails.append(f"{step.name}: {counts['failed']} failed, {counts['errors']} errors")
            if step.name == "cuda_tests" and report["machine"].get("cuda_available") and counts["skipped"]:
                fails.append(f"cuda_tests: {counts['skipped']} skipped on a machine with CUDA")
            if counts["passed"] == 0:
                fails.append(f"{step.name}: no test passed")
    elif step.name in ("fit", "resume"):
        summary = fit_summary(work / "runs" / "quickstart", sizes.max_steps)
        report["fit"] = summary
        want = sizes.max_steps if step.name == "fit" else sizes.resume_max_steps
        if summary.get("final_step") != want:
            fails.append(f"{step.name}: no evaluation at step {want} in the run folder")
        if "last.ckpt" not in summary.get("checkpoints", []):
            fails.append(f"{step.name}: no last.ckpt")
    elif step.name == "benchmark":
        path = work / "benchmark.json"
        if path.is_file():
            bench = json.loads(path.read_text())
            report["benchmark"] = {"summary": benchmark_summary(bench), "report": bench}
            failed = [n for n, f in bench.get("figures", {}).items() if "failed" in (f.get("note") or "")]
            if failed:
                fails.append(f"benchmark: {', '.join(failed)} failed")
        elif res.get("returncode") == 0:
            fails.append("benchmark: no JSON")
    return fails


def run_check(out: Path, wheels: Path, work: Path, python: str = sys.executable, sizes: FitSizes = FitSizes(),
              steps: list[Step] | None = None, only: Sequence[str] | None = None) -> int:
    """Run every step (or ``steps``, e.g. fake commands in tests; ``only``: just those names), writing
    ``out/gpu_check.json`` after each. Returns 0 when every step passed, else 1."""
    started = time.perf_counter()
    for stale in ("runs", "site", "logs"):  # a previous check's; datasets and compile caches are kept
        shutil.rmtree(work / stale, ignore_errors=True)
    for stale in ("benchmark.json", "cuda_tests.xml", "functional_step_tests.xml"):
        (work / stale).unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    need = missing_wheels()
    files, absent = find_wheel_files(need, wheels)
    if steps is None:
        steps = plan(work, python, files, sizes=sizes)
    data: dict[str, Any] = {
        "schema": 1, "started": _now(), "command": [sys.executable, "-m", "idql_pl.gpu_check", *sys.argv[1:]],
        "repository": str(REPO), "work": str(work), "total_limit_s": sum(s.limit_s for s in steps),
        "plan": [{"name": s.name, "limit_s": s.limit_s, "what": s.what, "command": _show(s.argv)}
                 for s in steps],
        "machine": {"python": platform.python_version(), "host_platform": platform.platform()},
        "packages": {"wheels_folder": str(wheels), "missing_before": [f"{w.dist}=={w.version}" for w in need],
                     "installed_from_wheels": [f.name for f in files], "no_wheel": absent},
        "steps": {}, "failures": [],
    }
    report = Report(out / "gpu_check.json", data)
    failures: list[str] = [f"install: no wheel for {a} in {wheels}" for a in absent]
    data["failures"] = failures
    report.write()
    exited_0: set[str] = set()
    for step in steps:
        entry: dict[str, Any] = {"command": _show(step.argv), "limit_s": step.limit_s, "what": step.what}
        data["steps"][step.name] = entry
        if only is not None and step.name not in only:
            entry["skipped"] = "not in --only"
            continue
        if step.name == "install" and not files:
            entry["skipped"] = "nothing to install" if not need else "no wheels found"
            continue
        blocked = [n for n in step.needs if n not in exited_0 and (only is None or n in only)]
        if blocked:
            entry["skipped"] = f"needs {', '.join(blocked)}, which did not exit 0"
            failures.append(f"{step.name}: skipped ({entry['skipped']})")
            report.write()
            continue
        print(f"[gpu-check] {step.name} (limit {step.limit_s} s): {step.what}", flush=True)
        step.result = run_step(step.argv, step.limit_s, step_env(work), work / "logs" / f"{step.name}.log")
        entry.update(step.result)
        fails = evaluate_step(step, data, work, sizes)
        failures.extend(fails)
        if entry["returncode"] == 0:
            exited_0.add(step.name)
        verdict = f"; FAILED: {'; '.join(fails)}" if fails else ""
        print(f"[gpu-check] {step.name}: exit {entry['returncode']} in {entry['seconds']} s{verdict}",
              flush=True)
        report.write()
    data["finished"], data["seconds"] = _now(), round(time.perf_counter() - started, 1)
    data["ok"] = not failures
    report.write()
    print(f"[gpu-check] {'passed' if data['ok'] else 'FAILED: ' + '; '.join(failures)}")
    print(f"[gpu-check] report: {report.path}")
    return 0 if data["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idql_pl.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check"),
                        help="folder of the one JSON report, gpu_check.json (e.g. $OUT)")
    parser.add_argument("--wheels", type=Path, default=Path("wheels"),
                        help="folder of the wheels of the missing packages (make gpu-wheels)")
    parser.add_argument("--work", type=Path, default=Path(".gpu_check"),
                        help="scratch: installed wheels, datasets, run folders, compile caches (git-ignored)")
    parser.add_argument("--plan", action="store_true", help="print each step's limit and command; run none")
    parser.add_argument("--only", default=None, metavar="LIST", help="run just these steps (comma-separated)")
    parser.add_argument("--_unzip", nargs="+", dest="unzip", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.unzip:
        unzip_wheels(Path(args.unzip[0]), [Path(p) for p in args.unzip[1:]])
        return 0
    work = args.work if args.work.is_absolute() else REPO / args.work
    wheels = args.wheels if args.wheels.is_absolute() else REPO / args.wheels
    if args.plan:
        files, _ = find_wheel_files(missing_wheels(), wheels)
        print(plan_text(plan(work, sys.executable, files)))
        return 0
    names = {s.name for s in plan(work)}
    only = None if args.only is None else [x.strip() for x in args.only.split(",") if x.strip()]
    if only is not None and (not only or set(only) - names):
        parser.error(f"--only: a comma-separated subset of {', '.join(sorted(names))}")
    return run_check(args.out.resolve(), wheels, work, only=only)


if __name__ == "__main__":
    from idql_pl.entrypoint import run_main

    run_main(main)

"""``python -m idql_pl.gpu_check`` (``make gpu-check``): the prepared check for a CUDA machine.

For a GPU machine that has PyTorch and Lightning but maybe not the simulators or W&B, and no internet:
1. packages the project needs but the machine lacks are installed from the wheels in ``--wheels`` (default
   ``wheels/`` beside the repository's Makefile, filled on a networked machine by ``make gpu-wheels``); the
   report says which were installed and which are still missing;
2. the CUDA tests (``tests/test_cuda.py``) and the compile tests run;
3. a 2-minute ``fit`` of ``configs/loco.yaml`` (paper-size networks) on the local recipe
   ``local/pointmaze-umaze``, evaluated at the end;
4. the benchmark with ``--compile --agents 1,10`` (K = 1 and K = 10, compile on and off).

Everything lands in ``--out`` (default ``gpu_check/``): ``gpu_check.json`` (each step's command, exit code,
seconds and output tail) and ``benchmark.json``. The exit code is non-zero when any step failed.
``--dry-run`` writes the plan without running it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# import name -> distribution name of what the project imports at run time (torch and lightning are assumed)
NEEDED = {
    "gymnasium": "gymnasium", "gymnasium_robotics": "gymnasium-robotics", "minari": "minari", "mujoco": "mujoco",
    "wandb": "wandb", "jsonargparse": "jsonargparse", "docstring_parser": "docstring-parser",
    "typeshed_client": "typeshed-client", "h5py": "h5py", "matplotlib": "matplotlib", "torchmetrics": "torchmetrics",
    "pytest": "pytest", "pytest_timeout": "pytest-timeout", "yaml": "PyYAML",
}
FIT_SECONDS = 120


def missing_packages(needed: dict[str, str] = NEEDED) -> list[str]:
    """The distributions of ``needed`` whose module cannot be imported here."""
    return [dist for module, dist in needed.items() if importlib.util.find_spec(module) is None]


def install_from_wheels(dists: Sequence[str], wheels: Path) -> tuple[list[str], str]:
    """``pip install --no-index --find-links wheels`` each of ``dists`` (no internet); returns (the ones that
    installed, pip's output tail)."""
    if not dists or not wheels.is_dir():
        return [], f"no wheels directory {wheels}" if dists else ""
    done, log = [], []
    for dist in dists:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), dist],
                              capture_output=True, text=True)
        log.append(f"{dist}: {'installed' if proc.returncode == 0 else 'failed'} {proc.stdout[-300:]}{proc.stderr[-300:]}")
        if proc.returncode == 0:
            done.append(dist)
    return done, "\n".join(log)


def plan(out: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, timeout in s) of the check's steps."""
    py = sys.executable
    return [
        ("cuda_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py", "tests/test_compile.py"],
         1200),
        ("fit_loco_local", [py, "-m", "idql_pl", "fit", "--config", "configs/loco.yaml",
                            "--data.dataset", "local/pointmaze-umaze", "--data.reward_transform", "none",
                            "--trainer.accelerator", "gpu", "--trainer.devices", "1",
                            "--trainer.max_time", f"00:00:{FIT_SECONDS // 60:02d}:{FIT_SECONDS % 60:02d}",
                            "--trainer.log_every_n_steps", "200", "--trainer.enable_progress_bar", "false",
                            "--eval.every_n_steps", "0", "--eval.num_episodes", "10",
                            "--run_root", str(out / "runs"), "--run_name", "loco-local"], FIT_SECONDS + 600),
        ("benchmark", [py, "-m", "idql_pl.benchmark", "--device", "cuda", "--compile", "--agents", "1,10",
                       "--json", str(out / "benchmark.json")], 3600),
    ]


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idql_pl.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for the JSON reports")
    parser.add_argument("--wheels", type=Path, default=Path("wheels"), help="wheels of missing packages (make gpu-wheels)")
    parser.add_argument("--dry-run", action="store_true", help="write the plan, run nothing")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(), "missing_before": missing_packages(), "steps": {}}
    if not args.dry_run:
        installed, log = install_from_wheels(report["missing_before"], args.wheels)
        report["installed_from_wheels"], report["install_log"] = installed, log
    report["missing"] = missing_packages()
    print(f"[gpu-check] {report['machine']}")
    print(f"[gpu-check] missing packages: {', '.join(report['missing_before']) or 'none'}; installed from "
          f"{args.wheels}: {', '.join(report.get('installed_from_wheels', [])) or 'none'}; still missing: "
          f"{', '.join(report['missing']) or 'none'}")
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "MUJOCO_GL": "disable", "PYTHONUNBUFFERED": "1"}
    failed = False
    for name, cmd, timeout in plan(args.out):
        entry: dict[str, Any] = {"command": " ".join(cmd[1:]), "timeout_s": timeout}
        report["steps"][name] = entry
        if args.dry_run:
            continue
        print(f"[gpu-check] {name}: {entry['command']}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            entry["returncode"], output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            entry["returncode"], output = 124, f"{e.stdout or ''}{e.stderr or ''} [timed out after {timeout} s]"
            output = output if isinstance(output, str) else output.decode(errors="replace")
        entry["seconds"], entry["output_tail"] = round(time.perf_counter() - t0, 1), output[-4000:]
        failed |= entry["returncode"] != 0
        print(f"[gpu-check] {name}: exit {entry['returncode']} in {entry['seconds']} s", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"[gpu-check] report: {args.out / 'gpu_check.json'}")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())

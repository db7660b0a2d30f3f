"""SIGTERM / SIGINT during ``fit`` (real signals to real processes): last.ckpt at the current step, one line,
exit 143 / 130, a resume that equals the uninterrupted run; repeated signals corrupt nothing; under DDP every
rank stops and rank 0 writes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from idql_pl.training.checkpointing import safe_load
from idql_pl.training.stop import StopController, Stopped
from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, load_state, run_cli
from tests.integration.test_resume import _assert_same

STEPS = 300
ARGS = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
        "--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", "20",
        "--trainer.val_check_interval", "1000", "--checkpoint.every_n_train_steps", "50",
        "--eval.at_end", "false", "--model.behavior.lr_decay_steps", str(STEPS)]
LINE = re.compile(r"^stopped by (SIG\w+) at critic step (\d+); last\.ckpt saved;"
                  r" resume with --ckpt_path last$")


def _start(tmp_path: Path, name: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "idql_pl", *ARGS, "--run_root", str(tmp_path),
                             "--run_name", name, *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert path.exists() and proc.poll() is None, "the run ended (or never checkpointed) before the signal"


@pytest.mark.timeout(600)
def test_sigterm_saves_the_current_step_and_the_resume_equals_the_uninterrupted_run(tmp_path):
    assert run_cli(*ARGS, "--run_root", tmp_path, "--run_name", "straight") == 0

    proc = _start(tmp_path, "stopped")
    last = tmp_path / "stopped" / "last.ckpt"
    _wait_for(last, proc)  # the periodic save at step 50: training is under way
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("stopped by")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    match = LINE.match(lines[0])
    assert match and match.group(1) == "SIGTERM", lines[0]
    step = int(match.group(2))
    saved = load_state(last)
    assert saved["global_step"] == step and 50 <= step < STEPS, (step, saved["global_step"])
    assert not [p.name for p in last.parent.iterdir() if p.name.endswith(".tmp")]
    assert (last.parent / "csv" / "metrics.csv").is_file()  # the loggers were closed, their files written

    assert run_cli(*ARGS, "--run_root", tmp_path, "--run_name", "stopped", "--ckpt_path", "last") == 0
    straight, resumed = load_state(tmp_path / "straight" / "last.ckpt"), load_state(last)
    assert straight["global_step"] == resumed["global_step"] == STEPS
    _assert_same(straight["state_dict"], resumed["state_dict"], "state_dict")
    _assert_same(straight["optimizer_states"], resumed["optimizer_states"], "optimizer_states")


@pytest.mark.timeout(600)
def test_sigint_exits_130_and_a_burst_of_signals_corrupts_nothing(tmp_path):
    proc = _start(tmp_path, "ctrl-c")
    last = tmp_path / "ctrl-c" / "last.ckpt"
    _wait_for(last, proc)
    first = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    # Ctrl-C again and again while it stops and saves
    while proc.poll() is None and time.monotonic() - first < 0.5:
        time.sleep(0.002)
        os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("stopped by SIGINT")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    ckpt = safe_load(last)  # whole, loadable, finite
    assert LINE.match(lines[0]) and f"critic step {ckpt['global_step']};" in lines[0], lines[0]
    assert 50 <= ckpt["global_step"] < STEPS
    assert not [p.name for p in last.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_second_signal_while_saving_is_ignored_and_otherwise_stops_at_once():
    stop = StopController()
    with pytest.raises(Stopped) as before:
        stop.handle(signal.SIGTERM, None)  # before training: nothing to save, stop now
    assert before.value.exit_code == 143 and "before any training step" in before.value.message()

    stop.phase, stop.step, stop.step_label = "training", 7, "critic step"
    stop.handle(signal.SIGINT, None)  # first: only recorded
    assert stop.requested == signal.SIGINT
    stop.handle(signal.SIGINT, None)  # a repeat right away: the same request
    stop.grace_s = 0.0
    with stop.saving_checkpoint():
        stop.handle(signal.SIGINT, None)  # while saving: ignored, the write finishes
    with pytest.raises(Stopped) as forced:
        stop.handle(signal.SIGINT, None)  # again, not saving: stop at once, without saving
    assert forced.value.exit_code == 130 and not forced.value.saved
    assert forced.value.message().startswith("stopped by SIGINT at critic step 7 without saving")


def _children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


@pytest.mark.timeout(900)
def test_ddp_sigterm_to_rank_zero_stops_every_rank_and_rank_zero_writes(tmp_path):
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    proc = _start(tmp_path, "ddp", *ddp)
    last = tmp_path / "ddp" / "last.ckpt"
    _wait_for(last, proc, timeout=600)
    ranks = _children(proc.pid)
    os.kill(proc.pid, signal.SIGTERM)  # as `timeout` or a pod's stop would: the launching process only
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("stopped by")]
    assert len(lines) == 1 and LINE.match(lines[0]), err[-3000:]
    step = int(LINE.match(lines[0]).group(2))
    ckpt = load_state(last)
    assert ckpt["global_step"] == step and len(ckpt["idql_rng_per_rank"]) == 2
    deadline = time.time() + 60
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in ranks) \
            and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in ranks if Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)], \
        "a DDP rank kept running after the stop"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"

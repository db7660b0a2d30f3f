"""Threads on shared machines: the intra-op thread count comes from the CPUs this process may use (its affinity
mask), ``--threads`` overrides it, and ``python -m idql_pl`` makes OpenMP wait passively unless the user chose
otherwise. No timings here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from idql_pl import threads
from idql_pl.errors import ConfigError
from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, run_cli

FIT = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
       "--trainer.max_steps", "2", "--eval.at_end", "false"]


def test_thread_count_sources(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    assert threads.available_cpus() == 3
    assert threads.intra_op_threads(None, environ={}) == (3, "CPU affinity")
    assert threads.intra_op_threads(None, environ={"OMP_NUM_THREADS": "2"}) == (2, "OMP_NUM_THREADS")
    assert threads.intra_op_threads(4, environ={"OMP_NUM_THREADS": "2"}) == (4, "--threads")
    assert threads.intra_op_threads(None, environ={"OMP_NUM_THREADS": ""}) == (3, "CPU affinity")
    with pytest.raises(ConfigError, match="--threads must be >= 1"):
        threads.intra_op_threads(0, environ={})


def test_passive_wait_never_overrides_the_user_and_never_comes_too_late():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.passive_openmp_wait(env) is False and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {}
    assert "torch" in sys.modules  # this process: OpenMP already started, so setting it now would be a lie
    assert threads.passive_openmp_wait(env) is False and env == {}


def test_threads_flag_sets_torch_threads(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # restored after the test (--threads exports its value)
    try:
        assert run_cli(*FIT, "--threads", "2", "--run_root", tmp_path, "--run_name", "t") == 0
        assert torch.get_num_threads() == 2
        assert os.environ["OMP_NUM_THREADS"] == "2"  # so DDP ranks started from here keep it
        assert "[idql_pl] 2 CPU threads (from --threads)" in caplog.text
    finally:
        torch.set_num_threads(1)


def test_bad_threads_value_is_one_line(tmp_path, capsys):
    assert run_cli(*FIT, "--threads", "0", "--run_root", tmp_path) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--threads must be >= 1" in lines[0], lines


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux affinity masks")
@pytest.mark.timeout(300)
def test_cli_process_uses_its_affinity_mask_and_passive_openmp(tmp_path):
    """A real `python -m idql_pl fit` pinned to one CPU (as taskset or a cluster's cpuset would): 1 thread, and
    OMP_WAIT_POLICY=PASSIVE in place before torch started; a user's own OMP_WAIT_POLICY is kept."""
    cpu = min(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    code = ("import os, sys; sys.argv[0] = '-m'; import idql_pl, torch; "
            "print(os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads())")
    probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                           preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split()[0] == "PASSIVE"

    proc = subprocess.run([sys.executable, "-m", "idql_pl", *FIT, "--run_root", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[idql_pl] 1 CPU thread (from CPU affinity; --threads N to change), OpenMP wait policy PASSIVE" in proc.stderr

    env["OMP_WAIT_POLICY"] = "ACTIVE"
    probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.split()[0] == "ACTIVE"

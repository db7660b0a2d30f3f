"""Threads on shared machines: the intra-op thread count comes from the CPUs this process may use (its
affinity mask), ``--threads`` overrides it, and ``python -m idql_pl`` makes OpenMP wait passively unless the
user chose otherwise. No timings here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from idql_pl import runtime
from idql_pl.errors import ConfigError
from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, run_cli

FIT = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
       "--trainer.max_steps", "2", "--eval.at_end", "false"]


def test_thread_count_sources(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    assert runtime.available_cpus() == 3
    assert runtime.intra_op_threads(None, environ={}) == (3, "CPU affinity")
    assert runtime.intra_op_threads(None, environ={"OMP_NUM_THREADS": "2"}) == (2, "OMP_NUM_THREADS")
    assert runtime.intra_op_threads(4, environ={"OMP_NUM_THREADS": "2"}) == (4, "--threads")
    assert runtime.intra_op_threads(None, environ={"OMP_NUM_THREADS": ""}) == (3, "CPU affinity")
    with pytest.raises(ConfigError, match="--threads must be >= 1"):
        runtime.intra_op_threads(0, environ={})


def test_passive_wait_comes_with_a_short_spin_unless_the_user_chose():
    env: dict[str, str] = {}
    modules = dict(sys.modules)
    try:
        sys.modules.pop("torch")  # as in a fresh `python -m idql_pl` before torch is imported
        assert runtime.passive_openmp_wait(env) is True
        for off in ("openmp", "threads, openmp", "all"):  # switched off
            unset = {"IDQL_PL_TWEAKS_OFF": off}
            assert runtime.passive_openmp_wait(unset) is False and unset == {"IDQL_PL_TWEAKS_OFF": off}
    finally:
        sys.modules.clear()
        sys.modules.update(modules)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": runtime.SHORT_SPIN}
    assert runtime.wait_policy_text(env) == "PASSIVE, GOMP_SPINCOUNT=10000"
    assert runtime.wait_policy_text({}) == "default (spinning)"


def test_threads_left_over_by_other_processes():
    assert [runtime.shared_threads(2, x) for x in (0.0, 0.4, 0.6, 1.0, 1.5, 3.0)] == [2, 2, 1, 1, 1, 1]
    assert [runtime.shared_threads(8, x) for x in (0.0, 2.2, 6.9)] == [8, 6, 1]


def test_cpu_share_subtracts_this_process(monkeypatch):
    """Other processes' cores = the machine's busy CPU time minus this process's own, over the wall time."""
    samples = iter([(0.0, 100.0, 10.0), (2.0, 103.0, 11.0), (2.1, 104.0, 11.1), (4.0, 104.5, 11.5)])
    monkeypatch.setattr(runtime.CpuShare, "_sample", staticmethod(lambda: next(samples)))
    share = runtime.CpuShare()
    assert share.others() == pytest.approx(1.0)  # 3 busy s - 1 own s over 2 s
    assert share.others() is None  # under 0.2 s since the last sample: too short to tell, the old one is kept
    assert share.others() == pytest.approx(0.5)  # (1.5 busy s - 0.5 own s) over the 2 s since t = 2


def test_cpu_share_reads_this_machine():
    share = runtime.CpuShare()
    if share._last is None:
        pytest.skip("no /proc/stat")
    import time

    time.sleep(0.3)
    others = share.others()
    assert others is not None and 0.0 <= others <= os.cpu_count() + 0.5


def test_share_cpus_follows_other_load(monkeypatch, caplog):
    """The callback drops to the cores left over while others use them and takes them all back after."""
    from idql_pl.runtime.callbacks import ShareCpus

    loads = iter([1.2, 1.2, 0.0])
    monkeypatch.setattr(runtime.CpuShare, "others", lambda self: next(loads))
    clock = iter(range(0, 1000, 3))
    monkeypatch.setattr("idql_pl.runtime.callbacks.time.monotonic", lambda: float(next(clock)))
    trainer = type("T", (), {"global_step": 7})()
    torch.set_num_threads(2)
    try:
        cb = ShareCpus(max_threads=2, interval_s=2.0)
        cb.on_train_start(trainer, None)
        seen = []
        for _ in range(3):
            cb.on_train_batch_end(trainer, None)
            seen.append(torch.get_num_threads())
        assert seen == [1, 1, 2]
        assert "1 CPU thread from step 7: other processes use 1.2 of the cores" in caplog.text
        assert "2 CPU threads from step 7: the cores are free again" in caplog.text
    finally:
        torch.set_num_threads(1)


def test_passive_wait_never_overrides_the_user_and_never_comes_too_late():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert runtime.passive_openmp_wait(env) is False and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {}
    assert "torch" in sys.modules  # this process: OpenMP already started, so setting it now would be a lie
    assert runtime.passive_openmp_wait(env) is False and env == {}


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
    """A real `python -m idql_pl fit` pinned to one CPU (as taskset or a cluster's cpuset would): 1 thread,
    and OMP_WAIT_POLICY=PASSIVE in place before torch started; a user's own OMP_WAIT_POLICY is kept."""
    cpu = min(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    proc = subprocess.run([sys.executable, "-m", "idql_pl", *FIT, "--run_root", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240,
                          preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("[idql_pl] 1 CPU thread (from CPU affinity; --threads N to change; fewer while other processes"
            " use the cores), OpenMP wait policy PASSIVE, GOMP_SPINCOUNT=10000") in proc.stderr
    if runtime._glibc_mallopt() is not None:  # see tests/unit/test_allocator.py
        assert "[idql_pl] memory: glibc malloc: large blocks from the heap, reused" in proc.stderr

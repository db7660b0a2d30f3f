"""Nothing is lost on a crash: atomic checkpoint writes, resume after SIGKILL equals the uninterrupted run,
and a non-finite loss stops the run with last.ckpt holding the last finite state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from idql_pl.data.buffer import Batch, TransitionBuffer
from idql_pl.training.checkpointing import AtomicCheckpointIO, safe_load
from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, load_state, run_cli
from tests.integration.test_resume import _assert_same


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    kept = safe_load(path)
    assert kept["global_step"] == 1 and torch.equal(kept["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left behind


# fast: test_compile
@pytest.mark.parametrize("compile_", ["false", pytest.param("true", marks=pytest.mark.slow)])
def test_nan_rewards_stop_the_run_and_keep_the_last_finite_checkpoint(tmp_path, monkeypatch, capsys, compile_,
                                                                      request):
    if compile_ == "true":  # the whole iteration compiled (aot_eager backend): the guard reads its metrics
        request.getfixturevalue("aot_eager")
    original = TransitionBuffer.sample
    critic_batches = {"n": 0}

    def poisoned(self, batch_size, num_agents=None):
        batch = original(self, batch_size, num_agents)
        if batch_size == 32:  # the critic's batch in TINY_IDQL
            critic_batches["n"] += 1
            if critic_batches["n"] >= 5:  # from critic step 5 on, a NaN reward
                batch = Batch(batch.observations, batch.actions, batch.rewards.clone().fill_(float("nan")),
                              batch.next_observations, batch.masks)
        return batch

    monkeypatch.setattr(TransitionBuffer, "sample", poisoned)
    code = run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                   "--trainer.max_steps", "10", "--trainer.log_every_n_steps", "1000",
                   "--checkpoint.every_n_train_steps", "2", "--model.compile", compile_,
                   "--run_root", tmp_path, "--run_name", "nan")
    err = capsys.readouterr().err
    assert code == 2
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    assert "non-finite" in line and "train/critic/q_loss" in line and "step 5" in line, line
    last = load_state(tmp_path / "nan" / "last.ckpt")
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


BIG = ["--model.behavior.hidden_dim", "256", "--model.behavior.ff_dim", "1024",
       "--model.behavior.batch_size", "1024"]


@pytest.mark.timeout(600)
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    """Kill -9 between two checkpoints, resume with --ckpt_path last: same final state as never stopping."""
    args = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), *SMALL_MAZE, *TINY_IDQL, *BIG, *TINY_TRAINER,
            "--trainer.max_steps", "16", "--checkpoint.every_n_train_steps", "4", "--run_root", str(tmp_path)]
    assert run_cli(*args, "--run_name", "straight") == 0

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "idql_pl", *args, "--run_name", "killed"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_state(last)["global_step"]
    assert killed_at in (4, 8, 12), killed_at  # died after a checkpoint, before the end

    assert run_cli(*args, "--run_name", "killed", "--ckpt_path", "last") == 0
    straight, resumed = load_state(tmp_path / "straight" / "last.ckpt"), load_state(last)
    assert straight["global_step"] == resumed["global_step"] == 16
    _assert_same(straight["state_dict"], resumed["state_dict"], "state_dict")
    _assert_same(straight["optimizer_states"], resumed["optimizer_states"], "optimizer_states")

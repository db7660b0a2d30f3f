"""DDP training on CPU with 2 processes: the plain ``--trainer.strategy ddp`` trains (several backward passes
per step through DDP's reducer), each rank samples its own batches and noise, and a resumed DDP run equals the
uninterrupted one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, load_state

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
       "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "2",
       "--trainer.val_check_interval", "3", "--eval.every_n_steps", "0", "--eval.num_episodes", "2",
       "--eval.num_envs", "2", "--checkpoint.every_n_train_steps", "3",
       "--model.behavior.lr_decay_steps", "12"]  # the cosine schedule must not depend on where a run stops


def _fit(tmp_path, name: str, max_steps: int, *extra: str) -> None:
    cmd = [sys.executable, "-m", "idql_pl", "fit", "--config", str(CONFIGS / "quickstart.yaml"), *SMALL_MAZE,
           *TINY_IDQL, *DDP, "--trainer.max_steps", str(max_steps), "--run_root", str(tmp_path),
           "--run_name", name, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert "Grad strides do not match bucket view strides" not in proc.stderr  # gradients keep the DDP layout


@pytest.mark.timeout(900)
def test_two_process_ddp_fit_resumes_exactly(tmp_path):
    _fit(tmp_path, "full", 6)
    _fit(tmp_path, "resumed", 3)
    _fit(tmp_path, "resumed", 6, "--ckpt_path", "last")
    full, resumed = (load_state(tmp_path / run / "last.ckpt") for run in ("full", "resumed"))
    assert full["global_step"] == resumed["global_step"] == 6
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    # each rank has its own dropout/noise stream and its own batch stream, all saved for the resume
    rng = full["idql_rng_per_rank"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    data_state = next(v for k, v in full.items()
                      if k.startswith("OfflineDataModule") or k == "datamodule_state_dict")
    batches = [rank["generator"] for rank in data_state["train_buffer_per_rank"]]
    assert len(batches) == 2 and not torch.equal(batches[0], batches[1])

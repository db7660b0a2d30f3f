"""DDP evaluation on CPU with 2 processes: each rank runs its share of the episodes, and the logged mean
covers exactly ``num_episodes`` (every episode once)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, read_csv, run_cli

NUM_EPISODES = 5  # odd on purpose: rank 0 runs 3 episodes, rank 1 runs 2


@pytest.mark.timeout(600)
def test_two_process_validate_covers_every_episode_once(tmp_path):
    assert run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                   "--run_root", tmp_path, "--run_name", "r") == 0
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "idql_pl", "validate", "--config", str(CONFIGS / "quickstart.yaml"),
           *SMALL_MAZE, *TINY_IDQL, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false",
           "--eval.num_episodes", str(NUM_EPISODES), "--eval.num_envs", "2",
           "--ckpt_path", str(run / "last.ckpt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_csv(run / "eval_episodes.csv") if r["stage"] == "validate"]
    assert sorted(int(r["episode"]) for r in rows) == list(range(NUM_EPISODES))
    metrics = [m for m in read_csv(run / "csv_validate" / "metrics.csv") if m.get("eval/return")]
    assert len(metrics) == 1  # rank 0 logs once
    assert float(metrics[0]["eval/num_episodes"]) == NUM_EPISODES
    expected = sum(float(r["return"]) for r in rows) / NUM_EPISODES
    assert float(metrics[0]["eval/return"]) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert "over 5 episodes" in proc.stderr + proc.stdout

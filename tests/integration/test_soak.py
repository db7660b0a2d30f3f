"""Soak (slow, not in `make test`; run with `make soak`): the quickstart for 20k steps with evaluation and
checkpointing; resident memory must not grow between evaluations."""

from __future__ import annotations

import pytest

from tests.helpers import CONFIGS, read_csv, run_cli

STEPS = 20_000


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)
def test_quickstart_soak_memory_is_flat(tmp_path):
    code = run_cli("fit", "--config", CONFIGS / "quickstart.yaml", "--trainer.max_steps", STEPS,
                   "--trainer.enable_progress_bar", "false", "--eval.every_n_steps", "2000",
                   "--eval.num_episodes", "5", "--checkpoint.every_n_train_steps", "1000",
                   "--run_root", tmp_path, "--run_name", "soak")
    assert code == 0
    rows = [r for r in read_csv(tmp_path / "soak" / "csv" / "metrics.csv") if r.get("perf/rss_mb")]
    rss = [float(r["perf/rss_mb"]) for r in rows]
    steps = [int(r["step"]) for r in rows]
    print("RSS (MB) at each evaluation:", ", ".join(f"step {s}: {m:.0f}" for s, m in zip(steps, rss)))
    assert len(rss) == STEPS // 2000
    # after warm-up (first two evaluations) memory stays within 5% (+20 MB) of its level
    baseline = rss[1]
    assert max(rss[2:]) <= baseline * 1.05 + 20, rss

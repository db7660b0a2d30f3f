"""Smoke test of ``python -m idql_pl.benchmark_concurrency`` with tiny fits (no timings are asserted)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from idql_pl.experiments import benchmark_concurrency
from tests.helpers import SMALL_MAZE, TINY_IDQL

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_concurrent_runs_are_measured_and_summed(tmp_path):
    out = tmp_path / "concurrency.json"
    extra = shlex.join([*SMALL_MAZE, *TINY_IDQL, "--trainer.accelerator", "cpu"])
    code = benchmark_concurrency.main(["--runs", "2", "--steps", "40", "--pythonpath", str(REPO),
                                       "--extra", extra, "--workdir", str(tmp_path / "runs"),
                                       "--json", str(out), "--no-warmup"])
    assert code == 0
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["runs"] == 2 and result["completed"] == 2 and len(result["per_run"]) == 2
    rates = [r["critic_steps_per_s"] for r in result["per_run"]]
    assert all(r is not None and r > 0 for r in rates)  # read from each run's csv/metrics.csv
    assert result["total_critic_steps_per_s"] == pytest.approx(sum(rates))
    assert report["checkout"] == str(REPO) and report["steps_per_run"] == 40
    roots = sorted(p.name for p in (tmp_path / "runs" / "R2").iterdir())
    assert roots == ["run0", "run1"]  # separate run roots

"""The many-agent run through the command line: fit, evaluate every agent, export one."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import (
    CONFIGS,
    SMALL_MAZE,
    TINY_IDQL,
    TINY_TRAINER,
    load_state,
    read_csv,
    run_cli,
)


def test_many_agent_fit_evaluates_every_agent_and_exports_one(tmp_path):
    """``--model.num_agents 2``: the evaluation plays the same episodes with both agents (CSV ``agent``
    column, per-agent and across-agent metrics); ``export --agent 1`` writes an ordinary single-agent
    checkpoint of agent 1's weights that ``validate`` evaluates."""
    common = ["--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, "--run_root", tmp_path]
    assert run_cli("fit", *common, *TINY_TRAINER, "--model.num_agents", "2", "--run_name", "two") == 0
    run = tmp_path / "two"
    rows = read_csv(run / "eval_episodes.csv")
    assert {r["agent"] for r in rows} == {"0", "1"}
    by_agent = {a: [(r["step"], r["episode"], r["seed"]) for r in rows if r["agent"] == a]
                for a in ("0", "1")}
    assert by_agent["0"] == by_agent["1"]  # the same seeded episodes for both agents
    metrics = read_csv(next(run.rglob("metrics.csv")))
    names = set(metrics[0])
    for name in ("eval/normalized_score", "eval/agent0/normalized_score", "eval/agent1/normalized_score",
                 "eval/normalized_score_agent_std", "eval/normalized_score_iqm"):
        assert name in names, name
    last = [r for r in metrics if r.get("eval/agent1/normalized_score")][-1]
    mean = (float(last["eval/agent0/normalized_score"]) + float(last["eval/agent1/normalized_score"])) / 2
    assert float(last["eval/normalized_score"]) == pytest.approx(mean)
    assert (run / "eval_curve.png").is_file()

    ckpt = load_state(run / "last.ckpt")
    out = tmp_path / "agent1.ckpt"
    assert run_cli("export", "--ckpt_path", run / "last.ckpt", "--agent", "1", "--out", out) == 0
    single = load_state(out)
    assert single["hyper_parameters"]["num_agents"] == 1
    for key, value in ckpt["state_dict"].items():
        rows = value.shape[0] // 2
        assert torch.equal(single["state_dict"][key], value[rows:]), key
    assert run_cli("export", "--ckpt_path", run / "last.ckpt", "--agent", "2", "--out", out) == 2
    assert run_cli("validate", *common, "--trainer.accelerator", "cpu",
                   "--trainer.enable_progress_bar", "false",
                   "--eval.num_episodes", "2", "--eval.num_envs", "2", "--model.num_agents", "1",
                   "--ckpt_path", out, "--run_name", "agent1") == 0
    rows = read_csv(tmp_path / "eval_episodes.csv")  # validate writes beside the checkpoint it evaluates
    assert {r["agent"] for r in rows} == {"0"} and {r["stage"] for r in rows} == {"validate"}

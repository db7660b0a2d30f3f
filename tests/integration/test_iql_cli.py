"""The IQL baseline and diffusion BC through the command line: fit, evaluate, resume exactly."""

from __future__ import annotations

import pytest

from tests.helpers import CONFIGS, SMALL_MAZE, TINY_TRAINER, load_state, read_csv, run_cli
from tests.integration.test_resume import _assert_same
from tests.unit.test_iql import TINY_IQL


@pytest.mark.parametrize("config", ["iql_loco", "iql_antmaze", "iql_quickstart"])
def test_iql_fit_through_the_cli_trains_and_evaluates(config, tmp_path):
    code = run_cli("fit", "--config", CONFIGS / f"{config}.yaml", *SMALL_MAZE, *TINY_IQL, *TINY_TRAINER,
                   "--run_root", tmp_path, "--run_name", "r")
    assert code == 0
    run = tmp_path / "r"
    ckpt = load_state(run / "last.ckpt")
    assert ckpt["global_step"] == 6  # one Lightning-counted step per joint critic + actor step
    assert any(k.startswith("actor.") for k in ckpt["state_dict"])
    assert any(k.startswith("critic.q_target_net.") for k in ckpt["state_dict"])
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 6  # one cosine step per actor step
    episodes = read_csv(run / "eval_episodes.csv")
    assert len(episodes) == 2 and all(int(r["length"]) > 0 for r in episodes)
    metrics = read_csv(run / "csv" / "metrics.csv")
    logged = {k for m in metrics for k, v in m.items() if v}
    assert {"train/critic/q_loss", "train/actor/loss", "train/actor/weight_mean", "val/actor/loss",
            "eval/return", "eval/normalized_score", "perf/actor_steps_per_s"} <= logged, logged


def test_iql_resumed_run_equals_uninterrupted(tmp_path):
    common = ["fit", "--config", CONFIGS / "iql_quickstart.yaml", *SMALL_MAZE, *TINY_IQL,
              "--model.lr_decay_steps", "16", "--trainer.accelerator", "cpu",
              "--trainer.enable_progress_bar", "false",
              "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "3",
              "--eval.every_n_steps", "0", "--eval.at_end", "false", "--checkpoint.every_n_train_steps", "4",
              "--run_root", tmp_path]
    assert run_cli(*common, "--trainer.max_steps", 8, "--run_name", "straight") == 0
    assert run_cli(*common, "--trainer.max_steps", 4, "--run_name", "split") == 0
    assert run_cli(*common, "--trainer.max_steps", 8, "--run_name", "split", "--ckpt_path", "last") == 0
    straight, split = (load_state(tmp_path / "straight" / "last.ckpt"),
                       load_state(tmp_path / "split" / "last.ckpt"))
    assert straight["global_step"] == split["global_step"] == 8
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        _assert_same(straight[key], split[key], key)


def test_diffusion_bc_baseline_config_trains_and_evaluates_one_sample_per_state(tmp_path):
    code = run_cli("fit", "--config", CONFIGS / "bc_quickstart.yaml", *SMALL_MAZE, "--model.hidden_dim", "32",
                   "--model.ff_dim", "64", "--model.batch_size", "64", *TINY_TRAINER, "--run_root", tmp_path,
                   "--run_name", "bc")
    assert code == 0
    assert load_state(tmp_path / "bc" / "last.ckpt")["global_step"] == 6
    assert len(read_csv(tmp_path / "bc" / "eval_episodes.csv")) == 2

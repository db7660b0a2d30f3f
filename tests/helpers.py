"""Shared test helpers: tiny model sizes and a CLI runner that returns the exit code and the run folder."""

from __future__ import annotations

from pathlib import Path

import torch

from idql_pl.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SMALL_MAZE = ["--data.dataset", "local/pointmaze-umaze", "--data.dataset_size", "4000"]
TINY_IDQL = [
    "--model.critic.hidden_dims", "[32, 32]", "--model.critic.batch_size", "32",
    "--model.behavior.hidden_dim", "32", "--model.behavior.ff_dim", "64", "--model.behavior.batch_size", "64",
    "--model.num_samples", "4",
]
TINY_TRAINER = [
    "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "2", "--trainer.val_check_interval", "3",
    "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
    "--eval.every_n_steps", "0", "--eval.num_episodes", "2", "--eval.num_envs", "2",
    "--checkpoint.every_n_train_steps", "3",
]


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))

"""Shared test helpers: tiny model sizes and a CLI runner that returns the exit code and the run folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from idql_pl.training.cli import main

# the configs/ of the README link here
CONFIGS = Path(__file__).resolve().parent.parent / "idql_pl" / "configs"
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


def random_transitions(n: int = 500, seed: int = 0, obs_dim: int = 5, action_dim: int = 2,
                       terminal_prob: float = 0.0) -> dict[str, np.ndarray]:
    """Random arrays in TransitionBuffer's layout (a fraction ``terminal_prob`` of masks is 0)."""
    rng = np.random.default_rng(seed)
    return {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, action_dim)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "next_observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "masks": (rng.uniform(size=n) >= terminal_prob).astype(np.float32),
    }


class IndexedCandidates:
    """Behavior stub for extraction tests: candidate ``n`` of every state is the action ``n / N``."""

    def sample(self, states: torch.Tensor, num_samples: int = 1, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        agents, batch = states.shape[:2]
        ramp = torch.arange(num_samples, dtype=torch.float32) / num_samples
        return ramp.view(1, 1, -1, 1).expand(agents, batch, num_samples, 1).clone()


class QIsTheAction:
    """Critic stub: ``Q(s, a) = a[0]`` (so it ranks :class:`IndexedCandidates` by index) and ``V = 0``."""

    def q_target(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return actions[..., 0]

    def v(self, states: torch.Tensor) -> torch.Tensor:
        return torch.zeros(states.shape[:-1])

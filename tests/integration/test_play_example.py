"""examples/play_exported_policy.py builds the pointmaze evaluation env without idql_pl: the same episodes as
``idql_pl/PointMaze2d-UMaze-v0`` (the env ``validate`` scores local/pointmaze-umaze in)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gymnasium as gym
import numpy as np

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "play_exported_policy.py"


def load_example():
    spec = importlib.util.spec_from_file_location("play_exported_policy", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_standalone_env_plays_the_evaluation_envs_episodes():
    """Same seeds, same actions: the same observations and rewards at every step, a reward at the goal."""
    from idql_pl.envs.maze2d import MAZES, MazeGrid, WaypointController  # (registers the env ids)

    example = load_example()
    controller = WaypointController(MazeGrid(MAZES["umaze"]))
    ours = example.UMazePoint()
    theirs = gym.make("idql_pl/PointMaze2d-UMaze-v0")
    assert theirs.spec.max_episode_steps == example.EPISODE_STEPS
    rng = np.random.default_rng(0)
    rewarded = 0.0
    for seed in (1_000_000, 1_000_007, 3):
        obs, _ = theirs.reset(seed=seed)
        assert np.array_equal(ours.reset(seed), obs)
        for _ in range(150):
            toward_goal = controller(np.asarray(obs, dtype=np.float64)[None], ours.goal)[0]
            action = np.clip(toward_goal + rng.normal(0, 0.3, 2), -1.5, 1.5).astype(np.float32)
            obs, reward, *_ = theirs.step(action)
            mine, my_reward = ours.step(action)
            assert np.array_equal(mine, obs) and my_reward == reward
            rewarded += reward
    assert rewarded > 0  # the goal pays
    theirs.close()

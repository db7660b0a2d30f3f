"""Local recipes: generation, caching, controller quality, bandit geometry, maze/antmaze frame maps."""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from idql_pl import envs as E
from idql_pl.data import OfflineDataModule, load_dataset
from idql_pl.data import local as L
from idql_pl.data import recipes as R
from idql_pl.envs import bandit as B
from idql_pl.envs import maze2d as M
from idql_pl.envs.antmaze import AntMazeD4RLEnv

POINTMAZE_SIZE = 6000  # shared with tests/integration/test_data_sources.py: generated once per session


@pytest.fixture(scope="session")
def pointmaze():
    t0 = time.perf_counter()
    dm = OfflineDataModule("local/pointmaze-umaze", dataset_size=POINTMAZE_SIZE, seed=0)
    print(f"\npointmaze {POINTMAZE_SIZE} steps generated+loaded in {time.perf_counter() - t0:.1f} s")
    return dm


def test_pointmaze_layout_and_rewards(pointmaze):
    dm = pointmaze
    info = dm.info
    assert (info.num_transitions, info.num_episodes, info.max_episode_steps) == (6000, 20, 300)
    assert (dm.obs_dim, dm.action_dim, info.family, info.source) == (4, 2, "maze2d", "local")
    assert info.env_id == E.POINTMAZE_ENV_ID and info.reward_transform == "none"
    arrays = dm._arrays
    assert np.all(arrays["masks"] == 1.0)  # continuing task: timeouts only, no terminals
    assert np.abs(arrays["actions"]).max() < 1.0
    goal = np.array([-1.0, 1.0])
    near = np.linalg.norm(arrays["next_observations"][:, :2] - goal, axis=1) <= M.REWARD_RADIUS
    np.testing.assert_array_equal(arrays["rewards"], near.astype(np.float32))
    assert 0 < arrays["rewards"].mean() < 1
    # within each 300-step episode the stream is continuous: next_obs[i] == obs[i + 1]
    idx = np.arange(len(arrays["rewards"]) - 1)
    inside = (idx + 1) % 300 != 0
    np.testing.assert_array_equal(arrays["next_observations"][idx[inside]], arrays["observations"][idx[inside] + 1])
    # the data visits every cell of the maze
    cells = M.MazeGrid(M.MAZES["umaze"]).cell_of(arrays["observations"][:, :2].astype(np.float64))
    assert set(np.unique(cells)) == set(range(7))


def test_pointmaze_reference_scores_and_success(pointmaze):
    info, recipe = pointmaze.info, pointmaze.info.extra["recipe"]
    print(f"\nref min (random) {info.ref_min_score:.2f}, ref max (controller) {info.ref_max_score:.2f}, "
          f"noisy goal success {recipe['goal_success_rate']:.3f} over {recipe['goals_reached'] + recipe['goals_not_reached']} goals, "
          f"controller eval success {recipe['controller_eval_success_rate']:.3f}")
    assert 0 < info.ref_min_score < 100 < info.ref_max_score <= 300
    assert recipe["goal_success_rate"] >= 0.9 and recipe["goals_reached"] >= 50
    assert recipe["controller_eval_success_rate"] >= 0.9
    assert pointmaze.normalized_score(info.ref_max_score) == pytest.approx(100.0)


def test_controller_reaches_goals_in_eval_env():
    returns, success = R.rollout_returns(R.controller_policy(0.0), 20, seed=123)
    noisy_returns, noisy_success = R.rollout_returns(R.controller_policy(R.POINTMAZE_NOISE), 20, seed=456)
    rand_returns, rand_success = R.rollout_returns(R.random_policy, 20, seed=789)
    print(f"\ncontroller success {success.mean():.2f} (return {returns.mean():.1f}), noisy {noisy_success.mean():.2f} "
          f"(return {noisy_returns.mean():.1f}), random {rand_success.mean():.2f} (return {rand_returns.mean():.1f})")
    assert success.mean() >= 0.9 and noisy_success.mean() >= 0.9
    assert returns.mean() > 3 * rand_returns.mean()


def test_cache_reload_is_identical(pointmaze):
    """A second load reads the cache (no regeneration: the timing is the benchmark's job) and gets the same data."""
    again = load_dataset("local/pointmaze-umaze", dataset_size=POINTMAZE_SIZE)
    for key, value in pointmaze._arrays.items():
        np.testing.assert_array_equal(again.arrays[key], value)
    assert again.info.ref_max_score == pointmaze.info.ref_max_score


def test_cache_ids_include_non_default_size():
    assert L.minari_id("local/pointmaze-umaze") == f"idql_pl/pointmaze-umaze-v{L.RECIPE_VERSION}"
    assert L.minari_id("local/pointmaze-umaze", 5000) == f"idql_pl/pointmaze-umaze-n5000-v{L.RECIPE_VERSION}"
    assert L.minari_id("local/bandit", R.BANDIT_DEFAULT_SIZE) == f"idql_pl/bandit-v{L.RECIPE_VERSION}"


def _dataset_dir(dataset_id):
    return Path(os.environ["MINARI_DATASETS_PATH"]) / dataset_id


def test_generation_is_atomic_and_cleans_stale_temp(pointmaze):
    root = Path(os.environ["MINARI_DATASETS_PATH"])
    stale = root / ".idql_tmp" / "999999999-deadbeef"
    stale.mkdir(parents=True)
    old = time.time() - 3600
    os.utime(stale, (old, old))  # a dead process's leftover from an hour ago
    fresh = root / ".idql_tmp" / "999999998-cafecafe"
    fresh.mkdir()  # too recent to touch (could be a live generation on another host)
    load_dataset("local/bandit", dataset_size=300)
    assert not stale.exists() and fresh.exists()
    fresh.rmdir()
    assert list((root / ".idql_tmp").iterdir()) == []  # nothing half-written left behind
    assert (_dataset_dir(L.minari_id("local/bandit", 300)) / "data" / "metadata.json").is_file()


def test_corrupt_or_mismatching_cache_is_regenerated():
    first = load_dataset("local/bandit", dataset_size=400)
    path = _dataset_dir(L.minari_id("local/bandit", 400)) / "data"
    # truncate the data file: detected on load and regenerated
    h5 = path / "main_data.hdf5"
    h5.write_bytes(h5.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="unreadable"):
        again = load_dataset("local/bandit", dataset_size=400)
    np.testing.assert_array_equal(again.arrays["actions"], first.arrays["actions"])
    # metadata from another recipe version: regenerated before loading
    meta = json.loads((path / "metadata.json").read_text())
    meta["idql_recipe"]["version"] = -1
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="regenerating"):
        third = load_dataset("local/bandit", dataset_size=400)
    np.testing.assert_array_equal(third.arrays["rewards"], first.arrays["rewards"])
    # a half-deleted dataset folder (no data file) is regenerated too
    shutil.rmtree(path)
    with pytest.warns(UserWarning, match="incomplete"):
        fourth = load_dataset("local/bandit", dataset_size=400)
    assert fourth.info.num_transitions == 400


def test_bandit_geometry_and_data():
    assert B.BANDIT_CENTERS.shape == (3, 2) and B.BANDIT_BEST == 0
    np.testing.assert_allclose(np.linalg.norm(B.BANDIT_CENTERS, axis=1), 0.6, rtol=1e-6)
    np.testing.assert_array_equal(B.bandit_reward(B.BANDIT_CENTERS), B.BANDIT_REWARDS)
    assert B.bandit_reward(np.zeros(2)) == 0.0  # between clusters
    assert B.BANDIT_REWARDS[B.BANDIT_BEST] >= 1.5 * np.sort(B.BANDIT_REWARDS)[-2]  # clearly the best
    dm = OfflineDataModule("local/bandit", dataset_size=3000)
    a = dm._arrays
    assert (dm.obs_dim, dm.action_dim, dm.info.num_episodes, dm.info.max_episode_steps) == (1, 2, 3000, 1)
    assert np.all(a["masks"] == 0.0) and np.all(a["observations"] == B.BANDIT_STATE)
    assert (dm.info.ref_min_score, dm.info.ref_max_score) == (0.0, 1.0)
    nearest = np.linalg.norm(a["actions"][:, None] - B.BANDIT_CENTERS, axis=-1).argmin(1)
    counts = np.bincount(nearest, minlength=3) / len(nearest)
    assert np.all(np.abs(counts - 1 / 3) < 0.04), counts  # uniform over clusters
    assert (a["rewards"] > 0).mean() > 0.95
    env = dm.make_env()
    obs, _ = env.reset(seed=0)
    _, r, terminated, _, _ = env.step(B.BANDIT_CENTERS[B.BANDIT_BEST])
    assert obs.shape == (1,) and r == 1.0 and terminated


@pytest.mark.parametrize(("maze", "goal"), [("umaze", (1, 1)), ("medium", (6, 6)), ("large", (7, 9))])
def test_maze2d_d4rl_frame(maze, goal):
    """D4RL maze2d: cell (row, col) sits at qpos (row, col); the goal is the 'G' cell; starts are free cells."""
    env = M.Maze2dEnv(maze, frame="d4rl")
    np.testing.assert_allclose(env.goal_obs, goal, atol=1e-9)
    rows = M.MAZES[maze]
    for seed in range(30):
        obs, _ = env.reset(seed=seed)
        r, c = np.rint(obs[:2]).astype(int)
        assert np.all(np.abs(obs[:2] - (r, c)) <= 0.1 + 1e-6) and rows[r][c] in "OG"
    # moving along +x in the D4RL frame means moving to higher row indices
    env.reset(seed=0)
    x0 = env.step(np.array([1.0, 0.0]))[0][0]
    for _ in range(3):
        x1 = env.step(np.array([1.0, 0.0]))[0][0]
    assert x1 > x0
    env.close()
    steps = {"umaze": 300, "medium": 600, "large": 800}[maze]
    _, success = R.rollout_returns(R.controller_policy(0.0), 5, seed=0, maze=maze, frame="d4rl", steps=steps)
    assert success.all()


def test_antmaze_d4rl_frame():
    env = AntMazeD4RLEnv("umaze")
    obs, info = env.reset(seed=0)
    assert obs.shape == (29,) and obs.dtype == np.float32
    assert np.all(np.abs(obs[:2]) <= 0.1 + 1e-6)  # D4RL: the ant starts at the origin (the 'r' cell)
    goal = info["goal"]
    assert 0.0 <= goal[0] <= 1.5 and 8.0 <= goal[1] <= 9.5  # 'g' cell (3, 1) -> (0, 8) plus D4RL's noise
    # every D4RL cell maps onto the same free/wall cell of the (row-flipped) gymnasium maze
    rows = env._inner.maze.maze_map
    for i, row in enumerate(M.MAZES["umaze"]):
        for j, ch in enumerate(row):
            gi, gj = env._inner.maze.cell_xy_to_rowcol(env.d4rl_xy((i, j)) + env.offset)
            assert (rows[gi][gj] == 1) == (ch == "#")
    obs2, r, terminated, truncated, _ = env.step(np.zeros(8, np.float32))
    assert r == 0.0 and not terminated and obs2.shape == (29,)
    env.close()

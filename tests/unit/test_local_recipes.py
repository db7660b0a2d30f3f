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
    np.testing.assert_array_equal(arrays["next_observations"][idx[inside]],
                                  arrays["observations"][idx[inside] + 1])
    # the data visits every cell of the maze
    cells = M.MazeGrid(M.MAZES["umaze"]).cell_of(arrays["observations"][:, :2].astype(np.float64))
    assert set(np.unique(cells)) == set(range(7))


def test_pointmaze_reference_scores_and_success(pointmaze):
    info, recipe = pointmaze.info, pointmaze.info.extra["recipe"]
    print(f"\nref min (random) {info.ref_min_score:.2f}, ref max (controller) {info.ref_max_score:.2f}, "
          f"noisy goal success {recipe['goal_success_rate']:.3f} over"
          f" {recipe['goals_reached'] + recipe['goals_not_reached']} goals,"
          f" controller eval success {recipe['controller_eval_success_rate']:.3f}")
    assert 0 < info.ref_min_score < 100 < info.ref_max_score <= 300
    assert recipe["goal_success_rate"] >= 0.9 and recipe["goals_reached"] >= 50
    assert recipe["controller_eval_success_rate"] >= 0.9
    assert pointmaze.normalized_score(info.ref_max_score) == pytest.approx(100.0)


def test_controller_reaches_goals_in_eval_env():
    returns, success = R.rollout_returns(R.controller_policy(0.0), 20, seed=123)
    noisy_returns, noisy_success = R.rollout_returns(R.controller_policy(R.POINTMAZE_NOISE), 20, seed=456)
    rand_returns, rand_success = R.rollout_returns(R.random_policy, 20, seed=789)
    print(f"\ncontroller success {success.mean():.2f} (return {returns.mean():.1f}), noisy"
          f" {noisy_success.mean():.2f} (return {noisy_returns.mean():.1f}),"
          f" random {rand_success.mean():.2f} (return {rand_returns.mean():.1f})")
    assert success.mean() >= 0.9 and noisy_success.mean() >= 0.9
    assert returns.mean() > 3 * rand_returns.mean()


def test_cache_reload_is_identical(pointmaze):
    """A second load reads the cache (no regeneration: the timing is the benchmark's job) and gets the same
    data."""
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
    """D4RL maze2d: cell (row, col) sits at qpos (row, col); the goal is the 'G' cell; starts are free
    cells."""
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


# ------------------------------------------------------------------ local/pointmaze-medium and -large
LIMITS = {"umaze": 300, "medium": 600, "large": 800}
GOAL_CELLS = {"umaze": (1, 1), "medium": (6, 6), "large": (7, 9)}


def _concat(episodes, key):
    return np.concatenate([e[key] for e in episodes])


def test_umaze_recipe_is_unchanged():
    """``local/pointmaze-umaze`` is what the quickstart scores (docs/results/) were measured on: the same
    cache id, env spec, episode limit, default size and generator (the maze argument defaults to it; the first
    observations and sums of a small generation as the code before the medium/large recipes made them)."""
    assert L.minari_id("local/pointmaze-umaze") == "idql_pl/pointmaze-umaze-v1"
    assert L.RECIPES["local/pointmaze-umaze"]["default_size"] == 1_000_000 == R.POINTMAZE_DEFAULT_SIZE
    spec = E.gym.spec(E.POINTMAZE_ENV_ID)
    assert (spec.id, spec.entry_point, spec.max_episode_steps, spec.kwargs) == (
        "idql_pl/PointMaze2d-UMaze-v0", "idql_pl.envs.maze2d:Maze2dEnv", 300,
        {"maze": "umaze", "frame": "gymnasium"})
    episodes, stats = R.generate_pointmaze(1200)
    again, _ = R.generate_pointmaze(1200, maze="umaze")
    for key in ("observations", "actions", "rewards", "terminations", "truncations"):
        np.testing.assert_array_equal(_concat(episodes, key), _concat(again, key))
    assert [len(e["actions"]) for e in episodes] == [300] * 4 and stats["streams"] == 4
    first = [-0.04604266, -1.0918053, 0.01049001, -0.05356694]
    np.testing.assert_allclose(episodes[0]["observations"][0], first, rtol=1e-6)
    obs = _concat(episodes, "observations").astype(np.float64)
    act = _concat(episodes, "actions").astype(np.float64)
    assert (obs.sum(), np.abs(obs).sum(), act.sum(), np.abs(act).sum()) == pytest.approx(
        (106.65766763139982, 6306.343363920227, 17.722225455450825, 1619.1235325381858), rel=1e-6)
    assert stats["goals_reached"] == 16 and stats["goals_not_reached"] == 0


def test_umaze_reference_scores_are_the_readme_ones(pointmaze):
    assert (pointmaze.info.ref_min_score, pointmaze.info.ref_max_score) == (45.54, 240.43)
    assert pointmaze.info.extra["recipe"]["ref_episodes"] == 100


@pytest.mark.parametrize("maze", ["medium", "large"])
def test_pointmaze_medium_large_generation(maze):
    """Four episodes of the maze's limit, one per stream: shapes, dtypes, the fixed-goal reward, continuity,
    and the same arrays for the same seed (other arrays for another)."""
    limit = LIMITS[maze]
    episodes, stats = R.generate_pointmaze(4 * limit, maze=maze)
    assert len(episodes) == 4 and stats["streams"] == 4 and stats["goals_reached"] > 0
    for e in episodes:
        assert e["observations"].shape == (limit + 1, 4) and e["actions"].shape == (limit, 2)
        assert e["observations"].dtype == e["actions"].dtype == e["rewards"].dtype == np.float32
        assert not e["terminations"].any() and e["truncations"].tolist() == [False] * (limit - 1) + [True]
        assert np.abs(e["actions"]).max() <= 1.0
    grid = M.MazeGrid(M.MAZES[maze])
    goal = grid.center_of(GOAL_CELLS[maze])
    next_obs = np.concatenate([e["observations"][1:] for e in episodes])
    near = np.linalg.norm(next_obs[:, :2] - goal, axis=1) <= M.REWARD_RADIUS
    np.testing.assert_array_equal(_concat(episodes, "rewards"), near.astype(np.float32))
    cells = grid.cell_of(_concat(episodes, "observations")[:, :2].astype(np.float64))
    assert len(np.unique(cells)) >= grid.n // 2  # random goals: the points roam the maze
    again, _ = R.generate_pointmaze(4 * limit, maze=maze)
    other, _ = R.generate_pointmaze(4 * limit, maze=maze, seed=1)
    np.testing.assert_array_equal(_concat(again, "observations"), _concat(episodes, "observations"))
    np.testing.assert_array_equal(_concat(again, "actions"), _concat(episodes, "actions"))
    assert not np.array_equal(_concat(other, "actions"), _concat(episodes, "actions"))


@pytest.mark.parametrize("maze", ["medium", "large"])
def test_pointmaze_medium_large_eval_env(maze):
    """The evaluation env: D4RL's episode limit, the 'G' cell as the fixed goal, random start cells."""
    env = E.make_env(E.POINTMAZE_ENV_IDS[maze], f"local/pointmaze-{maze}")
    assert env.spec.max_episode_steps == LIMITS[maze]
    assert env.spec.kwargs == {"maze": maze, "frame": "gymnasium"}
    grid = M.MazeGrid(M.MAZES[maze])
    np.testing.assert_allclose(env.unwrapped.goal_xy, grid.center_of(GOAL_CELLS[maze]))
    assert env.observation_space.shape == (4,) and env.action_space.shape == (2,)
    starts = {int(grid.cell_of(env.reset(seed=s)[0][:2].astype(np.float64))) for s in range(40)}
    assert len(starts) >= grid.n // 3
    env.reset(seed=0)
    steps, truncated = 0, False
    while not truncated:
        _, reward, terminated, truncated, _ = env.step(np.zeros(2, np.float32))
        steps += 1
        assert not terminated and reward in (0.0, 1.0)
    assert steps == LIMITS[maze]
    env.close()


@pytest.mark.parametrize("maze", ["medium", "large"])
def test_pointmaze_medium_large_recipe(maze, monkeypatch):
    """Through the recipe (Minari cache, metadata, reference scores) with few reference episodes (the slow
    test below uses the recipe's 100): random < controller, the env and limits the data carries."""
    monkeypatch.setattr(L, "REF_EPISODES", 6)
    name, limit = f"local/pointmaze-{maze}", LIMITS[maze]
    assert L.RECIPES[name]["default_size"] == {"medium": 2_000_000, "large": 4_000_000}[maze]
    assert L.minari_id(name) == f"idql_pl/pointmaze-{maze}-v{L.RECIPE_VERSION}"
    dm = OfflineDataModule(name, dataset_size=2 * limit + 7)
    info, recipe = dm.info, dm.info.extra["recipe"]
    assert (info.num_transitions, info.num_episodes, info.max_episode_steps) == (2 * limit + 7, 3, limit)
    assert info.env_id == E.POINTMAZE_ENV_IDS[maze] and info.family == "maze2d" and info.source == "local"
    assert 0 <= info.ref_min_score < info.ref_max_score and recipe["controller_eval_success_rate"] == 1.0
    assert recipe["recipe"] == name and recipe["ref_episodes"] == 6
    env = dm.make_env()
    assert env.observation_space.shape == (dm.obs_dim,) and env.action_space.shape == (dm.action_dim,) == (2,)
    assert env.spec.max_episode_steps == limit
    env.close()


@pytest.mark.slow
@pytest.mark.parametrize("maze", ["medium", "large"])
def test_pointmaze_medium_large_reference_scores(maze):
    """The recipe's own reference episodes (100 of the maze's limit): the noise-free controller reaches the
    goal from every start and scores far above the random policy; the noisy data reaches its goals."""
    dm = OfflineDataModule(f"local/pointmaze-{maze}", dataset_size=16 * LIMITS[maze])
    info, recipe = dm.info, dm.info.extra["recipe"]
    print(f"\n{maze}: ref min {info.ref_min_score:.2f}, max {info.ref_max_score:.2f}, goal success "
          f"{recipe['goal_success_rate']:.3f}")
    assert recipe["ref_episodes"] == 100 and recipe["controller_eval_success_rate"] >= 0.95
    assert info.ref_max_score > 3 * max(info.ref_min_score, 1.0) and recipe["goal_success_rate"] >= 0.9

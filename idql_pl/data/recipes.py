"""The generators behind the local recipes (see :mod:`idql_pl.data.local`): the noisy waypoint controller in
the U-, medium and large mazes (``local/pointmaze-umaze``, ``-medium``, ``-large``), the three-cluster bandit
data (``local/bandit``), and the seeded rollouts that measure their reference scores."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from idql_pl.envs import MAZE2D_EPISODE_STEPS
from idql_pl.envs.bandit import BANDIT_CENTERS, BANDIT_STATE, BANDIT_STD, bandit_reward
from idql_pl.envs.maze2d import REWARD_RADIUS, Maze2dEnv, WaypointController

# D4RL maze2d-{umaze,medium,large}-v1's sizes (transitions): each recipe's default --data.dataset_size
POINTMAZE_DEFAULT_SIZES: dict[str, int] = {"umaze": 1_000_000, "medium": 2_000_000, "large": 4_000_000}
POINTMAZE_DEFAULT_SIZE = POINTMAZE_DEFAULT_SIZES["umaze"]
POINTMAZE_EPISODE_STEPS = MAZE2D_EPISODE_STEPS["umaze"]
POINTMAZE_NOISE = 0.5
POINTMAZE_STREAMS = 16
GOAL_REACHED_RADIUS = 0.25
GOAL_NOISE = 0.25
REF_EPISODES = 100
GENERATION_SEED = 0
BANDIT_DEFAULT_SIZE = 20_000
BANDIT_BLOCK = 1000


def rollout_returns(
    policy: Callable[[np.ndarray, Maze2dEnv, np.random.Generator], np.ndarray],
    num_episodes: int,
    seed: int,
    num_envs: int = 10,
    maze: str = "umaze",
    frame: str = "gymnasium",
    steps: int = POINTMAZE_EPISODE_STEPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns and success flags (reward ever 1) of ``num_episodes`` seeded episodes, ``num_envs`` in
    lockstep.

    ``policy(obs [K, 4], env, rng) -> actions [K, 2]`` in the observation frame.
    """
    envs = [Maze2dEnv(maze, frame) for _ in range(min(num_envs, num_episodes))]
    rng = np.random.default_rng(seed)
    returns, successes = [], []
    try:
        for first in range(0, num_episodes, len(envs)):
            batch = envs[: min(len(envs), num_episodes - first)]
            obs = np.stack([e.reset(seed=seed + first + k)[0] for k, e in enumerate(batch)])
            ret = np.zeros(len(batch))
            for _ in range(steps):
                act = policy(obs.astype(np.float64), batch[0], rng)
                out = [e.step(a) for e, a in zip(batch, act, strict=True)]
                obs = np.stack([o[0] for o in out])
                ret += [o[1] for o in out]
            returns.append(ret)
            successes.append(ret > 0)
    finally:
        for e in envs:
            e.close()
    return np.concatenate(returns), np.concatenate(successes)


def random_policy(obs: np.ndarray, env: Maze2dEnv, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, size=(len(obs), 2))


def controller_policy(noise: float = 0.0
                      ) -> Callable[[np.ndarray, Maze2dEnv, np.random.Generator], np.ndarray]:
    """The waypoint controller driving to the env's evaluation goal (any frame), plus optional noise."""
    cache: dict[int, WaypointController] = {}

    def policy(obs: np.ndarray, env: Maze2dEnv, rng: np.random.Generator) -> np.ndarray:
        ctrl = cache.setdefault(id(env.grid), WaypointController(env.grid))
        act = ctrl(env.from_obs(obs), env.goal_xy)
        if noise:
            act = np.clip(act + rng.normal(0.0, noise, act.shape), -1.0, 1.0)
        return env.action_from_gym(act)

    return policy


def generate_pointmaze(
    size: int, seed: int = GENERATION_SEED, noise: float = POINTMAZE_NOISE, maze: str = "umaze"
) -> tuple[list[dict], dict]:
    """Simulate ``size`` steps (maze2d-style) in ``maze``; returns episode dicts (``T + 1`` observations)
    and stats.

    As in D4RL's maze2d generator, the maze's episode limit (``MAZE2D_EPISODE_STEPS``: 300 / 600 / 800) both
    cuts the streams into episodes and is the time after which a goal not reached is replaced.
    """
    limit = MAZE2D_EPISODE_STEPS[maze]
    num_episodes = -(-size // limit)
    streams = min(POINTMAZE_STREAMS, num_episodes)
    steps = -(-num_episodes // streams) * limit
    envs = [Maze2dEnv(maze, "gymnasium") for _ in range(streams)]
    grid = envs[0].grid
    ctrl = WaypointController(grid)
    rng = np.random.default_rng(seed)
    state = np.stack([e.reset(seed=seed * 1000 + k)[0] for k, e in enumerate(envs)]).astype(np.float64)

    def new_goals(cur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pick = rng.integers(grid.n - 1, size=len(cur))
        pick = pick + (pick >= cur)  # any free cell but the current one
        return pick, grid.centers[pick] + rng.uniform(-GOAL_NOISE, GOAL_NOISE, size=(len(cur), 2))

    goal_cell, goal = new_goals(grid.cell_of(state[:, :2]))
    since = np.zeros(streams, dtype=np.int64)
    reached = failed = 0
    obs = np.empty((streams, steps + 1, 4), dtype=np.float32)
    act = np.empty((streams, steps, 2), dtype=np.float32)
    for t in range(steps):
        obs[:, t] = state
        a = np.clip(ctrl(state, goal) + rng.normal(0.0, noise, (streams, 2)), -1.0, 1.0)
        act[:, t] = a
        for k, env in enumerate(envs):
            state[k] = env.sim_step(a[k])
        since += 1
        hit = np.linalg.norm(state[:, :2] - goal, axis=1) < GOAL_REACHED_RADIUS
        stale = since >= limit
        switch = hit | stale
        if switch.any():
            reached += int(hit.sum())
            failed += int((stale & ~hit).sum())
            cells, goals = new_goals(grid.cell_of(state[switch, :2]))
            goal_cell[switch], goal[switch] = cells, goals
            since[switch] = 0
    obs[:, steps] = state
    goal_xy = envs[0].goal_xy
    for e in envs:
        e.close()
    rewards = (np.linalg.norm(obs[:, 1:, :2] - goal_xy, axis=-1) <= REWARD_RADIUS).astype(np.float32)
    episodes = []
    for e in range(num_episodes):  # chunk i of every stream, interleaved, cut to exactly `size` steps
        k, c = e % streams, e // streams
        t0, t1 = c * limit, min(c * limit + limit, c * limit + size - e * limit)
        episodes.append(
            {
                "observations": obs[k, t0 : t1 + 1],
                "actions": act[k, t0:t1],
                "rewards": rewards[k, t0:t1],
                "terminations": np.zeros(t1 - t0, dtype=bool),
                "truncations": np.r_[np.zeros(t1 - t0 - 1, dtype=bool), True],
            }
        )
    stats = {
        "goals_reached": reached,
        "goals_not_reached": failed,
        "goal_success_rate": reached / max(1, reached + failed),
        "streams": streams,
        "action_noise": noise,
    }
    return episodes, stats


def generate_bandit(size: int, seed: int = GENERATION_SEED) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(seed)
    cluster = rng.integers(len(BANDIT_CENTERS), size=size)
    actions = np.clip(BANDIT_CENTERS[cluster] + rng.normal(0.0, BANDIT_STD, (size, 2)),
                      -1.0, 1.0).astype(np.float32)
    rewards = bandit_reward(actions)
    episodes = []
    for start in range(0, size, BANDIT_BLOCK):
        n = min(BANDIT_BLOCK, size - start)
        episodes.append(
            {
                "observations": np.full((n + 1, 1), BANDIT_STATE, dtype=np.float32),
                "actions": actions[start : start + n],
                "rewards": rewards[start : start + n],
                "terminations": np.ones(n, dtype=bool),
                "truncations": np.zeros(n, dtype=bool),
            }
        )
    stats = {"cluster_counts": np.bincount(cluster, minlength=3).tolist(),
             "in_radius_fraction": float((rewards > 0).mean())}
    return episodes, stats

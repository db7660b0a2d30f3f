"""Local recipes: datasets generated on first use into real Minari datasets (no download, no account).

``local/pointmaze-umaze`` (D4RL maze2d-umaze style)
    Simulator: gymnasium-robotics' point mass in the U-maze (``PointMazeEnv``: 10 Hz, actions in
    ``[-1, 1]^2``, speed clipped to 5), driven through :class:`Maze2dEnv`. Observations ``[x, y, vx, vy]``
    in gymnasium-robotics coordinates (no goal in the observation, like maze2d). Reward 1 when the point is
    within 0.5 of ONE fixed evaluation goal (the centre of cell (1, 1), i.e. ``(-1, 1)``), else 0, computed
    on the observation after the step (the gym convention; D4RL's relabel used the one before).
    Data: ``POINTMAZE_STREAMS`` continuing trajectories (never reset, like D4RL's generator); a
    :class:`WaypointController` (BFS over the maze grid to the goal cell, PD control ``10 (w - p) - v``
    towards the next cell centre, then the goal itself, clipped to ``[-1, 1]``) plus Gaussian action noise
    (std ``POINTMAZE_NOISE``) visits random goals one after another (a goal is reached within
    ``GOAL_REACHED_RADIUS``; a goal not reached within 300 steps is replaced). Each trajectory is cut into
    300-step episodes (timeouts, no terminals). Default 1,000,000 steps; other sizes get their own cache id.
    Reference scores (stored in the Minari metadata): min = mean return of a uniform random policy, max =
    mean return of the noise-free controller driving to the evaluation goal, each over
    ``REF_EPISODES`` seeded 300-step episodes of the evaluation env (random start cell, as in D4RL).
    Evaluation env: ``idql_pl/PointMaze2d-UMaze-v0`` (same observation/reward convention, fixed goal,
    300 steps).

``local/bandit`` (the paper's Fig. 1 toy)
    One-step 2-D bandit :class:`BanditEnv`: the observation is the constant ``[0.0]``, actions lie in
    ``[-1, 1]^2``, and the reward is ``BANDIT_REWARDS[k]`` when the action is within ``BANDIT_RADIUS`` of
    the nearest cluster centre ``BANDIT_CENTERS[k]`` (three centres on a circle of radius 0.6 at 90, 210
    and 330 degrees), else 0; every episode ends after one step (terminal). Cluster 0 (top) pays 1.0, the
    others 0.5 and 0.25. Behaviour data: uniform over the three clusters (so the best one is not the most
    frequent), isotropic Gaussian with std ``BANDIT_STD`` around the centre, clipped to ``[-1, 1]``.
    Reference scores: 0 and 1. To keep the Minari file small, each stored Minari episode packs up to
    ``BANDIT_BLOCK`` independent one-step episodes (every step is terminal; the loader counts each step as
    an episode).

Caching: ``$MINARI_DATASETS_PATH/idql_pl/<name>[-n<size>]-v<RECIPE_VERSION>``. Generation writes under a
hidden temp root (same file system) and renames into place, under a file lock, so concurrent processes
(DDP ranks) generate once and a killed run leaves no partial dataset; an unreadable or mismatching cache is
moved aside and regenerated.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from idql_pl.data.minari_source import load_minari
from idql_pl.data.preprocess import SourceData
from idql_pl.errors import DatasetError

RECIPE_VERSION = 0
NAMESPACE = "idql_pl"

# ---------------------------------------------------------------------------------------------- mazes
# D4RL's maze2d layouts ('#' wall, 'O' free, 'G' the evaluation goal); same layouts as gymnasium-robotics'.
MAZES: dict[str, list[str]] = {
    "umaze": ["#####", "#GOO#", "###O#", "#OOO#", "#####"],
    "medium": ["########", "#OO##OO#", "#OO#OOO#", "##OOO###", "#OO#OOO#", "#O#OO#O#", "#OOO#OG#", "########"],
    "large": [
        "############",
        "#OOOO#OOOOO#",
        "#O##O#O#O#O#",
        "#OOOOOO#OOO#",
        "#O####O###O#",
        "#OO#O#OOOOO#",
        "##O#O#O#O###",
        "#OO#OOO#OGO#",
        "############",
    ],
}

POINTMAZE_DEFAULT_SIZE = 1_000_000
POINTMAZE_EPISODE_STEPS = 300
POINTMAZE_NOISE = 0.5
POINTMAZE_STREAMS = 16
GOAL_REACHED_RADIUS = 0.25
GOAL_NOISE = 0.25
REWARD_RADIUS = 0.5
REF_EPISODES = 100
GENERATION_SEED = 0


class MazeGrid:
    """A maze layout, its free cells and BFS next-hop table (cell index -> cell index towards a target)."""

    def __init__(self, rows: list[str]):
        self.rows = rows
        self.height, self.width = len(rows), len(rows[0])
        self.walls = np.array([[c == "#" for c in r] for r in rows], dtype=bool)
        goals = [(i, j) for i, r in enumerate(rows) for j, c in enumerate(r) if c == "G"]
        self.goal_cell = goals[0] if goals else None
        self.cells = np.argwhere(~self.walls)  # [n, 2] (row, col), row-major order
        self.n = len(self.cells)
        index = -np.ones((self.height, self.width), dtype=np.int64)
        index[self.cells[:, 0], self.cells[:, 1]] = np.arange(self.n)
        self.index = index
        # nearest free cell for every grid cell (walls too), so numerical contact penetration is harmless
        ii, jj = np.mgrid[: self.height, : self.width]
        d = (ii[..., None] - self.cells[:, 0]) ** 2 + (jj[..., None] - self.cells[:, 1]) ** 2
        self.nearest = np.where(index >= 0, index, d.argmin(-1))
        self.next_hop = self._bfs_table()
        # gymnasium-robotics cell centres (maze_size_scaling 1): x = col + 0.5 - W/2, y = H/2 - row - 0.5
        self.x_center, self.y_center = self.width / 2, self.height / 2
        self.centers = np.stack(
            [self.cells[:, 1] + 0.5 - self.x_center, self.y_center - self.cells[:, 0] - 0.5], axis=1
        )

    def _bfs_table(self) -> np.ndarray:
        table = np.zeros((self.n, self.n), dtype=np.int64)
        moves = ((0, -1), (0, 1), (1, 0), (-1, 0))
        for t, (ti, tj) in enumerate(self.cells):
            dist = -np.ones(self.n, dtype=np.int64)
            dist[t] = 0
            queue = deque([(ti, tj)])
            while queue:
                i, j = queue.popleft()
                for di, dj in moves:
                    k = self.index[i + di, j + dj]
                    if k >= 0 and dist[k] < 0:
                        dist[k] = dist[self.index[i, j]] + 1
                        queue.append((i + di, j + dj))
            for s, (si, sj) in enumerate(self.cells):
                if s == t:
                    table[s, t] = t
                    continue
                nbrs = [self.index[si + di, sj + dj] for di, dj in moves]
                table[s, t] = min((k for k in nbrs if k >= 0 and dist[k] >= 0), key=lambda k: dist[k], default=s)
        return table

    def cell_of(self, xy: np.ndarray) -> np.ndarray:
        """Free-cell index of gymnasium-frame positions ``[..., 2]``."""
        row = np.clip(np.floor(self.y_center - xy[..., 1]).astype(np.int64), 0, self.height - 1)
        col = np.clip(np.floor(xy[..., 0] + self.x_center).astype(np.int64), 0, self.width - 1)
        return self.nearest[row, col]

    def center_of(self, cell: tuple[int, int]) -> np.ndarray:
        return self.centers[self.index[cell]]


class Maze2dEnv(gym.Env):
    """Point mass in a maze, maze2d conventions: 4-D observation, fixed goal, sparse reward, no termination.

    ``frame="gymnasium"``: observations in gymnasium-robotics coordinates, goal at the centre of the goal
    cell (used by ``local/pointmaze-umaze``). ``frame="d4rl"``: D4RL maze2d's coordinates, where a cell
    ``(row, col)`` sits at ``qpos = (row, col)`` 0.2 off the cell centre; the map between the two is a
    90-degree rotation plus a shift, ``x_d = (H/2 - 0.7) - y_g, y_d = x_g + (W/2 - 0.7)``, so actions are
    rotated with it (used to evaluate D4RL ``maze2d-*-v1``). Starts: a uniformly random free cell (goal
    cell included, as in D4RL), position noise U(-0.1, 0.1), velocity noise N(0, 0.1). Reward: 1 within
    0.5 of the goal. The time limit comes from the registered spec.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, maze: str = "umaze", frame: str = "gymnasium", goal_cell: Any = None, render_mode: str | None = None):
        from gymnasium_robotics.envs.maze.point_maze import PointMazeEnv

        if maze not in MAZES or frame not in ("gymnasium", "d4rl"):
            raise ValueError(f"maze must be one of {sorted(MAZES)} and frame 'gymnasium' or 'd4rl'")
        self.grid = MazeGrid(MAZES[maze])
        self.frame = frame
        grid_map = [[1 if w else 0 for w in row] for row in self.grid.walls]
        self._inner = PointMazeEnv(maze_map=grid_map, render_mode=render_mode, continuing_task=True, reset_target=False)
        with contextlib.suppress(OSError):
            os.remove(self._inner.tmp_xml_file_path)  # gymnasium-robotics leaves its maze xml in /tmp
        self._point = self._inner.point_env
        self.render_mode = render_mode
        offset = np.array([0.2, -0.2]) if frame == "d4rl" else np.zeros(2)  # D4RL qpos sits 0.2 off-centre
        self._starts = self.grid.centers + offset
        cell = tuple(goal_cell) if goal_cell is not None else self.grid.goal_cell
        self.goal_xy = self.grid.center_of(cell) + offset  # gymnasium frame
        self.goal_obs = self.to_obs(np.r_[self.goal_xy, 0.0, 0.0])[:2]
        self._inner.goal = self.goal_xy.copy()
        self._inner.update_target_site_pos()
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
        self._state = np.zeros(4)

    # frame maps (vectorised over leading axes)
    def to_obs(self, state: np.ndarray) -> np.ndarray:
        """Gymnasium-frame ``[x, y, vx, vy]`` -> observation frame."""
        if self.frame == "gymnasium":
            return state
        g = self.grid
        out = np.empty_like(state)
        out[..., 0] = (g.y_center - 0.7) - state[..., 1]
        out[..., 1] = state[..., 0] + (g.x_center - 0.7)
        out[..., 2] = -state[..., 3]
        out[..., 3] = state[..., 2]
        return out

    def from_obs(self, obs: np.ndarray) -> np.ndarray:
        """Observation frame -> gymnasium-frame ``[x, y, vx, vy]``."""
        if self.frame == "gymnasium":
            return obs
        g = self.grid
        out = np.empty_like(obs)
        out[..., 0] = obs[..., 1] - (g.x_center - 0.7)
        out[..., 1] = (g.y_center - 0.7) - obs[..., 0]
        out[..., 2] = obs[..., 3]
        out[..., 3] = -obs[..., 2]
        return out

    def action_to_gym(self, action: np.ndarray) -> np.ndarray:
        if self.frame == "gymnasium":
            return action
        return np.stack([action[..., 1], -action[..., 0]], axis=-1)

    def action_from_gym(self, action: np.ndarray) -> np.ndarray:
        if self.frame == "gymnasium":
            return action
        return np.stack([-action[..., 1], action[..., 0]], axis=-1)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        rng = self.np_random
        start = self._starts[rng.integers(self.grid.n)]
        qpos = start + rng.uniform(-0.1, 0.1, size=2)
        qvel = rng.normal(0.0, 0.1, size=2)
        self._point.reset()
        self._point.set_state(qpos, qvel)
        self._state = np.r_[qpos, qvel]
        return self.to_obs(self._state).astype(np.float32), {"success": self._success()}

    def sim_step(self, action_gym: np.ndarray) -> np.ndarray:
        """Advance the simulator with a gymnasium-frame action; returns the gymnasium-frame state."""
        self._point.step(np.asarray(action_gym, dtype=np.float64))
        data = self._point.data
        self._state[:2] = data.qpos[:2]
        self._state[2:] = data.qvel[:2]
        return self._state

    def _success(self) -> bool:
        return bool(np.linalg.norm(self._state[:2] - self.goal_xy) <= REWARD_RADIUS)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0)
        self.sim_step(self.action_to_gym(a))
        success = self._success()
        return self.to_obs(self._state).astype(np.float32), float(success), False, False, {"success": success}

    def render(self) -> Any:
        return self._inner.render()

    def close(self) -> None:
        self._inner.close()


class WaypointController:
    """BFS-over-cells + PD waypoint controller (maze2d-style), vectorised over a batch of points.

    Works in the gymnasium frame: the waypoint is the centre of the next cell on a shortest cell path to the
    goal's cell, or the goal itself once in that cell; ``a = clip(kp (w - p) - kd v, -1, 1)``.
    """

    def __init__(self, grid: MazeGrid, kp: float = 10.0, kd: float = 1.0):
        self.grid, self.kp, self.kd = grid, kp, kd

    def __call__(self, state: np.ndarray, goal_xy: np.ndarray) -> np.ndarray:
        """``state`` ``[K, 4]`` (x, y, vx, vy), ``goal_xy`` ``[K, 2]`` or ``[2]`` -> actions ``[K, 2]``."""
        pos, vel = state[:, :2], state[:, 2:4]
        goal_xy = np.broadcast_to(goal_xy, pos.shape)
        cur, tgt = self.grid.cell_of(pos), self.grid.cell_of(goal_xy)
        waypoint = np.where((cur == tgt)[:, None], goal_xy, self.grid.centers[self.grid.next_hop[cur, tgt]])
        return np.clip(self.kp * (waypoint - pos) - self.kd * vel, -1.0, 1.0)


def _log(msg: str) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0":
        print(f"[idql_pl.data] {msg}", file=sys.stderr, flush=True)


def rollout_returns(
    policy: Callable[[np.ndarray, Maze2dEnv, np.random.Generator], np.ndarray],
    num_episodes: int,
    seed: int,
    num_envs: int = 10,
    maze: str = "umaze",
    frame: str = "gymnasium",
    steps: int = POINTMAZE_EPISODE_STEPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns and success flags (reward ever 1) of ``num_episodes`` seeded episodes, ``num_envs`` in lockstep.

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


def controller_policy(noise: float = 0.0) -> Callable[[np.ndarray, Maze2dEnv, np.random.Generator], np.ndarray]:
    """The waypoint controller driving to the env's evaluation goal (any frame), plus optional noise."""
    cache: dict[int, WaypointController] = {}

    def policy(obs: np.ndarray, env: Maze2dEnv, rng: np.random.Generator) -> np.ndarray:
        ctrl = cache.setdefault(id(env.grid), WaypointController(env.grid))
        act = ctrl(env.from_obs(obs), env.goal_xy)
        if noise:
            act = np.clip(act + rng.normal(0.0, noise, act.shape), -1.0, 1.0)
        return env.action_from_gym(act)

    return policy


def generate_pointmaze(size: int, seed: int = GENERATION_SEED, noise: float = POINTMAZE_NOISE) -> tuple[list[dict], dict]:
    """Simulate ``size`` steps (maze2d-style); returns episode dicts (``T + 1`` observations) and stats."""
    limit = POINTMAZE_EPISODE_STEPS
    num_episodes = -(-size // limit)
    streams = min(POINTMAZE_STREAMS, num_episodes)
    steps = -(-num_episodes // streams) * limit
    envs = [Maze2dEnv("umaze", "gymnasium") for _ in range(streams)]
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


# ---------------------------------------------------------------------------------------------- bandit
BANDIT_STATE = 0.0
BANDIT_ANGLES_DEG = (90.0, 210.0, 330.0)
BANDIT_CENTERS = 0.6 * np.stack(
    [np.cos(np.deg2rad(BANDIT_ANGLES_DEG)), np.sin(np.deg2rad(BANDIT_ANGLES_DEG))], axis=1
).astype(np.float32)
BANDIT_REWARDS = np.array([1.0, 0.5, 0.25], dtype=np.float32)
BANDIT_BEST = int(np.argmax(BANDIT_REWARDS))
BANDIT_RADIUS = 0.25
BANDIT_STD = 0.08
BANDIT_DEFAULT_SIZE = 20_000
BANDIT_BLOCK = 1000


def bandit_reward(actions: np.ndarray) -> np.ndarray:
    """Reward of actions ``[..., 2]``: the nearest cluster's reward if within ``BANDIT_RADIUS``, else 0."""
    d = np.linalg.norm(np.asarray(actions)[..., None, :] - BANDIT_CENTERS, axis=-1)
    k = d.argmin(-1)
    return np.where(d.min(-1) <= BANDIT_RADIUS, BANDIT_REWARDS[k], 0.0).astype(np.float32)


class BanditEnv(gym.Env):
    """The one-step 2-D bandit (see the module docstring): constant observation, terminal after one step."""

    metadata = {"render_modes": []}

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._obs = np.full(1, BANDIT_STATE, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return self._obs.copy(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        a = np.clip(np.asarray(action, dtype=np.float32).reshape(2), -1.0, 1.0)
        r = float(bandit_reward(a))
        return self._obs.copy(), r, True, False, {"success": r == float(BANDIT_REWARDS.max())}


def generate_bandit(size: int, seed: int = GENERATION_SEED) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(seed)
    cluster = rng.integers(len(BANDIT_CENTERS), size=size)
    actions = np.clip(BANDIT_CENTERS[cluster] + rng.normal(0.0, BANDIT_STD, (size, 2)), -1.0, 1.0).astype(np.float32)
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
    stats = {"cluster_counts": np.bincount(cluster, minlength=3).tolist(), "in_radius_fraction": float((rewards > 0).mean())}
    return episodes, stats


# ---------------------------------------------------------------------------------------------- env ids
POINTMAZE_ENV_ID = "idql_pl/PointMaze2d-UMaze-v0"
BANDIT_ENV_ID = "idql_pl/Bandit2D-v0"
MAZE2D_D4RL_ENV_ID = "idql_pl/Maze2dD4RL-v0"


def register_envs() -> None:
    """Register this package's gymnasium ids (idempotent)."""
    specs = [
        (POINTMAZE_ENV_ID, "idql_pl.data.local:Maze2dEnv", POINTMAZE_EPISODE_STEPS, {"maze": "umaze", "frame": "gymnasium"}),
        (MAZE2D_D4RL_ENV_ID, "idql_pl.data.local:Maze2dEnv", None, {"maze": "umaze", "frame": "d4rl"}),
        (BANDIT_ENV_ID, "idql_pl.data.local:BanditEnv", 1, {}),
    ]
    for env_id, entry, steps, kwargs in specs:
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry, max_episode_steps=steps, kwargs=kwargs)


register_envs()


# ---------------------------------------------------------------------------------------------- recipes
RECIPES = {
    "local/pointmaze-umaze": {"stem": "pointmaze-umaze", "default_size": POINTMAZE_DEFAULT_SIZE, "family": "maze2d", "env_id": POINTMAZE_ENV_ID},
    "local/bandit": {"stem": "bandit", "default_size": BANDIT_DEFAULT_SIZE, "family": "bandit", "env_id": BANDIT_ENV_ID},
}


def minari_id(name: str, size: int | None = None) -> str:
    """Cache id: ``idql_pl/<stem>[-n<size>]-v<RECIPE_VERSION>`` (the size only when not the default)."""
    recipe = _recipe(name)
    size = recipe["default_size"] if size is None else int(size)
    suffix = "" if size == recipe["default_size"] else f"-n{size}"
    return f"{NAMESPACE}/{recipe['stem']}{suffix}-v{RECIPE_VERSION}"


def _recipe(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise DatasetError(f"unknown local recipe '{name}'; available: {', '.join(RECIPES)}")
    return RECIPES[name]


def _root() -> Path:
    from minari.storage.datasets_root_dir import get_dataset_path

    return Path(get_dataset_path())


@contextlib.contextmanager
def _datasets_path(path: Path) -> Iterator[None]:
    """Point Minari at another datasets root for the duration (it reads MINARI_DATASETS_PATH per call)."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory file lock (no-op where fcntl is unavailable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _clean_stale_tmp(tmp_root: Path, min_age_s: float = 600.0) -> None:
    """Remove temp generation dirs (``<pid>-<uuid>``) older than ``min_age_s`` whose process is gone.

    The age guard keeps a live generation on another host (shared file system, foreign pid) safe.
    """
    if not tmp_root.is_dir():
        return
    now = time.time()
    for d in tmp_root.iterdir():
        try:
            age = now - d.stat().st_mtime
        except OSError:
            continue
        if age < min_age_s:
            continue
        pid = d.name.split("-", 1)[0]
        alive = False
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                alive = True
            except PermissionError:  # exists, owned by someone else
                alive = True
            except (ProcessLookupError, OverflowError):
                alive = False
        if not alive or age > 86_400:
            shutil.rmtree(d, ignore_errors=True)


def _expected_meta(name: str, size: int) -> dict[str, Any]:
    return {"recipe": name, "version": RECIPE_VERSION, "dataset_size": size, "seed": GENERATION_SEED}


def _cache_ok(path: Path, name: str, size: int) -> bool:
    try:
        meta = json.loads((path / "data" / "metadata.json").read_text())
        recipe = meta.get("idql_recipe", {})
        return (
            all(recipe.get(k) == v for k, v in _expected_meta(name, size).items())
            and meta.get("total_steps") == size
            and (path / "data" / "main_data.hdf5").is_file()
        )
    except (OSError, ValueError):
        return False


def _write_dataset(dataset_id: str, name: str, size: int, final: Path) -> None:
    """Generate into a temp root, then atomically rename to ``final``."""
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    recipe = _recipe(name)
    root = _root()
    tmp_root = root / ".idql_tmp"
    _clean_stale_tmp(tmp_root)
    work = tmp_root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        if name == "local/pointmaze-umaze":
            _log(f"generating {name} ({size:,} steps) into {final} (one-time; ~30 s per million steps)")
            episodes, stats = generate_pointmaze(size)
            rand, _ = rollout_returns(random_policy, REF_EPISODES, seed=10_000)
            ctrl, ctrl_success = rollout_returns(controller_policy(0.0), REF_EPISODES, seed=20_000)
            ref_min, ref_max = float(rand.mean()), float(ctrl.mean())
            stats.update(
                {"ref_random_return_std": float(rand.std()), "ref_controller_return_std": float(ctrl.std()),
                 "controller_eval_success_rate": float(ctrl_success.mean()), "ref_episodes": REF_EPISODES}
            )
            description = "maze2d-umaze-style data: noisy BFS+PD waypoint controller visiting random goals (idql_pl.data.local)"
        else:
            _log(f"generating {name} ({size:,} samples) into {final}")
            episodes, stats = generate_bandit(size)
            ref_min, ref_max = 0.0, float(BANDIT_REWARDS.max())
            description = "one-step 2-D bandit with three action clusters (IDQL paper Fig. 1; idql_pl.data.local)"
        buffers = [
            EpisodeBuffer(id=i, observations=e["observations"], actions=e["actions"], rewards=e["rewards"],
                          terminations=e["terminations"], truncations=e["truncations"])
            for i, e in enumerate(episodes)
        ]
        env = gym.make(recipe["env_id"])
        try:
            with _datasets_path(work), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = minari.create_dataset_from_buffers(
                    dataset_id, buffers, env=env, eval_env=recipe["env_id"], algorithm_name=description,
                    author="idql_pl", author_email="n/a", code_permalink="idql_pl/data/local.py",
                    ref_min_score=ref_min, ref_max_score=ref_max, num_episodes_average_score=REF_EPISODES,
                    description=description,
                )
                stats["generation_seconds"] = round(time.perf_counter() - t0, 2)
                ds.storage.update_metadata({"idql_recipe": {**_expected_meta(name, size), **stats}})
        finally:
            env.close()
        final.parent.mkdir(parents=True, exist_ok=True)
        ns_meta = final.parent / "namespace_metadata.json"
        if not ns_meta.exists():
            ns_meta.write_text(json.dumps({"description": "datasets generated by idql_pl local recipes"}))
        try:
            os.replace(work / dataset_id, final)  # atomic on one file system
        except OSError:
            if not _cache_ok(final, name, size):  # (a process without our lock, e.g. on another node, won)
                raise
        _log(f"{name}: {size:,} steps in {stats['generation_seconds']} s; ref min/max {ref_min:.2f}/{ref_max:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_local(name: str, size: int | None = None) -> str:
    """Generate the recipe's Minari dataset if it is not cached (or is unreadable); returns its Minari id."""
    recipe = _recipe(name)
    size = recipe["default_size"] if size is None else int(size)
    if size <= 0:
        raise DatasetError(f"dataset_size must be positive, got {size}")
    dataset_id = minari_id(name, size)
    root = _root()
    final = root / dataset_id
    if _cache_ok(final, name, size):
        return dataset_id
    with _lock(root / ".idql_locks" / f"{dataset_id.replace('/', '_')}.lock"):
        if _cache_ok(final, name, size):  # another process generated it while we waited
            return dataset_id
        if final.exists():
            warnings.warn(f"cached dataset {final} is incomplete or from another recipe version; regenerating it", stacklevel=2)
            aside = root / ".idql_tmp" / f"corrupt-{uuid.uuid4().hex[:8]}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        _write_dataset(dataset_id, name, size, final)
    return dataset_id


def load_local(name: str, size: int | None = None) -> SourceData:
    """Load (generating on first use) a local recipe; an unreadable cache is regenerated once."""
    recipe = _recipe(name)
    dataset_id = ensure_local(name, size)
    try:
        src = load_minari(dataset_id, name=name, source="local", family=recipe["family"], download=False)
    except DatasetError:
        final = _root() / dataset_id
        warnings.warn(f"cached dataset {final} is unreadable; regenerating it", stacklevel=2)
        shutil.rmtree(final, ignore_errors=True)
        dataset_id = ensure_local(name, size)
        src = load_minari(dataset_id, name=name, source="local", family=recipe["family"], download=False)
    meta = json.loads((Path(src.info.path) / "metadata.json").read_text()) if src.info.path else {}
    src.info.extra.update({"recipe": meta.get("idql_recipe", {})})
    return src

"""Point mass in a maze with D4RL maze2d's conventions (:class:`Maze2dEnv`), its layouts (:data:`MAZES`), grid
(:class:`MazeGrid`) and the BFS + PD :class:`WaypointController` that generates ``local/pointmaze-umaze``."""

from __future__ import annotations

import contextlib
import os
from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np

REWARD_RADIUS = 0.5  # reward 1 within this distance of the goal (D4RL maze2d)

# D4RL's maze2d layouts ('#' wall, 'O' free, 'G' the evaluation goal); same layouts as gymnasium-robotics'.
MAZES: dict[str, list[str]] = {
    "umaze": ["#####", "#GOO#", "###O#", "#OOO#", "#####"],
    "medium": ["########", "#OO##OO#", "#OO#OOO#", "##OOO###", "#OO#OOO#", "#O#OO#O#", "#OOO#OG#",
               "########"],
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
                table[s, t] = min((k for k in nbrs if k >= 0 and dist[k] >= 0), key=lambda k: dist[k],
                                  default=s)
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

    def __init__(self, maze: str = "umaze", frame: str = "gymnasium", goal_cell: Any = None,
                 render_mode: str | None = None):
        from gymnasium_robotics.envs.maze.point_maze import PointMazeEnv

        if maze not in MAZES or frame not in ("gymnasium", "d4rl"):
            raise ValueError(f"maze must be one of {sorted(MAZES)} and frame 'gymnasium' or 'd4rl'")
        self.grid = MazeGrid(MAZES[maze])
        self.frame = frame
        grid_map = [[1 if w else 0 for w in row] for row in self.grid.walls]
        self._inner = PointMazeEnv(maze_map=grid_map, render_mode=render_mode, continuing_task=True,
                                   reset_target=False)
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

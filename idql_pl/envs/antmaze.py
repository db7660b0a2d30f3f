"""D4RL antmaze's evaluation conventions on gymnasium-robotics' AntMaze (:class:`AntMazeD4RLEnv`)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import gymnasium as gym
import numpy as np

R, G = "r", "g"
# D4RL's evaluation maps (d4rl/locomotion/maze_env.py): 'r' the start, 'g' the goal cell.
ANTMAZE_MAPS: dict[str, list[list[Any]]] = {
    "umaze": [[1, 1, 1, 1, 1], [1, R, 0, 0, 1], [1, 1, 1, 0, 1], [1, G, 0, 0, 1], [1, 1, 1, 1, 1]],
    "medium": [
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, R, 0, 1, 1, 0, 0, 1],
        [1, 0, 0, 1, 0, 0, 0, 1],
        [1, 1, 0, 0, 0, 1, 1, 1],
        [1, 0, 0, 1, 0, 0, 0, 1],
        [1, 0, 1, 0, 0, 1, 0, 1],
        [1, 0, 0, 0, 1, 0, G, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ],
    "large": [
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, R, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],
        [1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1],
        [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1],
        [1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1],
        [1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1],
        [1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1],
        [1, 0, 0, 1, 0, 0, 0, 1, 0, G, 0, 1],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    ],
}
ANTMAZE_SCALE = 4.0


class AntMazeD4RLEnv(gym.Env):
    """D4RL antmaze evaluation conventions on gymnasium-robotics' AntMaze (v4 ant, 27-D ``observation``).

    D4RL places cell ``(i, j)`` at ``(j s - x_r, i s - y_r)`` (``s = 4``, origin at the start cell), i.e. its
    y axis grows with the row index while gymnasium-robotics' shrinks, so the map is built row-flipped and the
    two frames differ by a translation only. Observation: D4RL's 29-D ``[qpos[:15], qvel[:14]]`` with x, y in
    D4RL's frame. Start: the ``r`` cell plus U(-0.1, 0.1) on every qpos and N(0, 0.1) on every qvel. Goal:
    the ``g`` cell plus U(0, 1) + U(0, 0.5) per axis (D4RL's goal sampler), re-sampled every episode
    (``resample_goal``, D4RL v2) or once per env (v0/v1). Reward 1 and termination within 0.5 of the goal.
    Approximate: gymnasium's ant model (gear 150, action range [-1, 1]) is not D4RL's ant.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, maze: str = "umaze", resample_goal: bool = True, render_mode: str | None = None):
        from gymnasium_robotics.envs.maze.ant_maze_v4 import AntMazeEnv

        rows = ANTMAZE_MAPS[maze]
        self.height, self.width = len(rows), len(rows[0])
        find = lambda tag: next((i, j) for i, r in enumerate(rows) for j, c in enumerate(r) if c == tag)  # noqa: E731
        self.start_cell, self.goal_cell = find(R), find(G)
        s = ANTMAZE_SCALE
        gym_map = [[1 if c == 1 else 0 for c in r] for r in reversed(rows)]
        self._inner = AntMazeEnv(maze_map=gym_map, render_mode=render_mode, continuing_task=True,
                                 reset_target=False)
        with contextlib.suppress(OSError):
            os.remove(self._inner.tmp_xml_file_path)
        self._ant = self._inner.ant_env
        torso = np.array([self.start_cell[1] * s, self.start_cell[0] * s])
        # gym position of D4RL point p: p + offset
        self.offset = torso + 0.5 * s - np.array([self.width, self.height]) * s / 2
        self.render_mode = render_mode
        self.resample_goal = resample_goal
        self.goal: np.ndarray | None = None
        self.action_space = gym.spaces.Box(-1.0, 1.0, self._ant.action_space.shape, np.float32)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (29,), np.float32)

    def d4rl_xy(self, cell: tuple[int, int]) -> np.ndarray:
        s = ANTMAZE_SCALE
        return (np.array([cell[1] * s, cell[0] * s])
                - np.array([self.start_cell[1] * s, self.start_cell[0] * s]))

    def _obs(self) -> np.ndarray:
        qpos, qvel = self._ant.data.qpos, self._ant.data.qvel
        return np.r_[qpos[:2] - self.offset, qpos[2:15], qvel[:14]].astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        rng = self.np_random
        if self.goal is None or self.resample_goal:
            s = ANTMAZE_SCALE
            noise = rng.uniform(0, 0.25 * s, 2) + rng.uniform(0, 0.5, 2) * 0.25 * s
            self.goal = np.maximum(self.d4rl_xy(self.goal_cell) + noise, 0.0)
            self._inner.goal = self.goal + self.offset
            self._inner.update_target_site_pos()
        self._ant.reset()
        qpos = self._ant.init_qpos + rng.uniform(-0.1, 0.1, self._ant.model.nq)
        qvel = self._ant.init_qvel + rng.normal(0.0, 0.1, self._ant.model.nv)
        qpos[:2] += self.d4rl_xy(self.start_cell) + self.offset - self._ant.init_qpos[:2]
        self._ant.set_state(qpos, qvel)
        return self._obs(), {"goal": self.goal.copy(), "success": False}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self._ant.step(np.asarray(action, dtype=np.float64))
        obs = self._obs()
        success = bool(np.linalg.norm(obs[:2] - self.goal) <= 0.5)
        return obs, float(success), success, False, {"success": success}

    def render(self) -> Any:
        return self._inner.render()

    def close(self) -> None:
        self._inner.close()

"""The paper's Fig. 1 toy: a one-step 2-D bandit with three action clusters (:class:`BanditEnv`).

The observation is the constant ``[0.0]``, actions lie in ``[-1, 1]^2``, and the reward is
``BANDIT_REWARDS[k]`` when the action is within ``BANDIT_RADIUS`` of the nearest cluster centre
``BANDIT_CENTERS[k]`` (three centres on a circle of radius 0.6 at 90, 210 and 330 degrees), else 0; every
episode ends after one step (terminal). Cluster 0 (top) pays 1.0, the others 0.5 and 0.25.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

BANDIT_STATE = 0.0
BANDIT_ANGLES_DEG = (90.0, 210.0, 330.0)
BANDIT_CENTERS = 0.6 * np.stack(
    [np.cos(np.deg2rad(BANDIT_ANGLES_DEG)), np.sin(np.deg2rad(BANDIT_ANGLES_DEG))], axis=1
).astype(np.float32)
BANDIT_REWARDS = np.array([1.0, 0.5, 0.25], dtype=np.float32)
BANDIT_BEST = int(np.argmax(BANDIT_REWARDS))
BANDIT_RADIUS = 0.25
BANDIT_STD = 0.08


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

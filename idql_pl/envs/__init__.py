"""The evaluation environments this project defines, each in its own module, and their gymnasium ids.

- ``idql_pl/PointMaze2d-UMaze-v0``, ``-Medium-v0``, ``-Large-v0``: :class:`~idql_pl.envs.maze2d.Maze2dEnv` in
  gymnasium-robotics' frame, the evaluation envs of ``local/pointmaze-umaze``, ``-medium``, ``-large`` (fixed
  goal, D4RL maze2d's episode limits: 300, 600, 800 steps).
- ``idql_pl/Maze2dD4RL-v0``: the same env in D4RL maze2d's frame (D4RL ``maze2d-*-v1``).
- ``idql_pl/AntMazeD4RL-v0``: :class:`~idql_pl.envs.antmaze.AntMazeD4RLEnv` (D4RL ``antmaze-*``).
- ``idql_pl/Bandit2D-v0``: :class:`~idql_pl.envs.bandit.BanditEnv` (``local/bandit``, one step).

Importing this package registers the ids; :func:`make_env` builds one with a one-line error on failure.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from idql_pl.errors import EvalEnvError

# D4RL maze2d's episode limits (its gym registrations of maze2d-umaze/medium/large: max_episode_steps)
MAZE2D_EPISODE_STEPS: dict[str, int] = {"umaze": 300, "medium": 600, "large": 800}
POINTMAZE_ENV_IDS: dict[str, str] = {
    "umaze": "idql_pl/PointMaze2d-UMaze-v0",
    "medium": "idql_pl/PointMaze2d-Medium-v0",
    "large": "idql_pl/PointMaze2d-Large-v0",
}
POINTMAZE_ENV_ID = POINTMAZE_ENV_IDS["umaze"]
MAZE2D_ENV_ID = "idql_pl/Maze2dD4RL-v0"
ANTMAZE_ENV_ID = "idql_pl/AntMazeD4RL-v0"
BANDIT_ENV_ID = "idql_pl/Bandit2D-v0"
POINTMAZE_EPISODE_STEPS = MAZE2D_EPISODE_STEPS["umaze"]

_SPECS: dict[str, tuple[str, int | None, dict[str, Any]]] = {
    **{env_id: ("idql_pl.envs.maze2d:Maze2dEnv", MAZE2D_EPISODE_STEPS[m], {"maze": m, "frame": "gymnasium"})
       for m, env_id in POINTMAZE_ENV_IDS.items()},
    MAZE2D_ENV_ID: ("idql_pl.envs.maze2d:Maze2dEnv", None, {"maze": "umaze", "frame": "d4rl"}),
    ANTMAZE_ENV_ID: ("idql_pl.envs.antmaze:AntMazeD4RLEnv", None, {"maze": "umaze"}),
    BANDIT_ENV_ID: ("idql_pl.envs.bandit:BanditEnv", 1, {}),
}


def register_envs() -> None:
    """Register this package's gymnasium ids (idempotent)."""
    for env_id, (entry_point, steps, kwargs) in _SPECS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point, max_episode_steps=steps, kwargs=kwargs)


def env_error(what: str, err: Exception) -> EvalEnvError:
    """The one-line error for an evaluation env that could not be created (``what``: which env, for what)."""
    return EvalEnvError(f"cannot create {what} ({type(err).__name__}: {' '.join(str(err).split())[:160]});"
                        " install the simulators: pip install 'gymnasium[mujoco]' gymnasium-robotics")


def make_env(env_id: str, dataset: str, **kwargs: Any) -> gym.Env:
    """``gym.make(env_id, **kwargs)``, failing with :func:`env_error`'s one line."""
    try:
        return gym.make(env_id, **kwargs)
    except Exception as e:
        raise env_error(f"evaluation env {env_id} for {dataset}", e) from e


register_envs()

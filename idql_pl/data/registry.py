"""The D4RL dataset table: download URL, reference returns, episode limit, family, evaluation env.

Reference returns and episode limits are D4RL's own (docs/fidelity.md §6). Evaluation environments are
gymnasium ones because the `d4rl` package needs gym<0.25 and mujoco-py (docs/fidelity.md §8):

* locomotion: ``Hopper-v4`` / ``HalfCheetah-v4`` / ``Walker2d-v4`` (the same model files as D4RL's v3 envs).
* maze2d: ``idql_pl/Maze2dD4RL-v0`` (:class:`idql_pl.envs.maze2d.Maze2dEnv` in the D4RL frame): the
  gymnasium-robotics point mass in the D4RL maze, with D4RL's coordinate frame (a 90-degree rotation of
  gymnasium-robotics' frame), goal, start distribution and sparse reward. Approximate: the simulator build
  differs from D4RL's mujoco-py one.
* antmaze: ``idql_pl/AntMazeD4RL-v0`` (:class:`idql_pl.data.d4rl.AntMazeD4RLEnv`): gymnasium-robotics'
  AntMaze with the D4RL maze, D4RL coordinates (row-flipped map + translation), D4RL's goal sampling,
  sparse reward and termination at the goal. Approximate: gymnasium's ant model is not D4RL's ant model, so
  scores are not strictly comparable to the paper; the Minari ports (``D4RL/antmaze/*-v1``) match their
  own envs exactly.
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass, field
from typing import Any

from idql_pl.envs import ANTMAZE_ENV_ID, MAZE2D_ENV_ID

_BASE = "http://rail.eecs.berkeley.edu/datasets/offline_rl"

LOCOMOTION_REF = {  # docs/fidelity.md §6 (D4RL infos.py)
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}
LOCOMOTION_ENV = {"hopper": "Hopper-v4", "halfcheetah": "HalfCheetah-v4", "walker2d": "Walker2d-v4"}
LOCOMOTION_LEVELS = ("random", "medium", "medium-replay", "medium-expert", "expert")


FAMILIES = ("locomotion", "antmaze", "maze2d", "bandit", "other")


@dataclass(frozen=True)
class D4RLSpec:
    """One D4RL dataset: where it lives and how to evaluate on it."""

    name: str
    url: str
    family: str
    ref_min_score: float
    ref_max_score: float
    max_episode_steps: int
    env_id: str
    env_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        """D4RL's own cache file name (the URL's basename), so existing ~/.d4rl/datasets files are reused."""
        return self.url.rsplit("/", 1)[-1]


def _locomotion() -> dict[str, D4RLSpec]:
    out = {}
    for env, (lo, hi) in LOCOMOTION_REF.items():
        for level in LOCOMOTION_LEVELS:
            name = f"{env}-{level}-v2"
            url = f"{_BASE}/gym_mujoco_v2/{env}_{level.replace('-', '_')}-v2.hdf5"
            out[name] = D4RLSpec(name, url, "locomotion", lo, hi, 1000, LOCOMOTION_ENV[env])
    return out


# antmaze: (name, maze, v0 file in ant_maze_new/, v2 file in ant_maze_v2/)
_ANTMAZE = [
    ("umaze", "umaze", "Ant_maze_u-maze_noisy_multistart_False_multigoal_False_sparse"),
    ("umaze-diverse", "umaze", "Ant_maze_u-maze_noisy_multistart_True_multigoal_True_sparse"),
    ("medium-play", "medium", "Ant_maze_big-maze_noisy_multistart_True_multigoal_False_sparse"),
    ("medium-diverse", "medium", "Ant_maze_big-maze_noisy_multistart_True_multigoal_True_sparse"),
    ("large-play", "large", "Ant_maze_hardest-maze_noisy_multistart_True_multigoal_False_sparse"),
    ("large-diverse", "large", "Ant_maze_hardest-maze_noisy_multistart_True_multigoal_True_sparse"),
]


def _antmaze() -> dict[str, D4RLSpec]:
    out = {}
    for task, maze, stem in _ANTMAZE:
        limit = 700 if maze == "umaze" else 1000
        # v2 re-randomises the goal every episode (D4RL `v2_resets`); v0 fixed it once per env instance.
        for version, url in (
            ("v2", f"{_BASE}/ant_maze_v2/{stem}_fixed.hdf5"),
            ("v0", f"{_BASE}/ant_maze_new/{stem}.hdf5"),
        ):
            name = f"antmaze-{task}-{version}"
            kwargs = {"maze": maze, "resample_goal": version == "v2"}
            out[name] = D4RLSpec(name, url, "antmaze", 0.0, 1.0, limit, ANTMAZE_ENV_ID, kwargs)
    return out


_MAZE2D = {"umaze": (23.85, 161.86, 300), "medium": (13.13, 277.39, 600), "large": (6.7, 273.99, 800)}


def _maze2d() -> dict[str, D4RLSpec]:
    out = {}
    for maze, (lo, hi, limit) in _MAZE2D.items():
        name = f"maze2d-{maze}-v1"
        url = f"{_BASE}/maze2d/maze2d-{maze}-sparse-v1.hdf5"
        out[name] = D4RLSpec(name, url, "maze2d", lo, hi, limit, MAZE2D_ENV_ID,
                             {"maze": maze, "frame": "d4rl"})
    return out


D4RL_DATASETS: dict[str, D4RLSpec] = {**_locomotion(), **_antmaze(), **_maze2d()}
LOCAL_RECIPES = ("local/pointmaze-umaze", "local/pointmaze-medium", "local/pointmaze-large", "local/bandit")


def get_d4rl_spec(name: str) -> D4RLSpec | None:
    """The registry entry for a D4RL name (``hopper-medium-v2``) or a D4RL file name
    (``hopper_medium-v2.hdf5``)."""
    if name in D4RL_DATASETS:
        return D4RL_DATASETS[name]
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    for spec in D4RL_DATASETS.values():
        if spec.filename == base:
            return spec
    return None


def infer_family(name: str) -> str:
    """Dataset family from a name, id or path (chooses the reward transform, docs/fidelity.md §5)."""
    low = name.lower()
    if "antmaze" in low or "ant_maze" in low:
        return "antmaze"
    if "maze2d" in low or "pointmaze" in low:
        return "maze2d"
    if "bandit" in low:
        return "bandit"
    if low.startswith("mujoco/") or any(k in low for k in ("hopper", "halfcheetah", "walker2d")):
        return "locomotion"
    return "other"


def suggest(name: str) -> str:
    """A ' Did you mean ...?' hint for an unknown dataset name ('' when nothing is close)."""
    close = difflib.get_close_matches(name, [*D4RL_DATASETS, *LOCAL_RECIPES], n=3, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def check_env_id(env_id: str) -> None:
    """Refuse an evaluation env id that is neither a D4RL dataset name nor registered with gymnasium.

    gymnasium-robotics ids are registered on its import (done here on a miss); ``module:Env-vN`` ids are left
    to ``gym.make``, which imports the module.
    """
    if env_id in D4RL_DATASETS or ":" in env_id:
        return
    import gymnasium as gym

    if env_id not in gym.registry:
        with contextlib.suppress(ImportError):
            import gymnasium_robotics  # noqa: F401  (registers its ids; ours are registered by idql_pl.envs)
    if env_id not in gym.registry:
        from idql_pl.errors import DatasetError

        close = difflib.get_close_matches(env_id, [*gym.registry, *D4RL_DATASETS], n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise DatasetError(
            f"unknown eval_env '{env_id}': not a gymnasium env id nor a D4RL dataset name.{hint} Give a"
            " registered id (e.g. Hopper-v4, idql_pl/Maze2dD4RL-v0) or a D4RL name whose evaluation env to"
            " use (e.g. hopper-medium-v2)"
        )

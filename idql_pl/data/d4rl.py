"""Original D4RL hdf5 files, read with h5py (no `d4rl` package), and their gymnasium evaluation envs.

A name from :data:`idql_pl.data.registry.D4RL_DATASETS` is looked up as
``$D4RL_DATASET_DIR/<URL basename>`` (default ``~/.d4rl/datasets``, D4RL's own cache, so existing files are
reused) and downloaded there when absent: streamed to a hidden temp file in the same folder, checked
(length, HDF5 signature) and renamed into place, so an interrupted download leaves nothing behind. A path
to a local ``.hdf5`` file works too (its reference scores/env are known when the file name is a D4RL one).

File layout (IDQL_SPEC Sec. 8): flat ``observations [N, obs_dim]``, ``actions [N, act_dim]``, ``rewards [N]``,
``terminals [N]`` and ``timeouts [N]`` (optional for old files); converted with D4RL's q-learning convention
(IDQL_SPEC Sec. 5, :func:`idql_pl.data.preprocess.d4rl_transitions`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from idql_pl.data.minari_source import wrap_eval_env
from idql_pl.data.preprocess import D4RL_REQUIRED, DatasetInfo, SourceData, d4rl_transitions, validate_arrays
from idql_pl.data.registry import (
    ANTMAZE_ENV_ID,
    D4RL_DATASETS,
    MAZE2D_ENV_ID,
    D4RLSpec,
    get_d4rl_spec,
    infer_family,
)
from idql_pl.errors import DatasetError, EvalEnvError

DOWNLOAD_TIMEOUT_S = 15.0
_KEYS = (*D4RL_REQUIRED, "timeouts")


def dataset_dir() -> Path:
    """``$D4RL_DATASET_DIR`` or ``~/.d4rl/datasets`` (read at call time)."""
    return Path(os.environ.get("D4RL_DATASET_DIR") or Path.home() / ".d4rl" / "datasets").expanduser()


def is_hdf5_path(name: str) -> bool:
    return name.endswith((".hdf5", ".h5")) or os.path.isfile(name)


def _log(msg: str) -> None:
    from idql_pl.data.local import _log as log

    log(msg)


def download(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S, name: str | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically (temp file + rename); any failure is a one-line DatasetError."""
    dest = Path(dest)
    label = name or dest.name
    fix = (
        f"download {url} on a machine with internet access and place it at {dest}, "
        "or set D4RL_DATASET_DIR to the folder that holds it, or pass the local .hdf5 path as the dataset"
    )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create {dest.parent} for D4RL dataset '{label}' ({e}); set D4RL_DATASET_DIR to a writable folder") from e
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
    try:
        _log(f"downloading D4RL dataset '{label}' from {url} to {dest}")
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            shutil.copyfileobj(resp, out, 1 << 20)
        size = tmp.stat().st_size
        if total and size != total:
            raise DatasetError(f"download of '{label}' from {url} was cut short ({size} of {total} bytes); {fix}")
        import h5py

        if not h5py.is_hdf5(tmp):
            raise DatasetError(f"{url} did not return an HDF5 file (got {size} bytes of something else); {fix}")
        os.replace(tmp, dest)
    except DatasetError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DatasetError(f"cannot download D4RL dataset '{label}' from {url} ({' '.join(str(reason).split())}); {fix}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def read_hdf5(path: Path, label: str, fix: str) -> dict[str, np.ndarray]:
    """Read the D4RL keys; an unreadable/truncated file is a DatasetError naming ``fix``."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            present = set(f.keys())
            missing = [k for k in D4RL_REQUIRED if k not in present]
            if missing:
                raise DatasetError(
                    f"{label} ({path}) is missing key(s) {', '.join(missing)} (has: {', '.join(sorted(present)) or 'none'}); "
                    f"a D4RL file needs {', '.join(D4RL_REQUIRED)} (+ timeouts); {fix}"
                )
            data = {k: f[k][()] for k in _KEYS if k in present}
    except DatasetError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise DatasetError(f"{label} ({path}) is not a readable HDF5 file ({' '.join(str(e).split())[:160]}); {fix}") from e
    return data


def load_d4rl(name: str, max_episode_steps: int | None = None) -> SourceData:
    """A D4RL name or a local hdf5 path -> raw transitions (q-learning convention) plus info and env factory.

    ``max_episode_steps`` (given by the user) overrides the table's episode limit where a file has no
    ``timeouts`` key (D4RL's step counter then marks them)."""
    spec: D4RLSpec | None
    if name in D4RL_DATASETS:
        spec = D4RL_DATASETS[name]
        path = dataset_dir() / spec.filename
        fix = f"delete it to download it again from {spec.url}"
        if not path.is_file():
            download(spec.url, path, name=name)
    else:
        path = Path(name).expanduser()
        spec = get_d4rl_spec(path.name)
        if not path.is_file():
            raise DatasetError(
                f"dataset file {path} does not exist; give the path of a D4RL-layout .hdf5 file or a dataset name like hopper-medium-v2"
            )
        fix = f"re-download it from {spec.url}" if spec else "re-create or re-download the file"
    label = f"D4RL dataset '{spec.name if spec else path.name}'"
    raw = read_hdf5(path, label, fix)
    raw = validate_arrays(raw, D4RL_REQUIRED, f"{label} ({path})")
    raw["observations"] = raw["observations"].astype(np.float32, copy=False)
    raw["actions"] = raw["actions"].astype(np.float32, copy=False)
    raw["rewards"] = raw["rewards"].astype(np.float32, copy=False)
    arrays, returns = d4rl_transitions(raw, max_episode_steps or (spec.max_episode_steps if spec else None))
    del raw
    info = DatasetInfo(
        name=spec.name if spec else path.stem,
        source="d4rl",
        family=spec.family if spec else infer_family(path.name),
        env_id=spec.env_id if spec else None,
        ref_min_score=spec.ref_min_score if spec else None,
        ref_max_score=spec.ref_max_score if spec else None,
        max_episode_steps=spec.max_episode_steps if spec else None,
        path=str(path),
        extra={"url": spec.url} if spec else {},
    )
    factory = functools.partial(make_d4rl_env, spec.name) if spec else None
    return SourceData(info=info, episode_returns=returns, env_factory=factory, **arrays)


def make_d4rl_env(name: str) -> gym.Env:
    """The gymnasium evaluation env for a D4RL dataset (see :mod:`idql_pl.data.registry`), float32 obs."""
    spec = D4RL_DATASETS[name]
    try:
        env = gym.make(spec.env_id, max_episode_steps=spec.max_episode_steps, **spec.env_kwargs)
    except Exception as e:
        raise EvalEnvError(
            f"cannot create evaluation env {spec.env_id} for '{name}' ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
            "install the simulators: pip install 'gymnasium[mujoco]' gymnasium-robotics"
        ) from e
    return wrap_eval_env(env, spec.max_episode_steps)


# ---------------------------------------------------------------------------------------------- antmaze
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

    D4RL places cell ``(i, j)`` at ``(j s - x_r, i s - y_r)`` (``s = 4``, origin at the start cell), i.e. its y
    axis grows with the row index while gymnasium-robotics' shrinks, so the map is built row-flipped and the
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
        self._inner = AntMazeEnv(maze_map=gym_map, render_mode=render_mode, continuing_task=True, reset_target=False)
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
        return np.array([cell[1] * s, cell[0] * s]) - np.array([self.start_cell[1] * s, self.start_cell[0] * s])

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


def register_envs() -> None:
    if ANTMAZE_ENV_ID not in gym.registry:
        gym.register(id=ANTMAZE_ENV_ID, entry_point="idql_pl.data.d4rl:AntMazeD4RLEnv", kwargs={"maze": "umaze"})
    if MAZE2D_ENV_ID not in gym.registry:  # also registered by idql_pl.data.local
        from idql_pl.data import local  # noqa: F401


register_envs()

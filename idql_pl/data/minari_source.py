"""Minari datasets (ids containing ``/``, e.g. ``D4RL/antmaze/umaze-v1``, ``mujoco/hopper/medium-v0``).

Loaded with ``minari.load_dataset(id, download=True)`` from ``$MINARI_DATASETS_PATH`` (default
``~/.minari/datasets``); every stored step becomes a transition (Minari records the observation after a
truncation, so nothing is dropped; docs/fidelity.md §5). Dict observations are flattened by
:func:`flatten_obs` in a fixed order: keys sorted alphabetically at every nesting level, each leaf raveled,
e.g. ``achieved_goal (2) | desired_goal (2) | observation (n)`` for gymnasium-robotics mazes. The
evaluation env (``recover_environment(eval_env=True)``) is wrapped to flatten identically.

Reference scores come from the dataset metadata (``ref_min_score``/``ref_max_score``, absent for some).
Note the ports' conventions: ``D4RL/antmaze/*-v1`` and ``D4RL/pointmaze/*-v2`` are continuing tasks
re-collected in gymnasium-robotics envs, and ``mujoco/*-v0`` are not the D4RL datasets (docs/fidelity.md §8).
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from idql_pl.data.preprocess import DatasetInfo, SourceData, episodes_to_transitions
from idql_pl.data.registry import infer_family
from idql_pl.errors import DatasetError


def is_minari_id(name: str) -> bool:
    """Minari ids contain ``/``, are not ``local/...`` recipes and are not existing local files."""
    return "/" in name and not name.startswith("local/") and not os.path.exists(name)


def _leaves(obs: Any, space: gym.Space) -> Iterator[np.ndarray]:
    if isinstance(space, gym.spaces.Dict):
        for key in sorted(space.spaces):
            yield from _leaves(obs[key], space.spaces[key])
    elif isinstance(space, gym.spaces.Tuple):
        for i, sub in enumerate(space.spaces):
            yield from _leaves(obs[i], sub)
    elif isinstance(space, gym.spaces.Box):
        arr = np.asarray(obs)
        yield arr.reshape(arr.shape[0], -1)
    else:
        raise DatasetError(
            f"unsupported observation space {space}; IDQL needs Box (or Dict/Tuple of Box) observations:"
            " pick a continuous-state dataset"
        )


def flatten_obs(obs: Any, space: gym.Space) -> np.ndarray:
    """Flatten a batch (leading axis N) of observations to ``[N, D]`` float32; dict keys in sorted order."""
    if isinstance(space, gym.spaces.Box):
        arr = np.asarray(obs, dtype=np.float32)
        return arr.reshape(arr.shape[0], -1)
    return np.concatenate(list(_leaves(obs, space)), axis=1).astype(np.float32, copy=False)


def flat_dim(space: gym.Space) -> int:
    if isinstance(space, gym.spaces.Box):
        return int(np.prod(space.shape))
    if isinstance(space, gym.spaces.Dict):
        return sum(flat_dim(s) for s in space.spaces.values())
    if isinstance(space, gym.spaces.Tuple):
        return sum(flat_dim(s) for s in space.spaces)
    raise DatasetError(f"unsupported observation space {space}; use Box (or Dict/Tuple of Box) observations")


class FlattenObs(gym.ObservationWrapper):
    """Flatten observations exactly like the dataset (:func:`flatten_obs`) and cast them to float32."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._space = env.observation_space
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (flat_dim(self._space),), np.float32)

    def observation(self, observation: Any) -> np.ndarray:
        batched = _add_batch_axis(observation, self._space)
        return flatten_obs(batched, self._space)[0]


def _add_batch_axis(obs: Any, space: gym.Space) -> Any:
    if isinstance(space, gym.spaces.Dict):
        return {k: _add_batch_axis(obs[k], s) for k, s in space.spaces.items()}
    if isinstance(space, gym.spaces.Tuple):
        return tuple(_add_batch_axis(o, s) for o, s in zip(obs, space.spaces, strict=True))
    return np.asarray(obs)[None]


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:limit]}"


def open_minari(dataset_id: str, download: bool = True) -> Any:
    """``minari.load_dataset`` with one-line errors; a failed download leaves nothing behind."""
    import minari
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.storage.datasets_root_dir import get_dataset_path

    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError) as e:
        raise DatasetError(
            f"malformed Minari dataset id '{dataset_id}'; ids look like namespace/name-vN,"
            " e.g. D4RL/antmaze/umaze-v1 (D4RL names look like hopper-medium-v2, local recipes like"
            " local/pointmaze-umaze)"
        ) from e
    path = Path(get_dataset_path(dataset_id))
    existed = path.exists()
    try:
        return minari.load_dataset(dataset_id, download=download)
    except Exception as e:
        if not existed and path.exists():
            shutil.rmtree(path, ignore_errors=True)
        if existed:
            raise DatasetError(
                f"Minari dataset '{dataset_id}' at {path} is unreadable ({_one_line(e)});"
                " delete that folder and load it again"
            ) from e
        raise DatasetError(
            f"cannot get Minari dataset '{dataset_id}' ({_one_line(e)}); on a machine with internet access"
            f" run `pip install \"minari[hf]\" && minari download {dataset_id}` and copy the folder to {path}"
            " (or set MINARI_DATASETS_PATH to the folder that holds it)"
        ) from e


def read_episodes(dataset: Any) -> list[dict[str, np.ndarray]]:
    """All episodes with flattened float32 observations (per-episode loop; the arrays stay vectorised)."""
    space = dataset.observation_space
    episodes = []
    for ep in dataset.iterate_episodes():
        episodes.append(
            {
                "observations": flatten_obs(ep.observations, space),
                "actions": np.asarray(ep.actions, dtype=np.float32).reshape(len(ep.rewards), -1),
                "rewards": np.asarray(ep.rewards, dtype=np.float32),
                "terminations": np.asarray(ep.terminations, dtype=bool),
                "truncations": np.asarray(ep.truncations, dtype=bool),
            }
        )
    return episodes


def _env_spec(dataset: Any) -> Any:
    return getattr(dataset, "_eval_env_spec", None) or dataset.spec.env_spec


def load_minari(
    dataset_id: str, *, name: str | None = None, source: str = "minari", family: str | None = None,
    download: bool = True
) -> SourceData:
    """Read a Minari dataset into raw transitions plus :class:`DatasetInfo` and an eval-env factory."""
    dataset = open_minari(dataset_id, download=download)
    if not isinstance(dataset.action_space, gym.spaces.Box):
        raise DatasetError(
            f"Minari dataset '{dataset_id}' has {type(dataset.action_space).__name__} actions;"
            " IDQL needs continuous Box actions"
        )
    try:
        episodes = read_episodes(dataset)
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(
            f"Minari dataset '{dataset_id}' at {dataset.storage.data_path} is unreadable ({_one_line(e)});"
            " delete that folder and load it again"
        ) from e
    arrays, returns = episodes_to_transitions(episodes)
    del episodes
    meta = dataset.storage.metadata
    spec = _env_spec(dataset)
    max_steps = getattr(spec, "max_episode_steps", None)
    ref_min, ref_max = meta.get("ref_min_score"), meta.get("ref_max_score")
    info = DatasetInfo(
        name=name or dataset_id,
        source=source,
        family=family or infer_family(dataset_id),
        env_id=getattr(spec, "id", None),
        ref_min_score=None if ref_min is None else float(ref_min),
        ref_max_score=None if ref_max is None else float(ref_max),
        max_episode_steps=None if max_steps is None else int(max_steps),
        path=str(dataset.storage.data_path),
        extra={"minari_id": dataset_id},
    )
    factory = None
    if spec is not None:
        factory = functools.partial(make_minari_env, str(dataset.storage.data_path), info.max_episode_steps)
    return SourceData(info=info, episode_returns=returns, env_factory=factory, **arrays)


def make_minari_env(data_path: str, max_episode_steps: int | None = None, override_limit: bool = False,
                    **make_kwargs: Any) -> gym.Env:
    """``recover_environment(eval_env=True)``, observations flattened like the dataset, TimeLimit ensured.

    ``override_limit``: ``max_episode_steps`` replaces the recorded env spec's own limit (a user-given limit).
    ``make_kwargs`` (e.g. ``render_mode``) go to ``gym.make``.
    """
    import minari

    kwargs = {"max_episode_steps": max_episode_steps} if override_limit and max_episode_steps else {}
    kwargs.update(make_kwargs)
    env = minari.MinariDataset(data_path).recover_environment(eval_env=True, **kwargs)
    return wrap_eval_env(env, max_episode_steps)


def wrap_eval_env(env: gym.Env, max_episode_steps: int | None = None) -> gym.Env:
    """Flatten (dict) observations to float32 like the dataset; add a TimeLimit if the env has none."""
    if max_episode_steps and getattr(env.spec, "max_episode_steps", None) is None:
        env = gym.wrappers.TimeLimit(env, max_episode_steps)
    space = env.observation_space
    if not (isinstance(space, gym.spaces.Box) and space.dtype == np.float32 and len(space.shape) == 1):
        env = FlattenObs(env)
    return env

"""Local recipes: datasets generated on first use into real Minari datasets (no download, no account).
The generators live in :mod:`idql_pl.data.recipes`, the environments in :mod:`idql_pl.envs`.

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

``local/pointmaze-medium``, ``local/pointmaze-large`` (D4RL maze2d-medium / -large style)
    The same recipe in D4RL's medium and large layouts (:data:`idql_pl.envs.maze2d.MAZES`): the evaluation
    goal is the layout's 'G' cell (medium: row 6, column 6; large: row 7, column 9), starts are random free
    cells, and D4RL maze2d's episode limits (medium 600, large 800 steps) cut the data into episodes,
    replace a goal not reached in time, bound the reference episodes and the evaluation env
    (``idql_pl/PointMaze2d-Medium-v0``, ``-Large-v0``). Default sizes are D4RL's: 2,000,000 and 4,000,000.

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
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym

from idql_pl.data.minari_source import load_minari
from idql_pl.data.preprocess import SourceData, log
from idql_pl.data.recipes import (
    BANDIT_DEFAULT_SIZE,
    GENERATION_SEED,
    POINTMAZE_DEFAULT_SIZES,
    REF_EPISODES,
    controller_policy,
    generate_bandit,
    generate_pointmaze,
    random_policy,
    rollout_returns,
)
from idql_pl.envs import BANDIT_ENV_ID, MAZE2D_EPISODE_STEPS, POINTMAZE_ENV_IDS
from idql_pl.envs.bandit import BANDIT_REWARDS
from idql_pl.errors import DatasetError

RECIPE_VERSION = 1  # 1: env entry points moved to idql_pl.envs (the cached env spec records them)
NAMESPACE = "idql_pl"


# ---------------------------------------------------------------------------------------------- recipes
RECIPES = {
    **{f"local/pointmaze-{maze}": {"stem": f"pointmaze-{maze}", "default_size": POINTMAZE_DEFAULT_SIZES[maze],
                                   "family": "maze2d", "env_id": env_id, "maze": maze}
       for maze, env_id in POINTMAZE_ENV_IDS.items()},
    "local/bandit": {"stem": "bandit", "default_size": BANDIT_DEFAULT_SIZE, "family": "bandit",
                     "env_id": BANDIT_ENV_ID},
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
        if recipe["family"] == "maze2d":
            maze = recipe["maze"]
            limit = MAZE2D_EPISODE_STEPS[maze]
            log(f"generating {name} ({size:,} steps) into {final} (one-time; ~30 s per million steps)")
            episodes, stats = generate_pointmaze(size, maze=maze)
            rand, _ = rollout_returns(random_policy, REF_EPISODES, seed=10_000, maze=maze, steps=limit)
            ctrl, ctrl_success = rollout_returns(controller_policy(0.0), REF_EPISODES, seed=20_000, maze=maze,
                                                 steps=limit)
            ref_min, ref_max = float(rand.mean()), float(ctrl.mean())
            stats.update(
                {"ref_random_return_std": float(rand.std()), "ref_controller_return_std": float(ctrl.std()),
                 "controller_eval_success_rate": float(ctrl_success.mean()), "ref_episodes": REF_EPISODES}
            )
            description = (f"maze2d-{maze}-style data: noisy BFS+PD waypoint controller visiting random goals"
                           " (idql_pl.data.local)")
        else:
            log(f"generating {name} ({size:,} samples) into {final}")
            episodes, stats = generate_bandit(size)
            ref_min, ref_max = 0.0, float(BANDIT_REWARDS.max())
            description = ("one-step 2-D bandit with three action clusters"
                           " (IDQL paper Fig. 1; idql_pl.data.local)")
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
        log(f"{name}: {size:,} steps in {stats['generation_seconds']} s;"
            f" ref min/max {ref_min:.2f}/{ref_max:.2f}")
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
            warnings.warn(f"cached dataset {final} is incomplete or from another recipe version;"
                          " regenerating it", stacklevel=2)
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

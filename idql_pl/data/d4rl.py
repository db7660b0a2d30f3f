"""Original D4RL hdf5 files, read with h5py (no `d4rl` package), and their gymnasium evaluation envs
(defined in :mod:`idql_pl.envs`).

A name from :data:`idql_pl.data.registry.D4RL_DATASETS` is looked up as
``$D4RL_DATASET_DIR/<URL basename>`` (default ``~/.d4rl/datasets``, D4RL's own cache, so existing files are
reused) and downloaded there when absent: streamed to a hidden temp file in the same folder, checked
(length, HDF5 signature) and renamed into place, so an interrupted download leaves nothing behind. A path
to a local ``.hdf5`` file works too (its reference scores/env are known when the file name is a D4RL one).

File layout (docs/fidelity.md §8): flat ``observations [N, obs_dim]``, ``actions [N, act_dim]``,
``rewards [N]``, ``terminals [N]`` and ``timeouts [N]`` (optional for old files); converted with D4RL's
q-learning convention (docs/fidelity.md §5, :func:`idql_pl.data.preprocess.d4rl_transitions`).
"""

from __future__ import annotations

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
from idql_pl.data.preprocess import (
    D4RL_REQUIRED,
    DatasetInfo,
    SourceData,
    d4rl_transitions,
    log,
    validate_arrays,
)
from idql_pl.data.registry import (
    D4RL_DATASETS,
    D4RLSpec,
    get_d4rl_spec,
    infer_family,
)
from idql_pl.envs import make_env
from idql_pl.errors import DatasetError

DOWNLOAD_TIMEOUT_S = 15.0
_KEYS = (*D4RL_REQUIRED, "timeouts")


def dataset_dir() -> Path:
    """``$D4RL_DATASET_DIR`` or ``~/.d4rl/datasets`` (read at call time)."""
    return Path(os.environ.get("D4RL_DATASET_DIR") or Path.home() / ".d4rl" / "datasets").expanduser()


def is_hdf5_path(name: str) -> bool:
    return name.endswith((".hdf5", ".h5")) or os.path.isfile(name)


def download(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S, name: str | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically (temp file + rename); any failure is a one-line
    DatasetError."""
    dest = Path(dest)
    label = name or dest.name
    fix = (
        f"download {url} on a machine with internet access and place it at {dest}, "
        "or set D4RL_DATASET_DIR to the folder that holds it, or pass the local .hdf5 path as the dataset"
    )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create {dest.parent} for D4RL dataset '{label}' ({e});"
                           " set D4RL_DATASET_DIR to a writable folder") from e
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
    try:
        log(f"downloading D4RL dataset '{label}' from {url} to {dest}")
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            shutil.copyfileobj(resp, out, 1 << 20)
        size = tmp.stat().st_size
        if total and size != total:
            raise DatasetError(f"download of '{label}' from {url} was cut short"
                               f" ({size} of {total} bytes); {fix}")
        import h5py

        if not h5py.is_hdf5(tmp):
            raise DatasetError(f"{url} did not return an HDF5 file (got {size} bytes of something"
                               f" else); {fix}")
        os.replace(tmp, dest)
    except DatasetError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DatasetError(f"cannot download D4RL dataset '{label}' from {url}"
                           f" ({' '.join(str(reason).split())}); {fix}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def read_hdf5(path: Path, label: str, fix: str) -> dict[str, np.ndarray]:
    """Read the D4RL keys present; an unreadable/truncated file is a DatasetError naming ``fix``."""
    import h5py

    try:
        with h5py.File(path, "r") as f:  # missing keys are reported by validate_arrays
            data = {k: f[k][()] for k in _KEYS if k in f}
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise DatasetError(f"{label} ({path}) is not a readable HDF5 file"
                           f" ({' '.join(str(e).split())[:160]}); {fix}") from e
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
                f"dataset file {path} does not exist; give the path of a D4RL-layout .hdf5 file or a dataset"
                " name like hopper-medium-v2"
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


def make_d4rl_env(name: str, **make_kwargs: Any) -> gym.Env:
    """The gymnasium evaluation env for a D4RL dataset (see :mod:`idql_pl.data.registry`), float32 obs
    (``make_kwargs``, e.g. ``render_mode``, go to ``gym.make``)."""
    spec = D4RL_DATASETS[name]
    env = make_env(spec.env_id, f"'{name}'", max_episode_steps=spec.max_episode_steps,
                   **{**spec.env_kwargs, **make_kwargs})
    return wrap_eval_env(env, spec.max_episode_steps)

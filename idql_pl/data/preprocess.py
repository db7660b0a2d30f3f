"""Turning raw dataset arrays into training transitions (docs/fidelity.md §5).

* D4RL files (one flat row per step): the q-learning convention drops the row at each timeout (its next
  observation is not in the file) and the last row; ``next_obs[i] = obs[i + 1]`` otherwise. Terminals give
  ``mask = 0``; timeouts are not terminals (:func:`d4rl_transitions`).
* Episode lists (Minari, local recipes) carry ``T + 1`` observations per episode, so every step is kept,
  the truncated last step included (:func:`episodes_to_transitions`).
* Actions are clipped to ``+-action_clip`` (default ``1 - 1e-5``); an action outside ``[-1, 1]`` by more than
  ``ACTION_TOLERANCE`` is an error, not something to clip silently (:func:`clip_actions`).
* Rewards (:class:`RewardTransform`, also applied online): locomotion ``r * 1000 / (max_ret - min_ret)`` over
  the dataset's episodes; antmaze ``r - 1``; nothing for other families.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

from idql_pl.errors import DatasetError


def log(msg: str) -> None:
    """A data-layer progress line on stderr, from the first process only (DDP ranks load the data too)."""
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0":
        print(f"[idql_pl.data] {msg}", file=sys.stderr, flush=True)

ACTION_TOLERANCE = 1e-3
DEFAULT_ACTION_CLIP = 1.0 - 1e-5
RewardKind = Literal["auto", "none", "locomotion", "antmaze"]
D4RL_REQUIRED = ("observations", "actions", "rewards", "terminals")

T = TypeVar("T")


@dataclass
class DatasetInfo:
    """What a loaded dataset is: identity, evaluation settings, size and (raw, untransformed) return stats."""

    name: str
    source: str  # "d4rl" | "minari" | "local"
    family: str  # see registry.FAMILIES
    env_id: str | None
    ref_min_score: float | None
    ref_max_score: float | None
    max_episode_steps: int | None
    num_transitions: int = 0
    num_episodes: int = 0
    return_mean: float = float("nan")
    return_std: float = float("nan")
    return_min: float = float("nan")
    return_max: float = float("nan")
    obs_dim: int = 0
    action_dim: int = 0
    reward_transform: str = "none"
    reward_scale: float = 1.0
    reward_shift: float = 0.0
    path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # where each evaluation setting came from: "given", "D4RL table (...)", "dataset metadata", ...
    provenance: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SourceData:
    """What a source hands to :func:`finalize`: raw transitions (rewards untransformed) plus metadata."""

    info: DatasetInfo
    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminals: np.ndarray
    episode_returns: np.ndarray
    env_factory: Callable[[], Any] | None = None


@dataclass(frozen=True)
class RewardTransform:
    """``r -> r * scale + shift`` (docs/fidelity.md §5); works on floats, numpy arrays and torch tensors."""

    kind: str = "none"
    scale: float = 1.0
    shift: float = 0.0

    def __call__(self, reward: T) -> T:
        if self.scale == 1.0 and self.shift == 0.0:
            return reward
        return reward * self.scale + self.shift  # type: ignore[operator]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale, "shift": self.shift}


def resolve_reward_kind(kind: str, family: str) -> str:
    """``auto`` picks by family: locomotion -> locomotion scaling, antmaze -> ``r - 1``, else none."""
    if kind not in ("auto", "none", "locomotion", "antmaze"):
        raise DatasetError(
            f"unknown reward_transform {kind!r}; use one of auto, none, locomotion, antmaze"
        )
    if kind != "auto":
        return kind
    return family if family in ("locomotion", "antmaze") else "none"


def make_reward_transform(kind: str, family: str,
                          episode_returns: np.ndarray | None = None) -> RewardTransform:
    """Build the transform; locomotion scaling needs the dataset's episode returns (docs/fidelity.md §5)."""
    kind = resolve_reward_kind(kind, family)
    if kind == "antmaze":
        return RewardTransform("antmaze", 1.0, -1.0)
    if kind == "locomotion":
        rets = np.asarray(episode_returns if episode_returns is not None else [], dtype=np.float64)
        spread = float(rets.max() - rets.min()) if rets.size else 0.0
        if not np.isfinite(spread) or spread <= 0.0:
            raise DatasetError(
                f"locomotion reward scaling needs episodes with different returns (found {rets.size} "
                f"episode(s), return spread {spread}); use --data.reward_transform none"
            )
        return RewardTransform("locomotion", 1000.0 / spread, 0.0)
    return RewardTransform("none", 1.0, 0.0)


def validate_arrays(
    arrays: Mapping[str, Any], required: Sequence[str], source: str, ndims: Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Check presence, ndim, equal lengths and finiteness; returns numpy arrays (rewards etc. flattened)."""
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DatasetError(
            f"{source} is missing key(s) {', '.join(missing)} (has: {', '.join(sorted(arrays)) or 'none'}); "
            f"a D4RL-layout dataset needs {', '.join(required)}: re-download or regenerate it"
        )
    ndims = dict(ndims or {"observations": 2, "actions": 2, "rewards": 1, "terminals": 1, "timeouts": 1})
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        arr = np.asarray(value)
        want = ndims.get(key)
        if want == 1 and arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if want is not None and arr.ndim != want:
            raise DatasetError(
                f"{source}: '{key}' has shape {arr.shape} but must be {want}-D "
                f"({'[N, dim]' if want == 2 else '[N]'}); fix or regenerate the file"
            )
        out[key] = arr
    lengths = {k: len(v) for k, v in out.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise DatasetError(f"{source}: arrays have mismatched lengths ({detail}); the file is inconsistent:"
                           " re-download or regenerate it")
    if lengths and next(iter(lengths.values())) == 0:
        raise DatasetError(f"{source} contains no rows; re-download or regenerate it")
    for key, arr in out.items():
        if np.issubdtype(arr.dtype, np.floating):
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise DatasetError(
                    f"{source}: '{key}' contains {bad} NaN/inf value(s); the data is corrupt:"
                    " re-download or regenerate it"
                )
    return out


def clip_actions(actions: np.ndarray, clip: float = DEFAULT_ACTION_CLIP,
                 source: str = "dataset") -> np.ndarray:
    """Clip to ``+-clip`` in place (float32); actions beyond ``1 + ACTION_TOLERANCE`` are an error."""
    if not 0.0 < clip <= 1.0:
        raise DatasetError(f"action_clip must be in (0, 1], got {clip}; the default is 1 - 1e-5")
    amax = float(np.abs(actions).max()) if actions.size else 0.0
    if amax > 1.0 + ACTION_TOLERANCE:
        raise DatasetError(
            f"{source}: actions reach |a| = {amax:.6g}, outside [-1, 1]; IDQL's diffusion policy samples in "
            f"[-1, 1]: rescale the dataset's actions to [-1, 1] (and the env's action space with them)"
        )
    actions = np.asarray(actions, dtype=np.float32)
    np.clip(actions, -clip, clip, out=actions)
    return actions


def d4rl_transitions(
    data: Mapping[str, np.ndarray], max_episode_steps: int | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """D4RL's ``qlearning_dataset`` convention, vectorised (docs/fidelity.md §5).

    Row ``i`` becomes ``(obs[i], act[i], rew[i], obs[i + 1], terminal[i])`` unless it is a timeout or the last
    row. Without a ``timeouts`` key, D4RL's step counter marks every ``max_episode_steps``-th step since the
    last terminal as a timeout. Returns the transitions and the per-episode returns over kept rows (episodes
    end at a terminal or timeout), which the locomotion reward scaling uses.
    """
    obs, rew = data["observations"], data["rewards"]
    terminals = data["terminals"].astype(bool)
    n = len(rew)
    if "timeouts" in data:
        timeouts = data["timeouts"].astype(bool)
    elif max_episode_steps:
        # D4RL's counter: 0 after a timeout, 1 on the row after a terminal (it resets, then counts the
        # terminal row), so the step of row i is (i - last terminal before i) mod T.
        idx = np.arange(n)
        last_term = np.maximum.accumulate(np.where(np.r_[False, terminals[:-1]], idx - 1, 0))
        timeouts = (idx - last_term) % max_episode_steps == max_episode_steps - 1
    else:
        timeouts = np.zeros(n, dtype=bool)
    keep = ~timeouts
    keep[-1] = False
    keep_idx = np.flatnonzero(keep)
    if keep_idx.size == 0:
        raise DatasetError("dataset has no transitions left after dropping timeouts;"
                           " re-download or regenerate it")
    out = {
        "observations": obs[keep_idx],
        "actions": data["actions"][keep_idx],
        "rewards": rew[keep_idx],
        "next_observations": obs[keep_idx + 1],
        "terminals": terminals[keep_idx],
    }
    # episode id per row: a new episode starts after each terminal or timeout
    ends = terminals | timeouts
    episode = np.r_[0, np.cumsum(ends[:-1])]
    counts = np.bincount(episode[keep_idx])
    sums = np.bincount(episode[keep_idx], weights=rew[keep_idx].astype(np.float64))
    return out, sums[counts > 0]


def episodes_to_transitions(
    episodes: Sequence[Mapping[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Concatenate episodes with ``T + 1`` flat observations each into transitions.

    Every step is kept (the next observation after a truncation is recorded). Returns are summed per
    segment ending at a termination, a truncation or the end of a stored episode (so a stored episode that
    packs many one-step episodes, like ``local/bandit``, counts as many episodes).
    """
    if not episodes:
        raise DatasetError("dataset has no episodes; regenerate or re-download it")
    obs = np.concatenate([np.asarray(e["observations"])[:-1] for e in episodes])
    next_obs = np.concatenate([np.asarray(e["observations"])[1:] for e in episodes])
    actions = np.concatenate([np.asarray(e["actions"]) for e in episodes])
    rewards = np.concatenate([np.asarray(e["rewards"]).reshape(-1) for e in episodes])
    terms = np.concatenate([np.asarray(e["terminations"]).reshape(-1) for e in episodes]).astype(bool)
    truncs = np.concatenate([np.asarray(e["truncations"]).reshape(-1) for e in episodes]).astype(bool)
    if not (len(obs) == len(actions) == len(rewards) == len(terms) == len(truncs)):
        raise DatasetError(
            f"episodes have inconsistent lengths (observations-1={len(obs)}, actions={len(actions)}, "
            f"rewards={len(rewards)}, terminations={len(terms)}); the dataset is corrupt: regenerate or"
            " re-download it"
        )
    ends = terms | truncs
    ends[np.cumsum([len(e["rewards"]) for e in episodes]) - 1] = True
    episode = np.r_[0, np.cumsum(ends[:-1])]
    returns = np.bincount(episode, weights=rewards.astype(np.float64))
    out = {"observations": obs, "actions": actions, "rewards": rewards, "next_observations": next_obs,
           "terminals": terms}
    return out, returns


def finalize(
    src: SourceData, reward_transform: str = "auto", action_clip: float = DEFAULT_ACTION_CLIP
) -> tuple[dict[str, np.ndarray], RewardTransform]:
    """Validate, clip actions, transform rewards, build masks; fills ``src.info``'s size/return/transform
    fields.

    Returns float32 arrays keyed like :data:`idql_pl.data.buffer.FIELDS` (masks = 1 - terminal).
    """
    info = src.info
    label = f"dataset '{info.name}'"
    arrays = validate_arrays(
        {
            "observations": src.observations,
            "actions": src.actions,
            "rewards": src.rewards,
            "next_observations": src.next_observations,
            "terminals": src.terminals,
        },
        ("observations", "actions", "rewards", "next_observations", "terminals"),
        label,
        {"observations": 2, "actions": 2, "rewards": 1, "next_observations": 2, "terminals": 1},
    )
    actions = clip_actions(arrays["actions"], action_clip, label)
    transform = make_reward_transform(reward_transform, info.family, src.episode_returns)
    rewards = transform(arrays["rewards"].astype(np.float32))
    out = {
        "observations": arrays["observations"].astype(np.float32, copy=False),
        "actions": actions,
        "rewards": np.asarray(rewards, dtype=np.float32),
        "next_observations": arrays["next_observations"].astype(np.float32, copy=False),
        "masks": 1.0 - arrays["terminals"].astype(np.float32),
    }
    rets = np.asarray(src.episode_returns, dtype=np.float64)
    info.num_transitions = len(out["rewards"])
    info.num_episodes = int(rets.size)
    if rets.size:
        info.return_mean, info.return_std = float(rets.mean()), float(rets.std())
        info.return_min, info.return_max = float(rets.min()), float(rets.max())
    info.obs_dim = int(out["observations"].shape[1])
    info.action_dim = int(out["actions"].shape[1])
    info.reward_transform, info.reward_scale, info.reward_shift = (transform.kind, transform.scale,
                                                                   transform.shift)
    return out, transform

"""`OfflineDataModule`: one ``--data.dataset NAME`` for D4RL files, Minari ids and local recipes.

The dataset is loaded in ``__init__`` (CPU numpy, local recipes generated on first use) so ``obs_dim``,
``action_dim`` and ``info`` exist right after construction for LightningCLI's
``link_arguments(..., apply_on="instantiate")``. ``setup`` packs it once into :class:`TransitionBuffer` s on
the trainer's root device and drops the numpy copy (one copy of the data is kept).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import gymnasium as gym
import lightning as L
import numpy as np
import torch

from idql_pl.data.buffer import BufferStream, TransitionBuffer
from idql_pl.data.preprocess import DEFAULT_ACTION_CLIP, DatasetInfo, RewardTransform, finalize
from idql_pl.data.registry import D4RL_DATASETS, LOCAL_RECIPES, suggest
from idql_pl.envs import env_error
from idql_pl.errors import DatasetError, EvalEnvError
from idql_pl.rng import distributed_world, gather_from_ranks, own_rank_entry

T = TypeVar("T")


@dataclass
class OfflineDataset:
    """A loaded, preprocessed dataset: float32 arrays keyed like ``buffer.FIELDS``, info, reward map, env factory."""

    arrays: dict[str, np.ndarray]
    info: DatasetInfo
    reward_fn: RewardTransform
    env_factory: Callable[[], gym.Env] | None


def load_dataset(
    name: str,
    *,
    reward_transform: str = "auto",
    action_clip: float = DEFAULT_ACTION_CLIP,
    dataset_size: int | None = None,
) -> OfflineDataset:
    """Resolve ``name`` and load it (IDQL_SPEC Sec. 5, 8).

    ``local/...`` -> local recipe (``dataset_size`` applies); a D4RL name (``hopper-medium-v2``) or a path to an
    ``.hdf5`` file -> D4RL reader; anything else containing ``/`` -> Minari id.
    """
    from idql_pl.data import d4rl, local, minari_source

    name = str(name).strip()
    if dataset_size is not None and not name.startswith("local/"):
        raise DatasetError(f"dataset_size only applies to local recipes ({', '.join(LOCAL_RECIPES)}), not '{name}'; drop it")
    if name.startswith("local/"):
        if name not in local.RECIPES:
            raise DatasetError(f"unknown local recipe '{name}'; available: {', '.join(local.RECIPES)}")
        src = local.load_local(name, dataset_size)
    elif name in D4RL_DATASETS or d4rl.is_hdf5_path(name):
        src = d4rl.load_d4rl(name)
    elif minari_source.is_minari_id(name):
        src = minari_source.load_minari(name)
    else:
        raise DatasetError(
            f"unknown dataset '{name}'.{suggest(name)} Use a D4RL name (e.g. hopper-medium-v2, antmaze-umaze-v2, "
            "maze2d-umaze-v1), a path to a D4RL .hdf5 file, a Minari id (e.g. D4RL/antmaze/umaze-v1) or "
            f"a local recipe ({', '.join(LOCAL_RECIPES)})"
        )
    arrays, reward_fn = finalize(src, reward_transform, action_clip)
    return OfflineDataset(arrays, src.info, reward_fn, src.env_factory)


class _Once:
    """An iterable yielding one item once (one validation 'batch' per validation run)."""

    def __init__(self, item: Any):
        self.item = item

    def __iter__(self) -> Iterator[Any]:
        yield self.item

    def __len__(self) -> int:
        return 1


class OfflineDataModule(L.LightningDataModule):
    """Offline transitions for IDQL; batches are drawn by the model from the yielded :class:`TransitionBuffer`.

    Args:
        dataset: D4RL name, ``.hdf5`` path, Minari id or ``local/pointmaze-umaze`` / ``local/bandit``.
        reward_transform: ``auto`` (by family: locomotion scaling, antmaze ``r - 1``, else none), or forced.
        action_clip: actions are clipped to ``+-action_clip`` (IDQL_SPEC Sec. 5).
        val_fraction: fraction of transitions held out (random split by ``seed``); 0 trains on everything.
        dataset_size: size of a local recipe (default: the recipe's own default).
        seed: sampling seed; ``None`` uses ``torch.initial_seed()`` (set by ``seed_everything``). The global
            rank is added for the train buffer's generator.
    """

    def __init__(
        self,
        dataset: str = "local/pointmaze-umaze",
        reward_transform: Literal["auto", "none", "locomotion", "antmaze"] = "auto",
        action_clip: float = DEFAULT_ACTION_CLIP,
        val_fraction: float = 0.0,
        dataset_size: int | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.reward_transform = reward_transform
        self.action_clip = action_clip
        self.val_fraction = val_fraction
        self.dataset_size = dataset_size
        self.seed = seed
        loaded = load_dataset(dataset, reward_transform=reward_transform, action_clip=action_clip, dataset_size=dataset_size)
        self._arrays: dict[str, np.ndarray] | None = loaded.arrays
        self.info: DatasetInfo = loaded.info
        self.reward_fn: RewardTransform = loaded.reward_fn
        self._env_factory = loaded.env_factory
        self.obs_dim: int = self.info.obs_dim
        self.action_dim: int = self.info.action_dim
        self.train_buffer: TransitionBuffer | None = None
        self.val_buffer: TransitionBuffer | None = None
        self._pending_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ buffers
    def _base_seed(self) -> int:
        return int(self.seed) if self.seed is not None else int(torch.initial_seed())

    def setup(self, stage: str | None = None) -> None:
        """Build the buffers once, on the trainer's root device (CPU when not attached)."""
        if self.train_buffer is not None:
            return
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        rank = int(trainer.global_rank) if trainer is not None else 0
        base = self._base_seed()
        arrays = self._arrays
        assert arrays is not None
        self._arrays = None  # the buffers hold the only copy from here on
        n = len(arrays["rewards"])
        if self.val_fraction > 0:
            perm = np.random.default_rng(base).permutation(n)  # same split on every rank
            n_val = max(1, int(round(self.val_fraction * n)))
            val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
            self.val_buffer = TransitionBuffer({k: v[val_idx] for k, v in arrays.items()}, seed=(base + 1) % 2**63, device=device)
            arrays = {k: v[train_idx] for k, v in arrays.items()}
        self.train_buffer = TransitionBuffer(arrays, seed=(base + rank) % 2**63, device=device)
        del arrays
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def train_dataloader(self) -> BufferStream:
        self._require_setup()
        return BufferStream(self.train_buffer)

    def val_dataloader(self) -> _Once:
        """One item per validation run: the validation buffer (or the train buffer when there is none)."""
        self._require_setup()
        return _Once(self.val_buffer or self.train_buffer)

    def _require_setup(self) -> None:
        if self.train_buffer is None:
            self.setup("fit")

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The sampling generators' states (tensors) so a resumed run draws the same batches."""
        if self.train_buffer is None:
            return self._pending_state or {}
        state: dict[str, Any] = {"train_generator": self.train_buffer.generator.get_state(), "train_seed": int(self.train_buffer.seed)}
        if self.val_buffer is not None:
            state["val_generator"] = self.val_buffer.generator.get_state()
        per_rank = gather_from_ranks(state["train_generator"])  # DDP: each rank samples its own batches
        if len(per_rank) > 1:
            state["train_generator_per_rank"] = per_rank
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.train_buffer is None:  # restored before setup: apply once the buffers exist
            self._pending_state = dict(state_dict)
            return
        own = own_rank_entry(state_dict.get("train_generator_per_rank"))
        state_dict = dict(state_dict)
        if own is not None:
            state_dict["train_generator"] = own
        elif distributed_world()[0] > 0:  # saved by a run of another world size: keep this rank's seeded stream
            state_dict.pop("train_generator", None)
        for key, buf in (("train_generator", self.train_buffer), ("val_generator", self.val_buffer)):
            if buf is None or key not in state_dict:
                continue
            try:
                buf.generator.set_state(state_dict[key])
            except (RuntimeError, TypeError) as e:  # e.g. a CPU checkpoint resumed on CUDA
                warnings.warn(f"could not restore the {key} state ({e}); sampling continues from the seed", stacklevel=2)

    # ------------------------------------------------------------------ scores and envs
    def summary(self) -> str:
        """A multi-line human summary of the dataset."""
        i = self.info
        ref = (
            f"{i.ref_min_score:.4g} / {i.ref_max_score:.4g}"
            if i.ref_min_score is not None and i.ref_max_score is not None
            else "none (normalized scores unavailable)"
        )
        lines = [
            f"dataset          {i.name}  [{i.source}, family {i.family}]",
            f"location         {i.path}",
            f"transitions      {i.num_transitions:,}  (obs_dim {i.obs_dim}, action_dim {i.action_dim})",
            f"episodes         {i.num_episodes:,}  (limit {i.max_episode_steps} steps)",
            f"episode return   mean {i.return_mean:.4g}  std {i.return_std:.4g}  min {i.return_min:.4g}  max {i.return_max:.4g}  (raw rewards)",
            f"normalized       mean {self._maybe_norm(i.return_mean)}  (100 * (R - min) / (max - min))",
            f"reference min/max {ref}",
            f"reward transform {i.reward_transform}: r * {i.reward_scale:.6g} + {i.reward_shift:.6g}",
            f"eval env         {i.env_id}",
        ]
        recipe = i.extra.get("recipe")
        if recipe:
            keys = ("goal_success_rate", "controller_eval_success_rate", "generation_seconds", "cluster_counts")
            extra = ", ".join(f"{k} {recipe[k]:.4g}" if isinstance(recipe[k], float) else f"{k} {recipe[k]}" for k in keys if k in recipe)
            lines.append(f"generation       {extra}")
        return "\n".join(lines)

    def _maybe_norm(self, value: float) -> str:
        try:
            return f"{self.normalized_score(value):.4g}"
        except DatasetError:
            return "n/a"

    def normalized_score(self, returns: T) -> T:
        """``100 * (R - ref_min) / (ref_max - ref_min)`` for a float, list, numpy array or tensor (IDQL_SPEC Sec. 6)."""
        lo, hi = self.info.ref_min_score, self.info.ref_max_score
        if lo is None or hi is None or hi == lo:
            raise DatasetError(
                f"dataset '{self.info.name}' has no reference scores, so normalized scores are undefined; "
                "report eval/return instead, or use a dataset with ref_min_score/ref_max_score"
            )
        if isinstance(returns, (list, tuple)):
            return type(returns)(100.0 * (float(r) - lo) / (hi - lo) for r in returns)  # type: ignore[return-value]
        return 100.0 * (returns - lo) / (hi - lo)  # type: ignore[operator,return-value]

    def make_env(self) -> gym.Env:
        """One evaluation env: observations flattened/cast exactly like the dataset, TimeLimit = episode limit."""
        if self._env_factory is None:
            raise EvalEnvError(
                f"no evaluation environment is known for dataset '{self.info.name}'; use a D4RL name "
                "(e.g. hopper-medium-v2) instead of a renamed file, or a Minari dataset that records its env"
            )
        try:
            return self._env_factory()
        except EvalEnvError:
            raise
        except Exception as e:
            raise env_error(f"evaluation env {self.info.env_id} for '{self.info.name}'", e) from e

    def make_vector_env(self, num_envs: int, **kwargs: Any) -> gym.vector.VectorEnv:
        """``SyncVectorEnv`` of :meth:`make_env` (``kwargs`` go to ``SyncVectorEnv``, e.g. ``autoreset_mode``)."""
        if num_envs < 1:
            raise EvalEnvError(f"num_envs must be >= 1, got {num_envs}")
        self.make_env().close()  # fail early, with the one-line message
        try:
            return gym.vector.SyncVectorEnv([self._env_factory] * num_envs, **kwargs)  # type: ignore[list-item]
        except Exception as e:
            raise env_error(f"{num_envs} vectorised {self.info.env_id} envs for '{self.info.name}'", e) from e

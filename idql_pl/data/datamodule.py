"""`OfflineDataModule`: one ``--data.dataset NAME`` for D4RL files, Minari ids and local recipes.

The dataset is loaded in ``__init__`` (CPU numpy, local recipes generated on first use) so ``obs_dim``,
``action_dim`` and ``info`` exist right after construction for LightningCLI's
``link_arguments(..., apply_on="instantiate")``. ``setup`` packs it once into :class:`TransitionBuffer` s on
the trainer's root device and drops the numpy copy (one copy of the data is kept).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import gymnasium as gym
import lightning as L
import numpy as np
import torch

from idql_pl.data.buffer import BufferStream, TransitionBuffer
from idql_pl.data.preprocess import (
    DEFAULT_ACTION_CLIP,
    DatasetInfo,
    RewardTransform,
    SourceData,
    finalize,
    log,
)
from idql_pl.data.registry import D4RL_DATASETS, FAMILIES, LOCAL_RECIPES, check_env_id, get_d4rl_spec, suggest
from idql_pl.envs import env_error
from idql_pl.errors import DatasetError, EvalEnvError
from idql_pl.training.rng import RANK_SEED_STRIDE, distributed_world, gather_from_ranks, own_rank_entry

T = TypeVar("T")


@dataclass
class OfflineDataset:
    """A loaded, preprocessed dataset: float32 arrays keyed like ``buffer.FIELDS``, info, reward map, env
    factory."""

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
    eval_env: str | None = None,
    eval_env_kwargs: dict[str, Any] | None = None,
    ref_scores: Sequence[float] | None = None,
    family: str | None = None,
    max_episode_steps: int | None = None,
) -> OfflineDataset:
    """Resolve ``name`` and load it (docs/fidelity.md §5, 8).

    ``local/...`` -> local recipe (``dataset_size`` applies); a D4RL name (``hopper-medium-v2``) or a path to
    an ``.hdf5`` file -> D4RL reader; anything else containing ``/`` -> Minari id.

    ``eval_env`` (a gymnasium id, or a D4RL name meaning that dataset's evaluation env), ``ref_scores``
    (``[min, max]`` returns), ``family`` and ``max_episode_steps`` override what the source knows (D4RL's
    table for canonical names and file names, a Minari dataset's metadata); ``info.provenance`` records where
    each setting came from.
    """
    from idql_pl.data import d4rl, local, minari_source

    name = str(name).strip()
    given = _check_overrides(eval_env, eval_env_kwargs, ref_scores, family, max_episode_steps)
    if name.startswith("local/"):
        if name not in local.RECIPES:
            raise DatasetError(f"unknown local recipe '{name}'; available: {', '.join(local.RECIPES)}")
        kind = "local"
    elif name in D4RL_DATASETS or d4rl.is_hdf5_path(name):
        kind = "d4rl"
    elif minari_source.is_minari_id(name):
        kind = "minari"
    else:
        raise DatasetError(
            f"unknown dataset '{name}'.{suggest(name)} Use a D4RL name (e.g. hopper-medium-v2,"
            " antmaze-umaze-v2, maze2d-umaze-v1), a path to a D4RL .hdf5 file, a Minari id"
            f" (e.g. D4RL/antmaze/umaze-v1) or a local recipe ({', '.join(LOCAL_RECIPES)})"
        )
    if dataset_size is not None and kind != "local":  # e.g. the quickstart config with another --data.dataset
        log(f"dataset_size {dataset_size} applies to local recipes only: ignored for '{name}'")
    if kind == "local":
        src = local.load_local(name, dataset_size)
    elif kind == "d4rl":
        src = d4rl.load_d4rl(name, max_episode_steps=max_episode_steps)
    else:
        src = minari_source.load_minari(name)
    _apply_overrides(src, name, given)
    arrays, reward_fn = finalize(src, reward_transform, action_clip)
    return OfflineDataset(arrays, src.info, reward_fn, src.env_factory)


# ------------------------------------------------------------------------------ user-given eval settings
PROVENANCE_KEYS = ("eval env", "reference scores", "family", "episode limit")


def _check_overrides(
    eval_env: str | None,
    eval_env_kwargs: dict[str, Any] | None,
    ref_scores: Sequence[float] | None,
    family: str | None,
    max_episode_steps: int | None,
) -> dict[str, Any]:
    """Validate the user-given settings up front (one-line errors); returns the given ones."""
    given: dict[str, Any] = {}
    if eval_env is not None:
        eval_env = str(eval_env).strip()
        if not eval_env:
            raise DatasetError("eval_env is empty; give a gymnasium env id (e.g. Hopper-v4) or drop it")
        check_env_id(eval_env)
        given["eval_env"] = eval_env
    if eval_env_kwargs:
        if eval_env is None:
            raise DatasetError("eval_env_kwargs needs eval_env (the env they are passed to);"
                               " add --data.eval_env")
        given["eval_env_kwargs"] = dict(eval_env_kwargs)
    if ref_scores is not None:
        try:
            lo, hi = (float(v) for v in ref_scores)
        except (TypeError, ValueError):
            raise DatasetError(
                "ref_scores must be two numbers [min, max] (the returns that score 0 and 100),"
                f" got {list(ref_scores)!r}"
            ) from None
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo >= hi:
            raise DatasetError(
                "ref_scores must be [min, max] with finite min < max (the returns that score 0 and 100),"
                f" got [{lo}, {hi}]"
            )
        given["ref_scores"] = (lo, hi)
    if family is not None:
        if family not in FAMILIES:
            raise DatasetError(f"unknown family '{family}'; use one of {', '.join(FAMILIES)}")
        given["family"] = family
    if max_episode_steps is not None:
        if isinstance(max_episode_steps, bool) or int(max_episode_steps) != max_episode_steps \
                or max_episode_steps < 1:
            raise DatasetError(f"max_episode_steps must be a positive integer, got {max_episode_steps!r}")
        given["max_episode_steps"] = int(max_episode_steps)
    return given


def _default_provenance(src: SourceData, name: str) -> dict[str, str]:
    """Where the source's own settings came from (before any user-given value replaces them)."""
    info = src.info
    if info.source == "d4rl":
        spec = get_d4rl_spec(name)
        if spec is not None:
            how = ("D4RL table" if name in D4RL_DATASETS
                   else f"D4RL table (inferred from the file name {Path(name).name})")
            return dict.fromkeys(PROVENANCE_KEYS, how)
        return {"eval env": "none", "reference scores": "none", "family": "inferred from the file name",
                "episode limit": "none"}
    meta = "recipe metadata" if info.source == "local" else "dataset metadata"
    return {
        "eval env": f"{meta} (recorded env spec)" if src.env_factory is not None else "none",
        "reference scores": (meta if info.ref_min_score is not None and info.ref_max_score is not None
                             else "none"),
        "family": "recipe" if info.source == "local" else "inferred from the id",
        "episode limit": f"{meta} (recorded env spec)" if info.max_episode_steps is not None else "none",
    }


def _apply_overrides(src: SourceData, name: str, given: dict[str, Any]) -> None:
    """Put the user-given settings into ``src`` (family before the reward transform is chosen)."""
    info = src.info
    prov = _default_provenance(src, name)
    env_spec = None  # a D4RL entry named by eval_env: its env, and defaults for what is still unknown
    if "eval_env" in given and given["eval_env"] in D4RL_DATASETS:
        env_spec = D4RL_DATASETS[given["eval_env"]]
        via = f"D4RL table via eval_env {env_spec.name}"
        if info.ref_min_score is None or info.ref_max_score is None:
            info.ref_min_score, info.ref_max_score = env_spec.ref_min_score, env_spec.ref_max_score
            prov["reference scores"] = via
        if info.max_episode_steps is None:
            info.max_episode_steps = env_spec.max_episode_steps
            prov["episode limit"] = via
        if info.family == "other":
            info.family = env_spec.family
            prov["family"] = via
    if "family" in given:
        info.family, prov["family"] = given["family"], "given"
    if "ref_scores" in given:
        (info.ref_min_score, info.ref_max_score), prov["reference scores"] = given["ref_scores"], "given"
    limit_given = "max_episode_steps" in given
    if limit_given:
        info.max_episode_steps, prov["episode limit"] = given["max_episode_steps"], "given"
    if "eval_env" in given:
        env_id = env_spec.env_id if env_spec is not None else given["eval_env"]
        kwargs = {**(env_spec.env_kwargs if env_spec is not None else {}), **given.get("eval_env_kwargs", {})}
        if info.max_episode_steps is None:
            registered = getattr(gym.registry.get(env_id), "max_episode_steps", None)
            if registered:
                info.max_episode_steps = int(registered)
                prov["episode limit"] = f"gymnasium registry ({env_id})"
        info.env_id, prov["eval env"] = env_id, "given"
        info.extra["eval_env_kwargs"] = kwargs
        src.env_factory = functools.partial(make_given_env, env_id, kwargs, info.max_episode_steps)
    elif limit_given and src.env_factory is not None:
        # the known env with the given episode limit
        spec = get_d4rl_spec(name) if info.source == "d4rl" else None
        if spec is not None:
            src.env_factory = functools.partial(make_given_env, spec.env_id, spec.env_kwargs,
                                                info.max_episode_steps)
        elif info.path:
            from idql_pl.data.minari_source import make_minari_env

            src.env_factory = functools.partial(make_minari_env, info.path, info.max_episode_steps, True)
    info.provenance = prov


def make_given_env(env_id: str, kwargs: dict[str, Any], max_episode_steps: int | None,
                   **make_kwargs: Any) -> gym.Env:
    """``gym.make(env_id, max_episode_steps, **kwargs)``, observations flattened to float32 like the dataset
    (``make_kwargs``, e.g. ``render_mode``, added to ``kwargs``)."""
    from idql_pl.data.minari_source import wrap_eval_env

    extra = {"max_episode_steps": max_episode_steps} if max_episode_steps else {}
    try:
        env = gym.make(env_id, **extra, **{**kwargs, **make_kwargs})
    except Exception as e:
        raise EvalEnvError(
            f"cannot create evaluation env {env_id} with {kwargs or 'no kwargs'} ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:160]}); check --data.eval_env / --data.eval_env_kwargs, and install"
            " the simulators: pip install 'gymnasium[mujoco]' gymnasium-robotics"
        ) from e
    return wrap_eval_env(env, max_episode_steps)


class _Once:
    """An iterable yielding one item once (one validation 'batch' per validation run)."""

    def __init__(self, item: Any):
        self.item = item

    def __iter__(self) -> Iterator[Any]:
        yield self.item

    def __len__(self) -> int:
        return 1


class OfflineDataModule(L.LightningDataModule):
    """Offline transitions for IDQL; batches are drawn by the model from the yielded
    :class:`TransitionBuffer`.

    Args:
        dataset: D4RL name, ``.hdf5`` path, Minari id or ``local/pointmaze-umaze`` / ``local/bandit``.
        reward_transform: ``auto`` (by family: locomotion scaling, antmaze ``r - 1``, else none), or forced.
        action_clip: actions are clipped to ``+-action_clip`` (docs/fidelity.md §5).
        val_fraction: fraction of transitions held out (random split by ``seed``); 0 trains on everything.
        dataset_size: size of a local recipe (default: the recipe's own default).
        seed: sampling seed; ``None`` uses ``torch.initial_seed()`` (set by ``seed_everything``). Rank ``r``
            of a DDP run samples from ``seed + r * 1_000_003``, and agent ``k`` of a rank from that + ``k``.
        eval_env: evaluation env: a gymnasium id (``Hopper-v4``) or a D4RL dataset name whose evaluation env
            (and, where the dataset lacks them, reference scores, episode limit and family) to use. Default:
            inferred from D4RL's canonical names and file names, or a Minari dataset's recorded env.
        eval_env_kwargs: keyword arguments for ``gym.make(eval_env, ...)`` (e.g. ``{maze: umaze}``).
        ref_scores: ``[min, max]``: the returns that score 0 and 100 (the D4RL normalized score).
        family: ``locomotion | antmaze | maze2d | bandit | other``: chooses the ``auto`` reward transform
            and the report's domain.
        max_episode_steps: the evaluation episode limit (and D4RL's timeout counter for files without a
            ``timeouts`` key).
    """

    def __init__(
        self,
        dataset: str = "local/pointmaze-umaze",
        reward_transform: Literal["auto", "none", "locomotion", "antmaze"] = "auto",
        action_clip: float = DEFAULT_ACTION_CLIP,
        val_fraction: float = 0.0,
        dataset_size: int | None = None,
        seed: int | None = None,
        eval_env: str | None = None,
        eval_env_kwargs: dict[str, Any] | None = None,
        ref_scores: list[float] | None = None,
        family: Literal["locomotion", "antmaze", "maze2d", "bandit", "other"] | None = None,
        max_episode_steps: int | None = None,
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
        loaded = load_dataset(
            dataset, reward_transform=reward_transform, action_clip=action_clip, dataset_size=dataset_size,
            eval_env=eval_env, eval_env_kwargs=eval_env_kwargs, ref_scores=ref_scores, family=family,
            max_episode_steps=max_episode_steps,
        )
        self._check_env_dims = eval_env is not None
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
            self.val_buffer = TransitionBuffer({k: v[val_idx] for k, v in arrays.items()},
                                               seed=(base + 1) % 2**63, device=device)
            arrays = {k: v[train_idx] for k, v in arrays.items()}
        # ranks (and, within a rank, agents: seed + k) draw uncorrelated streams
        self.train_buffer = TransitionBuffer(arrays, seed=(base + rank * RANK_SEED_STRIDE) % 2**63,
                                             device=device)
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
        """The sampling generators' states (tensors), every agent's (``num_agents`` K > 1) and, under DDP,
        every rank's, so a resumed run draws the same batches as the uninterrupted one."""
        if self.train_buffer is None:
            return self._pending_state or {}
        state: dict[str, Any] = {"train_buffer": self.train_buffer.state_dict(),
                                 "train_seed": int(self.train_buffer.seed)}
        if self.val_buffer is not None:
            state["val_generator"] = self.val_buffer.generator.get_state()
        per_rank = gather_from_ranks(state["train_buffer"])  # DDP: each rank samples its own batches
        if len(per_rank) > 1:
            state["train_buffer_per_rank"] = per_rank
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.train_buffer is None:  # restored before setup: apply once the buffers exist
            self._pending_state = dict(state_dict)
            return
        train = own_rank_entry(state_dict.get("train_buffer_per_rank"))
        # rank 0, or one process: the saved (rank 0) streams
        if train is None and distributed_world()[0] == 0:
            train = state_dict.get("train_buffer")
        # else: saved by a run of another world size; this rank keeps its own seeded streams
        restores = [(train, self.train_buffer.load_state_dict)]
        if self.val_buffer is not None and "val_generator" in state_dict:
            restores.append((state_dict["val_generator"], self.val_buffer.generator.set_state))
        for saved, restore in restores:
            if saved is None:
                continue
            try:
                restore(saved)
            except (RuntimeError, TypeError) as e:  # e.g. a CPU checkpoint resumed on CUDA
                warnings.warn(f"could not restore a sampling generator ({e});"
                              " sampling continues from the seed", stacklevel=2)

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
            f"episodes         {i.num_episodes:,}",
            f"episode return   mean {i.return_mean:.4g}  std {i.return_std:.4g}  min {i.return_min:.4g}  max"
            f" {i.return_max:.4g}  (raw rewards)",
            f"normalized       mean {self._maybe_norm(i.return_mean)}  (100 * (R - min) / (max - min))",
            f"reference min/max {ref}{self._from('reference scores')}",
            f"reward transform {i.reward_transform}: r * {i.reward_scale:.6g} + {i.reward_shift:.6g}",
            f"eval env         {i.env_id}{self._from('eval env')}",
            f"family           {i.family}{self._from('family')}",
            f"episode limit    {i.max_episode_steps}{self._from('episode limit')}",
        ]
        recipe = i.extra.get("recipe")
        if recipe:
            keys = ("goal_success_rate", "controller_eval_success_rate", "generation_seconds",
                    "cluster_counts")
            extra = ", ".join(f"{k} {recipe[k]:.4g}" if isinstance(recipe[k], float) else f"{k} {recipe[k]}"
                              for k in keys if k in recipe)
            lines.append(f"generation       {extra}")
        return "\n".join(lines)

    def _from(self, key: str) -> str:
        where = self.info.provenance.get(key)
        return f"  ({where})" if where and where != "none" else ""

    def _maybe_norm(self, value: float) -> str:
        try:
            return f"{self.normalized_score(value):.4g}"
        except DatasetError:
            return "n/a"

    def normalized_score(self, returns: T) -> T:
        """``100 * (R - ref_min) / (ref_max - ref_min)`` for a float, list, numpy array or tensor
        (docs/fidelity.md §6)."""
        lo, hi = self.info.ref_min_score, self.info.ref_max_score
        if lo is None or hi is None or hi == lo:
            raise DatasetError(
                f"dataset '{self.info.name}' has no reference scores, so normalized scores are undefined; "
                "give them with --data.ref_scores \"[min, max]\" (or report eval/return instead)"
            )
        if isinstance(returns, (list, tuple)):
            return type(returns)(100.0 * (float(r) - lo) / (hi - lo) for r in returns)  # type: ignore[return-value]
        return 100.0 * (returns - lo) / (hi - lo)  # type: ignore[operator,return-value]

    def make_env(self, **make_kwargs: Any) -> gym.Env:
        """One evaluation env: observations flattened/cast exactly like the dataset, TimeLimit = episode
        limit; ``make_kwargs`` (e.g. ``render_mode="rgb_array"``) go to ``gym.make``."""
        if self._env_factory is None:
            raise EvalEnvError(
                f"no evaluation environment is known for dataset '{self.info.name}'; give one with "
                "--data.eval_env (e.g. Hopper-v4, or a D4RL name like hopper-medium-v2 for its env), or set "
                "--eval.every_n_steps 0 --eval.at_end false to train without evaluation"
            )
        try:
            env = self._env_factory(**make_kwargs)
        except EvalEnvError:
            raise
        except Exception as e:
            raise env_error(f"evaluation env {self.info.env_id} for '{self.info.name}'", e) from e
        if getattr(self, "_check_env_dims", False):
            self._check_dims(env)
        return env

    def _check_dims(self, env: gym.Env) -> None:
        """A user-given env must match the dataset's observation and action sizes."""
        obs_dim = int(np.prod(env.observation_space.shape or (0,)))
        act_dim = int(np.prod(getattr(env.action_space, "shape", None) or (0,)))
        if (obs_dim, act_dim) != (self.obs_dim, self.action_dim):
            env.close()
            raise EvalEnvError(
                f"eval_env {self.info.env_id} has obs_dim {obs_dim}, action_dim {act_dim} but dataset "
                f"'{self.info.name}' has obs_dim {self.obs_dim}, action_dim {self.action_dim}; give the env"
                " the data was collected in"
            )

    def make_vector_env(self, num_envs: int, render_envs: int = 0, **kwargs: Any) -> gym.vector.VectorEnv:
        """``SyncVectorEnv`` of :meth:`make_env` (``kwargs`` go to ``SyncVectorEnv``, e.g.
        ``autoreset_mode``); the first ``render_envs`` envs render frames (``render_mode="rgb_array"``), the
        others never do."""
        if num_envs < 1:
            raise EvalEnvError(f"num_envs must be >= 1, got {num_envs}")
        self.make_env().close()  # fail early, with the one-line message
        render = min(render_envs, num_envs)
        rendering = functools.partial(self._env_factory, render_mode="rgb_array")  # type: ignore[arg-type]
        factories = [rendering] * render + [self._env_factory] * (num_envs - render)
        try:
            return gym.vector.SyncVectorEnv(factories, **kwargs)  # type: ignore[arg-type]
        except Exception as e:
            raise env_error(f"{num_envs} vectorised {self.info.env_id} envs for '{self.info.name}'", e) from e

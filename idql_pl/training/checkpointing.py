"""Checkpoint files: atomic writes, loads that execute nothing (``weights_only=True``), clear errors."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
import threading
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from idql_pl.errors import CheckpointError


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain containers only; anything else is refused."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(directory_message(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist:"
                              " check the path (runs keep theirs in checkpoints/<run>/)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0][:160]
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain types and was refused, since"
            f" loading it could execute code ({first}); only load checkpoints written by idql_pl"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({first}):"
            " resume from an earlier checkpoint or retrain"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict):"
                              " pass a .ckpt written by idql_pl")
    return checkpoint


def directory_message(path: Path) -> str:
    """The error for a ``--ckpt_path`` that names a folder: say so, and list the checkpoints in it."""
    found = sorted(p.name for p in path.glob("*.ckpt") if p.is_file())
    if found:
        best = "last.ckpt" if "last.ckpt" in found else found[-1]
        shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
        return (f"--ckpt_path {path} is a directory, not a checkpoint file; it holds {shown}: pass one of"
                f" them, e.g. --ckpt_path {path / best}")
    runs = sorted(str(p.relative_to(path)) for p in path.glob("*/last.ckpt") if p.is_file())
    if runs:
        shown = ", ".join(runs[:8]) + (f" and {len(runs) - 8} more" if len(runs) > 8 else "")
        return (f"--ckpt_path {path} is a directory, not a checkpoint file; its run folders hold {shown}:"
                f" pass one of them, e.g. --ckpt_path {path / runs[0]}")
    return (f"--ckpt_path {path} is a directory, not a checkpoint file, and it holds no .ckpt files: pass a"
            " checkpoint file (runs keep theirs in checkpoints/<run>/last.ckpt)")


_writes = 0
_writes_lock = threading.Lock()


def write_in_progress() -> bool:
    """Whether a checkpoint file is being written by this process right now (the stop handler waits for
    it)."""
    return _writes > 0


@contextlib.contextmanager
def _writing():
    global _writes
    with _writes_lock:
        _writes += 1
    try:
        yield
    finally:
        with _writes_lock:
            _writes -= 1


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


SIDECARS_KEY = "idql_sidecars"


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, rename; a full disk is one clear error."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _writing():
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save may wrap the OSError of a failed write
        if _no_space(err):
            tmp.unlink(missing_ok=True)
            raise CheckpointError(no_space_message(path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _sidecar_files(path: Path, name: str) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.{name}.*.pt"))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temp file in the same folder, fsync, then rename: a crash mid-save keeps the old file.
    A full disk (or quota) is one clear error; the temp file is removed and the old checkpoint stays whole.

    Large per-run state a module puts under ``checkpoint["idql_sidecars"][name]`` (the online replay buffer)
    is written beside the checkpoint as ``<ckpt>.<name>.<global_step>.pt`` *before* the checkpoint, which then
    names that file; older sidecars of the same checkpoint are removed only after the checkpoint is in place.
    A crash at any point leaves a checkpoint whose sidecar exists. Loading puts the payload back in place.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sidecars = checkpoint.pop(SIDECARS_KEY, None) or {}
        files = {}
        for name, payload in sidecars.items():
            file = path.with_name(f"{path.name}.{name}.{int(checkpoint.get('global_step', 0))}.pt")
            _atomic_save(payload, file)
            files[name] = file.name
        if files:
            checkpoint[SIDECARS_KEY] = {"files": files}
        _atomic_save(checkpoint, path)
        for name, keep in files.items():
            for old in _sidecar_files(path, name):
                if old.name != keep:
                    old.unlink(missing_ok=True)

    def load_checkpoint(self, path: Any, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = safe_load(path, map_location=map_location or "cpu")
        files = (checkpoint.get(SIDECARS_KEY) or {}).get("files")
        if files:
            checkpoint[SIDECARS_KEY] = {name: load_sidecar(Path(path).parent / file)
                                        for name, file in files.items()}
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        for old in Path(path).parent.glob(f"{Path(path).name}.*.*.pt"):
            old.unlink(missing_ok=True)


def load_sidecar(path: Path) -> Any:
    """A sidecar file (tensors and plain containers only), with the one-line errors of :func:`safe_load`."""
    if not path.is_file():
        raise CheckpointError(f"{path} (saved beside its checkpoint) is missing: copy it with the checkpoint,"
                              " or start a new run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} (saved beside its checkpoint) is corrupt or unsafe ({first}): resume"
                              " from an earlier checkpoint") from None


def _no_space(err: BaseException) -> bool:
    seen: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in seen:
        seen.append(e)
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def no_space_message(path: Path) -> str:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free"
    except OSError:
        free = "free space unknown"
    kept = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
    return (f"no space left on the device to write {path} ({free}); {kept}: free some space (old run folders,"
            " periodic checkpoints) or use --run_root on a larger disk, then resume with --ckpt_path last")


def load_submodule_state(module: nn.Module, path: str | os.PathLike, prefix: str) -> None:
    """Load a pretrained half into ``module`` from its standalone checkpoint or from a joint IDQL one
    (whose keys start with ``prefix``). Shapes must match: the data's dimensions decide them."""
    state = safe_load(path)["state_dict"]
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or mismatched:
        what = f"missing {missing[:3]}" if missing else f"shape mismatch in {mismatched[:3]}"
        raise CheckpointError(
            f"{path} does not fit this {type(module).__name__} ({what}): use a checkpoint of the same model"
            " size trained on the same environment"
        )
    module.load_state_dict({k: state[k] for k in own})


def export_agent(path: str | os.PathLike, agent: int, out: str | os.PathLike,
                 overrides: dict[str, Any] | None = None) -> None:
    """Write agent ``agent`` of a checkpoint of ``K`` agents (``--model.num_agents K``) to ``out`` as an
    ordinary single-agent checkpoint: every network tensor's leading dimension holds ``K`` agents' blocks of
    equal size (1 row per agent; the twin Q's 2 members per agent), of which agent ``agent``'s block is kept;
    ``num_agents`` becomes 1 in the saved hyperparameters. Optimizer and LR-scheduler states are dropped (the
    export is for evaluation: ``validate --ckpt_path out --model.num_agents 1``, with the agent's own
    ``tau``/``alpha`` when they differed). ``overrides``: hyperparameters to replace (``num_samples``,
    ``extraction``)."""
    checkpoint = safe_load(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    agents = int(hparams.get("num_agents", 1))
    if not 0 <= agent < agents:
        raise CheckpointError(f"{path} holds {agents} agent(s):"
                              f" --agent must lie in 0..{agents - 1} (got {agent})")
    state = {}
    for key, value in checkpoint["state_dict"].items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] % agents:
            raise CheckpointError(f"{path}: {key} has no leading agent dimension of {agents}; not a"
                                  " many-agent checkpoint of idql_pl")
        rows = value.shape[0] // agents
        state[key] = value[agent * rows : (agent + 1) * rows].clone()
    exported = {k: v for k, v in checkpoint.items()
                if k not in ("optimizer_states", "lr_schedulers", "state_dict")}
    exported["state_dict"] = state
    exported["hyper_parameters"] = {**hparams, "num_agents": 1}
    if isinstance(hparams.get("num_samples"), list | tuple):  # one candidate count per agent: this agent's
        exported["hyper_parameters"]["num_samples"] = int(hparams["num_samples"][agent])
    exported["hyper_parameters"].update(overrides or {})
    exported["idql_exported_agent"] = {"source": str(path), "agent": agent, "num_agents": agents}
    _atomic_save(exported, Path(out))

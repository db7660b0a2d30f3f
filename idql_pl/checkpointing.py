"""Checkpoint files: atomic writes, loads that execute nothing (``weights_only=True``), clear errors."""

from __future__ import annotations

import os
import pickle
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
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path (runs keep theirs in checkpoints/<run>/)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0][:160]
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain types and was refused, since loading it"
            f" could execute code ({first}); only load checkpoints written by idql_pl"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({first}): resume from an earlier checkpoint or retrain"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict): pass a .ckpt written by idql_pl")
    return checkpoint


SIDECARS_KEY = "idql_sidecars"


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sidecar_files(path: Path, name: str) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.{name}.*.pt"))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temp file in the same folder, fsync, then rename: a crash mid-save keeps the old file.

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

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = safe_load(path, map_location=map_location or "cpu")
        files = (checkpoint.get(SIDECARS_KEY) or {}).get("files")
        if files:
            checkpoint[SIDECARS_KEY] = {name: load_sidecar(Path(path).parent / file) for name, file in files.items()}
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        for old in Path(path).parent.glob(f"{Path(path).name}.*.*.pt"):
            old.unlink(missing_ok=True)


def load_sidecar(path: Path) -> Any:
    """A sidecar file (tensors and plain containers only), with the one-line errors of :func:`safe_load`."""
    if not path.is_file():
        raise CheckpointError(f"{path} (saved beside its checkpoint) is missing: copy it with the checkpoint, or"
                              " start a new run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} (saved beside its checkpoint) is corrupt or unsafe ({first}): resume from"
                              " an earlier checkpoint") from None


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
            f"{path} does not fit this {type(module).__name__} ({what}): use a checkpoint of the same model size"
            " trained on the same environment"
        )
    module.load_state_dict({k: state[k] for k in own})

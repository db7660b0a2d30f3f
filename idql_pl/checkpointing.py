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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temp file in the same folder, fsync, then rename: a crash mid-save keeps the old file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return safe_load(path, map_location=map_location or "cpu")


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

"""Global RNG state capture/restore, stored as tensors and plain types (loadable with ``weights_only=True``),
and the per-rank helpers DDP training needs (own streams per rank, states gathered for the checkpoint)."""

from __future__ import annotations

import random
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")
RANK_SEED_STRIDE = 1_000_003  # rank r > 0 draws from seed + r * stride


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states (dropout, diffusion noise, init draw from these)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`, restoring only what exists here: the saved CUDA generators of the
    devices this process sees (a checkpoint from an 8-GPU node resumes on a 1-GPU machine, a CUDA one on a
    CPU). Tensors may come on any device (``map_location``); generator states are read from CPU copies."""
    random.setstate((3, tuple(int(x) for x in state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].cpu().numpy().astype(np.uint32), state["numpy_pos"],
                         0, 0.0))
    torch.set_rng_state(state["torch"].cpu())
    saved = state.get("cuda") or []
    if saved and torch.cuda.is_available():
        for device in range(min(len(saved), torch.cuda.device_count())):
            torch.cuda.set_rng_state(saved[device].cpu(), device)


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialized default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_from_ranks(obj: T) -> list[T]:
    """Every rank's ``obj`` (a collective: all ranks must call it), ``[obj]`` without a process group."""
    _, world = distributed_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def own_rank_entry(per_rank: list[T] | None) -> T | None:
    """This rank's entry of a list saved by :func:`gather_from_ranks`, or None when there is none or the list
    comes from a run with another number of ranks."""
    rank, world = distributed_world()
    return per_rank[rank] if per_rank is not None and len(per_rank) == world else None


def seed_rank_stream(rank: int) -> None:
    """Give data-parallel rank ``rank`` its own dropout/diffusion-noise stream: reseed the global generators
    with ``torch.initial_seed() + rank * RANK_SEED_STRIDE`` (rank 0 is left as it is, so a one-process run
    and rank 0 of a DDP run draw the same numbers)."""
    if rank == 0:
        return
    seed = (torch.initial_seed() + rank * RANK_SEED_STRIDE) % 2**63
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)

"""Large CPU tensors from the reused heap instead of a fresh ``mmap`` each step (glibc's ``malloc``).

glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh ``mmap`` and hands it back
to the kernel on ``free``. A training step that allocates such a tensor then page-faults (and zero-fills) it anew
on every step: the actor step of ``num_agents = 8`` paper-size agents (8 x 1024 rows x 1024 float32 = 32 MiB per
activation) spent about 40% of its float32 time so, running at 0.57x the per-agent throughput of one agent
before and 0.93x after (the README's "Many seeds in one run"). Eager PyTorch on CPU has no caching allocator of
its own, so :func:`reuse_large_blocks` sets glibc's ``M_MMAP_MAX = 0`` (large blocks come from the heap and are
reused) and a high ``M_TRIM_THRESHOLD`` (freed memory stays with the process, ready for the next step) through
``mallopt``. The cost: the resident size stays at the process's peak instead of shrinking after a large
``free``. The CLI's runs call it once the dataset is loaded
(:class:`idql_pl.callbacks.allocator.ReuseLargeBlocks`), so loading keeps glibc's defaults.

``MALLOC_MMAP_MAX_`` or ``MALLOC_TRIM_THRESHOLD_`` in the environment (glibc's own settings, read at start) are
the user's choice and are left alone; without glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # bytes (mallopt takes an int): freed memory is kept
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def reuse_large_blocks(environ: dict[str, str] | None = None) -> str:
    """Serve large allocations from glibc's heap and keep freed memory (``mallopt``); returns what was done, as
    a few words for the start-up line."""
    environ = os.environ if environ is None else environ
    mine = [name for name in USER_SETTINGS if name in environ]
    if mine:
        return f"glibc malloc as set by {', '.join(mine)}"
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return "the platform's malloc (not glibc)"
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "glibc malloc defaults (mallopt refused)"
    return "glibc malloc: large blocks from the heap, reused"


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt(int, int)``, or None where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it  # noqa: B018
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt

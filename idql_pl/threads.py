"""CPU threads for shared machines: passive OpenMP waits and an intra-op thread count from the CPUs this process
may use.

Each PyTorch process starts one OpenMP thread per core, and by default an idle OpenMP thread spins for a while
before it sleeps. Alone on a machine that costs nothing; beside other busy processes the spinning threads take
the cores the working ones need, and throughput collapses far below a fair share. ``OMP_WAIT_POLICY=PASSIVE``
makes idle threads sleep at once. OpenMP reads it once, when its runtime starts (when torch is first imported),
so :func:`passive_openmp_wait` must run before that: ``python -m idql_pl ...`` calls it from the package's
``__init__`` (this module imports nothing heavy). A value the user set is never changed.

The number of intra-op threads is the number of CPUs this process may run on (``os.sched_getaffinity``: a
``taskset``, cgroup cpuset or SLURM allocation counts, not the machine's cores), unless ``OMP_NUM_THREADS`` is
set or ``--threads N`` is given.
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = "OMP_WAIT_POLICY"


def passive_openmp_wait(environ: dict[str, str] | None = None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless it is set or torch (and so OpenMP) is already loaded.
    Returns whether the setting is in effect for the OpenMP runtime that will start."""
    environ = os.environ if environ is None else environ
    if WAIT_POLICY in environ:
        return environ[WAIT_POLICY].strip().upper() == "PASSIVE"
    if "torch" in sys.modules:  # too late: the runtime has read its environment
        return False
    environ[WAIT_POLICY] = "PASSIVE"
    return True


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def intra_op_threads(requested: int | None = None, environ: dict[str, str] | None = None) -> tuple[int, str]:
    """The thread count to use and where it came from: ``--threads``, ``OMP_NUM_THREADS`` or the affinity mask."""
    environ = os.environ if environ is None else environ
    if requested is not None:
        if requested < 1:
            from idql_pl.errors import ConfigError

            raise ConfigError(f"--threads must be >= 1, got {requested}; omit it to use the {available_cpus()} CPUs"
                              " this process may run on")
        return requested, "--threads"
    env = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) >= 1:
        return int(env), "OMP_NUM_THREADS"
    return available_cpus(), "CPU affinity"


def apply_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads (see :func:`intra_op_threads`). An explicit ``--threads`` is also exported
    as ``OMP_NUM_THREADS``, so processes started from this one (DDP ranks) keep it; otherwise Lightning's DDP
    launcher divides the CPUs among the ranks itself."""
    import torch

    n, source = intra_op_threads(requested)
    if source == "--threads":
        os.environ["OMP_NUM_THREADS"] = str(n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


__all__ = ["apply_threads", "available_cpus", "intra_op_threads", "passive_openmp_wait"]

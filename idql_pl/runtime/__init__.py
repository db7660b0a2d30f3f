"""CPU threads for shared machines: passive OpenMP waits and an intra-op thread count from the CPUs this process
may use.

Each PyTorch process starts one OpenMP thread per core, and by default an idle OpenMP thread spins for a while
(libgomp: about 3 ms) before it sleeps. Alone on a machine that costs nothing; beside other busy processes the
spinning threads take the cores the working ones need, and throughput collapses far below a fair share.
``OMP_WAIT_POLICY=PASSIVE`` makes idle threads sleep at once, but then every parallel op pays a thread wake-up:
alone on a 2-core VM the quickstart ran at 34 critic steps/s instead of 80. So :func:`passive_openmp_wait` sets
``OMP_WAIT_POLICY=PASSIVE`` together with ``GOMP_SPINCOUNT=10000`` (libgomp, the OpenMP of PyTorch's Linux
wheels: spin about 0.1 ms, long enough to span the gap between two ops of a step, then sleep). OpenMP reads both
once, when its runtime starts (when torch is first imported), so this must run before that: ``python -m idql_pl
...`` calls it from the package's ``__init__`` (this module imports nothing heavy). A value the user set is never
changed.

Even a short spin collapses throughput when the threads of several processes outnumber the cores. So the number
of intra-op threads is the number of CPUs this process may run on (``os.sched_getaffinity``: a ``taskset``,
cgroup cpuset or SLURM allocation counts, not the machine's cores) while no other process needs them, and
fewer while others do: :class:`CpuShare` measures the CPU time other processes use, and the training loop
(``idql_pl.callbacks.threads.ShareCpus``) sets ``torch.set_num_threads`` to the cores left over (at least 1).
``OMP_NUM_THREADS`` or ``--threads N`` fix the count instead. Under DDP the processes of one machine share its
CPUs: each takes at most :func:`rank_share` of them (what Lightning's DDP launcher gives each rank).
"""

from __future__ import annotations

import math
import os
import sys
import time

WAIT_POLICY = "OMP_WAIT_POLICY"
SPIN_COUNT = "GOMP_SPINCOUNT"
SHORT_SPIN = "10000"  # libgomp spin iterations before a thread sleeps: about 0.1 ms (its default: 300000)


def passive_openmp_wait(environ: dict[str, str] | None = None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` with a short spin (``GOMP_SPINCOUNT``) unless the user set the wait policy
    or torch (and so OpenMP) is already loaded. Returns whether passive waits are in effect for the OpenMP
    runtime that will start."""
    environ = os.environ if environ is None else environ
    if WAIT_POLICY in environ:
        return environ[WAIT_POLICY].strip().upper() == "PASSIVE"
    if "torch" in sys.modules:  # too late: the runtime has read its environment
        return False
    environ[WAIT_POLICY] = "PASSIVE"
    environ.setdefault(SPIN_COUNT, SHORT_SPIN)
    return True


def wait_policy_text(environ: dict[str, str] | None = None) -> str:
    """The OpenMP wait settings in effect, for the start-up line."""
    environ = os.environ if environ is None else environ
    text = environ.get(WAIT_POLICY, "default (spinning)")
    return f"{text}, {SPIN_COUNT}={environ[SPIN_COUNT]}" if SPIN_COUNT in environ else text


class CpuShare:
    """How many cores other processes keep busy, from the machine's CPU time (``/proc/stat``) minus this
    process's own (``os.times``, all its threads) between two calls. Linux only: elsewhere :meth:`others`
    returns None."""

    def __init__(self) -> None:
        self._last = self._sample()
        #: cores this process used over the interval of the last :meth:`others` that returned a value
        self.own: float | None = None

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(wall s, machine busy CPU s, own CPU s), or None without ``/proc/stat``."""
        try:
            with open("/proc/stat") as f:
                fields = [float(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        own = os.times()
        return time.monotonic(), (sum(fields[:8]) - idle) / ticks, own.user + own.system

    def others(self) -> float | None:
        """Cores used by other processes since the previous call (None on the first call after a gap of less
        than 0.2 s, or without ``/proc/stat``)."""
        now = self._sample()
        if now is None or self._last is None or now[0] - self._last[0] < 0.2:
            self._last = self._last or now
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self._last, now
        self._last = now
        self.own = max(0.0, (own1 - own0) / (t1 - t0))
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


def shared_threads(limit: int, others: float) -> int:
    """Threads to run with when other processes keep ``others`` cores busy: the cores of ``limit`` left over,
    at least 1 (others' use is rounded to whole cores: under half a core does not count)."""
    return max(1, min(limit, limit - math.floor(others + 0.5)))


def rank_share(cpus: int, local_ranks: int) -> int:
    """Threads of each of ``local_ranks`` processes (DDP ranks on one machine) sharing ``cpus`` CPUs: an equal
    share, at least 1 (the count Lightning's DDP launcher sets, ``cpus // processes``)."""
    return max(1, int(cpus) // max(1, int(local_ranks)))


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


def apply_threads(requested: int | None = None) -> tuple[int, str]:
    """Set torch's intra-op threads (see :func:`intra_op_threads`). An explicit ``--threads`` is also exported
    as ``OMP_NUM_THREADS``, so processes started from this one (DDP ranks) keep it; otherwise Lightning's DDP
    launcher divides the CPUs among the ranks itself. Returns the count and its source, as :func:`intra_op_threads`."""
    import torch

    n, source = intra_op_threads(requested)
    if source == "--threads":
        os.environ["OMP_NUM_THREADS"] = str(n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n, source


__all__ = ["CpuShare", "apply_threads", "available_cpus", "intra_op_threads", "passive_openmp_wait",
           "rank_share", "shared_threads", "wait_policy_text"]

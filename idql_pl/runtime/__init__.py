"""Runtime tweaks: what a training process changes about itself for speed and quiet, one place for all of
them. They are applied by the CLI (``python -m idql_pl``), never on import; each is switched off by naming it
in ``IDQL_PL_TWEAKS_OFF`` (a comma-separated list: ``openmp``, ``threads``, ``malloc``, ``notices``, or
``all``), and each yields to the standard setting a user made himself (``OMP_WAIT_POLICY``,
``OMP_NUM_THREADS`` or ``--threads``, ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_``). Nothing here imports
torch at module level: the OpenMP settings must be in place before torch starts OpenMP. The Lightning
callbacks that apply two of them during training are in :mod:`idql_pl.runtime.callbacks`.

``openmp``: passive OpenMP waits with a short spin
    Each PyTorch process starts one OpenMP thread per core, and by default an idle OpenMP thread spins for a
    while (libgomp: about 3 ms) before it sleeps. Alone on a machine that costs nothing; beside other busy
    processes the spinning threads take the cores the working ones need, and throughput collapses far below a
    fair share. ``OMP_WAIT_POLICY=PASSIVE`` alone makes every parallel op pay a thread wake-up (alone on a
    2-core VM the quickstart ran at 34 critic steps/s instead of 80), so :func:`passive_openmp_wait` sets it
    together with ``GOMP_SPINCOUNT=10000`` (libgomp, the OpenMP of PyTorch's Linux wheels: spin about 0.1 ms,
    long enough to span the gap between two ops of a step, then sleep). OpenMP reads both once, when torch is
    first imported: ``idql_pl/__main__.py`` calls it first thing.

``threads``: intra-op threads shared with other processes
    Even a short spin collapses throughput when the threads of several processes outnumber the cores. So the
    number of intra-op threads is the number of CPUs this process may run on (``os.sched_getaffinity``: a
    ``taskset``, cgroup cpuset or SLURM allocation counts, not the machine's cores) while no other process
    needs them, and fewer while others do: :class:`CpuShare` measures the CPU time other processes use, and
    :class:`~idql_pl.runtime.callbacks.ShareCpus` sets ``torch.set_num_threads`` to the cores left over (at
    least 1). Under DDP the processes of one machine share its CPUs: each takes at most :func:`rank_share`.

``malloc``: large CPU tensors from glibc's reused heap
    glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh ``mmap`` and returns
    it to the kernel on ``free``, so a step that allocates such a tensor page-faults it in afresh every step
    (the actor step of 8 paper-size agents, 32 MiB activations, lost about 40% of its time so). Eager PyTorch
    on CPU has no caching allocator, so :func:`reuse_large_blocks` sets ``M_MMAP_MAX = 0`` and a high
    ``M_TRIM_THRESHOLD`` through ``mallopt`` once the dataset is loaded. The cost: the resident size stays at
    the process's peak. Without glibc (macOS, musl) nothing changes.

``notices``: third-party notices that ask nothing of an IDQL user are dropped (:func:`drop_notices`), each
    matched by its own text and kind (warning category, logger, or notification table), never by a blanket
    filter; every other warning, ours included, still prints.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable

TWEAKS = ("openmp", "threads", "malloc", "notices")
TWEAKS_OFF = "IDQL_PL_TWEAKS_OFF"


def enabled(tweak: str, environ: dict[str, str] | None = None) -> bool:
    """Whether the tweak ``tweak`` (one of :data:`TWEAKS`) is on: not named in ``IDQL_PL_TWEAKS_OFF``."""
    environ = os.environ if environ is None else environ
    off = {word.strip().lower() for word in environ.get(TWEAKS_OFF, "").split(",")}
    return not ({tweak, "all"} & off)


# ------------------------------------------------------------------------------------------------- openmp
WAIT_POLICY = "OMP_WAIT_POLICY"
SPIN_COUNT = "GOMP_SPINCOUNT"
SHORT_SPIN = "10000"  # libgomp spin iterations before a thread sleeps: about 0.1 ms (its default: 300000)


def passive_openmp_wait(environ: dict[str, str] | None = None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` with a short spin (``GOMP_SPINCOUNT``) unless the user set the wait
    policy or torch (and so OpenMP) is already loaded. Returns whether passive waits are in effect for the
    OpenMP runtime that will start."""
    environ = os.environ if environ is None else environ
    if WAIT_POLICY in environ:
        return environ[WAIT_POLICY].strip().upper() == "PASSIVE"
    if not enabled("openmp", environ):
        return False
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


# ------------------------------------------------------------------------------------------------ threads
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
    """The thread count to use and where it came from: ``--threads``, ``OMP_NUM_THREADS`` or the affinity
    mask."""
    environ = os.environ if environ is None else environ
    if requested is not None:
        if requested < 1:
            from idql_pl.errors import ConfigError

            raise ConfigError(f"--threads must be >= 1, got {requested}; omit it to use the"
                              f" {available_cpus()} CPUs this process may run on")
        return requested, "--threads"
    env = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) >= 1:
        return int(env), "OMP_NUM_THREADS"
    return available_cpus(), "CPU affinity"


def apply_threads(requested: int | None = None) -> tuple[int, str]:
    """Set torch's intra-op threads (see :func:`intra_op_threads`). An explicit ``--threads`` is also exported
    as ``OMP_NUM_THREADS``, so processes started from this one (DDP ranks) keep it; otherwise Lightning's DDP
    launcher divides the CPUs among the ranks itself. Returns the count and its source, as
    :func:`intra_op_threads`."""
    import torch

    n, source = intra_op_threads(requested)
    if source == "--threads":
        os.environ["OMP_NUM_THREADS"] = str(n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n, source


# ------------------------------------------------------------------------------------------------- malloc
M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # bytes (mallopt takes an int): freed memory is kept
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def reuse_large_blocks(environ: dict[str, str] | None = None) -> str:
    """Serve large allocations from glibc's heap and keep freed memory (``mallopt``); returns what was done,
    as a few words for the start-up line."""
    environ = os.environ if environ is None else environ
    if not enabled("malloc", environ):
        return f"glibc malloc defaults ({TWEAKS_OFF})"
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


# ------------------------------------------------------------------------------------------------ notices
# (message regex, matched from the start of the message, and the warning category)
WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization state",
     UserWarning),
)

# logger name -> message prefixes dropped from that logger's records
LOG_RECORDS: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.utilities.rank_zero": (
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
        "`Trainer(limit_val_batches=1)` was configured so 1 batch will be used",
    ),
}

# farama_notifications: (package, text fragment) of notices to drop
NOTIFICATIONS: tuple[tuple[str, str], ...] = (
    ("gymnasium_robotics", "environment's reward functions were updated in v1.2.1"),
)


class _DropRecords(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not message.lstrip().startswith(self.prefixes)


_installed_filters: list[tuple[logging.Logger, logging.Filter]] = []


def drop_notices() -> None:
    """Install the filters above (idempotent for the logging part), unless ``notices`` is switched off."""
    if not enabled("notices"):
        return
    for pattern, category in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, prefixes in LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(lg is logger for lg, _ in _installed_filters):
            flt = _DropRecords(prefixes)
            logger.addFilter(flt)
            _installed_filters.append((logger, flt))
    _drop_notifications()


def uninstall_log_filters() -> None:
    """Remove the logging filters (tests)."""
    while _installed_filters:
        logger, flt = _installed_filters.pop()
        logger.removeFilter(flt)


def _drop_notifications() -> None:
    if "gymnasium_robotics" in sys.modules:  # already imported: its notice is printed, nothing to do
        return
    try:
        from farama_notifications import notifications
    except Exception:
        return
    for package, fragment in NOTIFICATIONS:
        table = notifications.get(package)
        if isinstance(table, dict):
            for version in [v for v, text in table.items() if isinstance(text, str) and fragment in text]:
                del table[version]



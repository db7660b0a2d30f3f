"""Claiming a run folder, so two ``fit`` commands started at once never share one.

A fresh ``fit`` takes ``<root>/<name>``, or the first of ``<name>-1``, ``<name>-2``, ... that holds no
checkpoint and is not claimed by a live process. The claim is an exclusive ``flock`` on the folder itself: the
kernel gives it to exactly one process, holds it while that process lives and drops it when the process ends
however it ends (even ``kill -9``), and it adds no file to the folder. On a file system without ``flock``
(some network mounts) the claim is the atomic creation of a ``.claimed`` subfolder instead, removed when the
command ends (a run killed before its first checkpoint then keeps it, and the next run takes the next suffix).

Under SLURM, a job that Lightning requeued (auto-requeue on SIGUSR1) restarts the same command: the folder
whose ``slurm_job_id.txt`` names this job and that holds an ``hpc_ckpt_*.ckpt`` is taken again, so Lightning
resumes from it.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

try:  # (this module imports nothing of idql_pl at load time: claims are cheap to take in a bare interpreter)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CLAIM_DIR = ".claimed"
SLURM_JOB_FILE = "slurm_job_id.txt"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}


class Claim:
    """A held claim on one folder; :meth:`release` (or process exit) gives it up."""

    def __init__(self, path: Path, fd: int | None = None, marker: Path | None = None) -> None:
        self.path, self.fd, self.marker = path, fd, marker

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None
        if self.marker is not None:
            with contextlib.suppress(OSError):
                self.marker.rmdir()
            self.marker = None


_held: list[Claim] = []


def release_all() -> None:
    """Release every claim this process holds (the CLI calls it when a command returns)."""
    while _held:
        _held.pop().release()


def try_claim(path: Path) -> Claim | None:
    """Claim ``path`` (created if missing) for this process, or None if a live process holds it."""
    path.mkdir(parents=True, exist_ok=True)
    if fcntl is not None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as err:
            os.close(fd)
            if err.errno not in _UNSUPPORTED:
                raise
        else:
            claim = Claim(path, fd=fd)
            _held.append(claim)
            return claim
    marker = path / CLAIM_DIR
    try:
        marker.mkdir()
    except FileExistsError:
        return None
    claim = Claim(path, marker=marker)
    _held.append(claim)
    return claim


def suffixed(base: Path, i: int) -> Path:
    return base if i == 0 else Path(f"{base}-{i}")


def claim_fresh(base: Path, slurm_job: str | None = None, limit: int = 10_000) -> Path:
    """The folder a fresh fit writes to: ``base`` or its first free suffix, claimed by this process."""
    if slurm_job:
        for i in range(limit):
            candidate = suffixed(base, i)
            if not candidate.exists():
                break
            if _requeued_here(candidate, slurm_job) and try_claim(candidate) is not None:
                return candidate
    for i in range(limit):
        candidate = suffixed(base, i)
        if any(candidate.glob("*.ckpt")):
            continue
        claim = try_claim(candidate)
        if claim is None:
            continue
        if any(candidate.glob("*.ckpt")):  # a run finished writing here between the look and the claim
            claim.release()
            _held.remove(claim)
            continue
        if slurm_job:
            (candidate / SLURM_JOB_FILE).write_text(slurm_job)
        return candidate
    from idql_pl.errors import ConfigError

    raise ConfigError(f"no free run folder among {base}-1 ... {base}-{limit - 1}: pass another --run_name")


def claim_existing(path: Path) -> Claim:
    """Claim an existing run folder to resume it; refuse if another live ``fit`` holds it."""
    claim = try_claim(path)
    if claim is None:
        from idql_pl.errors import ConfigError

        raise ConfigError(
            f"run folder {path} is in use by another fit that is still running: wait for it to end, or start"
            " a new run (drop --ckpt_path)"
        )
    return claim


def _requeued_here(folder: Path, slurm_job: str) -> bool:
    job_file = folder / SLURM_JOB_FILE
    try:
        same = job_file.read_text().strip() == slurm_job
    except OSError:
        return False
    return same and any(folder.glob("hpc_ckpt_*.ckpt"))


def slurm_job_id() -> str | None:
    """This SLURM job's id (``<array job>_<task>`` for arrays), or None outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


__all__ = ["Claim", "claim_existing", "claim_fresh", "release_all", "slurm_job_id", "try_claim"]

"""Stop on SIGTERM / SIGINT (Ctrl-C) without losing work: save ``last.ckpt`` at the current step, then exit
with 128 + the signal number (143 / 130), the status schedulers and shells expect from a stopped job.

- The signal handler only records the request. The run stops at the end of the current training step (in
  ``on_train_batch_end``, the hook where ``ModelCheckpoint`` saves, so the checkpoint resumes exactly like a
  periodic one), after ``trainer.save_checkpoint``, which runs the module's non-finite check first and writes
  atomically (temp file, fsync, rename).
- A second signal while a checkpoint is being written is ignored (with a note): the write finishes, and even a
  SIGKILL then would leave the previous file whole. Repeats within a second of the first signal are the same
  request (a signal sent to both a process and its group, a double key press). A second signal later than that
  (say, during a long evaluation) stops at once without saving; the last periodic checkpoint is untouched.
- DDP: any rank signalled stops all of them, at the same step: the request is reduced over the ranks (one
  small all-reduce, a host sync) every ``check_every_n_steps`` training steps (default
  :data:`CHECK_EVERY_N_STEPS`) and at ``max_steps``, not every step, so a step makes no host sync for it.
  Steps, never wall time: every rank counts the same ``global_step``, so all take part in the same reductions
  (a time-based check would let the ranks disagree on when to reduce and deadlock). The stop then comes at the
  first such step after the signal; every rank takes part in the save and rank 0 writes the file. A single
  process reads its own Python flag every step and stops after the current one (no tensor work at all).
- Lightning's own SIGTERM handler would end ``fit`` with exit status 0 and no checkpoint; this callback's
  handlers replace it for SIGTERM and SIGINT once training starts. SIGUSR1 (Lightning's SLURM auto-requeue:
  save an ``hpc_ckpt`` and ``scontrol requeue``) is left to Lightning.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from idql_pl.errors import CheckpointError, ConfigError
from idql_pl.training.checkpointing import write_in_progress

SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: DDP: training steps between two reductions of the stop request over the ranks (GracefulStop's default).
#: A signal is acted on at most this many steps later: 0.6 s at 80 steps/s. Lower it when steps are slow and a
#: scheduler kills soon after its SIGTERM (SLURM's KillWait: 30 s by default).
CHECK_EVERY_N_STEPS = 50


class Stopped(BaseException):
    """Training was stopped by a signal. A BaseException, like KeyboardInterrupt, so that no ``except
    Exception`` on the way swallows it; the CLI turns it into one line and exit status 128 + signum."""

    def __init__(self, signum: int, step: int | None = None, saved: bool = False, path: str | None = None,
                 step_label: str = "step", resume_hint: str = "--ckpt_path last", detail: str = "") -> None:
        super().__init__(signum, step, saved)
        self.signum, self.step, self.saved, self.path = int(signum), step, saved, path
        self.step_label, self.resume_hint, self.detail = step_label, resume_hint, detail

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    def message(self) -> str:
        name = Path(self.path).name if self.path else "last.ckpt"
        if self.step is None:
            return f"stopped by {self.signal_name} before any training step; nothing to save"
        where = f"stopped by {self.signal_name} at {self.step_label} {self.step}"
        if self.saved:
            return f"{where}; {name} saved; resume with {self.resume_hint}"
        if self.detail:
            return f"{where}; saving {name} failed: {self.detail}"
        return (f"{where} without saving (second signal); the last periodic checkpoint is intact; resume with"
                f" {self.resume_hint}")

    def __str__(self) -> str:
        return self.message()


def _write_stderr(text: str) -> None:
    """Async-signal-safe enough: one os.write, no buffered stream (which a handler could re-enter)."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


def _fresh_line() -> str:
    """A newline first on a terminal, where a progress bar may hold the current line."""
    try:
        return "\n" if os.isatty(2) else ""
    except OSError:
        return ""


class StopController:
    """Process-wide signal state: installed by the CLI for the whole command, restored when it returns.

    Phases: ``setup`` (before training: a signal stops at once, nothing to save), ``training`` (record the
    request; :class:`GracefulStop` acts on it at the end of the step), ``done`` (training is over: the
    command finishes what it is doing; a signal is only recorded)."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.requested: int | None = None
        self.saving = False
        self.step: int | None = None
        self.step_label = "step"
        self.resume_hint = "--ckpt_path last"
        self._previous: dict[int, Any] = {}
        self._first_at = 0.0
        #: repeats within this many seconds of the first signal are the same request (a signal sent to the
        #: process and to its group, a double key press), not a request to stop without saving
        self.grace_s = 1.0

    # ----------------------------------------------------------------------------------- handlers
    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            current = signal.getsignal(signum)
            if current is not self.handle:
                self._previous.setdefault(signum, current)
                signal.signal(signum, self.handle)

    def restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def ignore_from_now_on(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                signal.signal(signum, signal.SIG_IGN)

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.phase == "setup":
            raise Stopped(signum)
        if self.phase == "done":
            self.requested = self.requested or signum
            return
        if self.requested is None:
            self.requested, self._first_at = signum, time.monotonic()
            _write_stderr(f"{_fresh_line()}[idql_pl] {name} received: stopping after this step and saving"
                          f" last.ckpt (send it again to stop at once without saving)\n")
            return
        if self.saving or write_in_progress():
            _write_stderr(f"[idql_pl] {name} again: a checkpoint is being written;"
                          " waiting for it to finish\n")
            return
        if time.monotonic() - self._first_at < self.grace_s:  # the same stop, delivered twice (process group)
            return
        raise Stopped(signum, step=self.step if self.step is not None else -1, saved=False,
                      step_label=self.step_label, resume_hint=self.resume_hint)

    @contextlib.contextmanager
    def saving_checkpoint(self) -> Iterator[None]:
        self.saving = True
        try:
            yield
        finally:
            self.saving = False


#: the controller of this process (the CLI installs it; tests may build their own)
controller = StopController()


def step_label(pl_module: L.LightningModule) -> str:
    """What one Lightning step counts: ``critic step`` for IDQL and the critic alone, ``actor step`` for the
    behavior model alone (from the module's ``updates_per_step`` kinds)."""
    kinds = getattr(pl_module, "updates_per_step", None)
    try:
        kinds = list(kinds()) if callable(kinds) else []
    except Exception:
        kinds = []
    if "critic" in kinds:
        return "critic step"
    return f"{kinds[0]} step" if kinds else "step"


class GracefulStop(Callback):
    """Acts on a recorded SIGTERM/SIGINT at the end of a training step (see the module docstring).

    ``check_every_n_steps`` (DDP only): the request is reduced over the ranks at steps that are a multiple of
    it and at ``max_steps``; a single process checks every step (no reduction)."""

    def __init__(self, stop: StopController | None = None, resume_hint: str = "--ckpt_path last",
                 check_every_n_steps: int = CHECK_EVERY_N_STEPS) -> None:
        if int(check_every_n_steps) < 1:
            raise ConfigError(f"GracefulStop: check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.stop = stop or controller
        self.resume_hint = resume_hint
        self.check_every_n_steps = int(check_every_n_steps)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stop.step_label = step_label(pl_module)
        self.stop.resume_hint = self.resume_hint
        self.stop.step = trainer.global_step
        self.stop.phase = "training"
        self.stop.install()  # over the SIGTERM handler Lightning registered when fit started

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.stop.step = trainer.global_step
        signum = self.stop.requested or 0
        if trainer.world_size > 1:  # any rank signalled stops every rank, at the same (step-based) check
            if not self.reduces_at(trainer.global_step, trainer.max_steps):
                return
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=trainer.strategy.root_device),
                                                 reduce_op="max"))
        if not signum:
            return
        path = str(last_checkpoint_path(trainer))
        label = self.stop.step_label
        try:
            with self.stop.saving_checkpoint():
                # the module's non-finite check runs first; atomic write
                trainer.save_checkpoint(path, weights_only=False)
        except CheckpointError as err:  # e.g. no space left: the previous last.ckpt is intact
            raise Stopped(signum, step=trainer.global_step, saved=False, path=path, step_label=label,
                          resume_hint=self.resume_hint, detail=str(err)) from None
        raise Stopped(signum, step=trainer.global_step, saved=True, path=path, step_label=label,
                      resume_hint=self.resume_hint)

    def reduces_at(self, step: int, max_steps: int = -1) -> bool:
        """Whether DDP ranks reduce the stop request after training step ``step`` (the same on every rank)."""
        return step % self.check_every_n_steps == 0 or 0 < max_steps <= step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stop.phase = "done"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self.stop.phase = "done"


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``--ckpt_path last`` looks: the checkpoint callback's folder (the run folder), ``last.ckpt``."""
    cb = trainer.checkpoint_callback
    folder = cb.dirpath if isinstance(cb, ModelCheckpoint) and cb.dirpath else trainer.default_root_dir
    name = (cb.CHECKPOINT_NAME_LAST if isinstance(cb, ModelCheckpoint) else None) or "last"
    return Path(folder) / f"{name}{ModelCheckpoint.FILE_EXTENSION}"


__all__ = ["CHECK_EVERY_N_STEPS", "GracefulStop", "StopController", "Stopped", "controller",
           "last_checkpoint_path", "step_label"]

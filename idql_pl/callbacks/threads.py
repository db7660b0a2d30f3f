"""ShareCpus: fewer intra-op threads while other processes need the cores, all of them again when they are gone
(see idql_pl/threads.py for why)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from idql_pl.threads import CpuShare, shared_threads


class ShareCpus(L.Callback):
    """Every ``interval_s`` seconds of training (checked at the end of a training step, on the main thread, where
    ``torch.set_num_threads`` takes effect) set the thread count to :func:`~idql_pl.threads.shared_threads` of
    ``max_threads`` and the cores other processes used since the last check. One line when the count changes.
    Added by the CLI when the thread count comes from the CPU affinity (not from ``--threads``/``OMP_NUM_THREADS``).
    """

    def __init__(self, max_threads: int, interval_s: float = 2.0):
        self.max_threads, self.interval_s = max(1, int(max_threads)), float(interval_s)
        self._share: CpuShare | None = None
        self._next = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._share, self._next = CpuShare(), time.monotonic() + self.interval_s

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._share is None or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.interval_s
        others = self._share.others()
        if others is None:
            return
        target = shared_threads(self.max_threads, others)
        current = torch.get_num_threads()
        if target != current:
            torch.set_num_threads(target)
            reason = f"other processes use {others:.1f} of the cores" if target < current else "the cores are free again"
            rank_zero_info(f"[idql_pl] {target} CPU thread{'s' if target != 1 else ''} from step {trainer.global_step}:"
                           f" {reason} (--threads N fixes the count)")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.get_num_threads() != self.max_threads:
            torch.set_num_threads(self.max_threads)  # evaluation after fit, and the caller, get them all back
        self._share = None

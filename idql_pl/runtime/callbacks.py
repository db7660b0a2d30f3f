"""The two runtime tweaks that act during training (:mod:`idql_pl.runtime`): :class:`ShareCpus` (fewer
intra-op threads while other processes need the cores, all of them again when they are gone) and
:class:`ReuseLargeBlocks` (large CPU tensors from glibc's reused heap once the data is loaded)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from idql_pl.runtime import CpuShare, rank_share, reuse_large_blocks, shared_threads


class ShareCpus(L.Callback):
    """Every ``interval_s`` seconds of training (checked at the end of a training step, on the main thread,
    where ``torch.set_num_threads`` takes effect) set the thread count to
    :func:`~idql_pl.runtime.shared_threads` of ``max_threads`` and the cores other processes used since the
    last check. One line when the count changes. Added by the CLI when the thread count comes from the CPU
    affinity (not from ``--threads``/``OMP_NUM_THREADS``).

    Under DDP the ``L`` ranks on this machine (``trainer.num_devices``) share its ``max_threads`` CPUs: each
    rank is capped at :func:`~idql_pl.runtime.rank_share` of them from the start of training (the share
    Lightning's DDP launcher gives each rank) and never grows beyond it. The CPU time of the other ranks is
    not another process's load: they run the same steps in lockstep, so each is taken to use what this rank
    uses, and only the rest of the machine's load counts, split evenly among the ``L`` ranks.
    """

    def __init__(self, max_threads: int, interval_s: float = 2.0):
        self.max_threads, self.interval_s = max(1, int(max_threads)), float(interval_s)
        self._share: CpuShare | None = None
        self._next = 0.0
        self.local_ranks = 1  # processes of this run on this machine (DDP local world size)
        self.limit = self.max_threads  # the most threads this process takes

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ddp = int(getattr(trainer, "world_size", 1) or 1) > 1
        self.local_ranks = max(1, int(getattr(trainer, "num_devices", 1) or 1)) if ddp else 1
        self.limit = rank_share(self.max_threads, self.local_ranks)
        if self.local_ranks > 1:
            if torch.get_num_threads() != self.limit:
                torch.set_num_threads(self.limit)
            plural = "s" if self.limit != 1 else ""
            rank_zero_info(f"[idql_pl] DDP: {self.limit} CPU thread{plural} per process"
                           f" ({self.max_threads} CPUs / {self.local_ranks} processes on this machine; fewer"
                           " while other processes use the cores; --threads N fixes the count)")
        self._share, self._next = CpuShare(), time.monotonic() + self.interval_s

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._share is None or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.interval_s
        others = self._share.others()
        if others is None:
            return
        per_rank = others
        if self.local_ranks > 1:  # the other ranks of this run are not other processes' load
            others = max(0.0, others - (self.local_ranks - 1) * (self._share.own or 0.0))
            per_rank = others / self.local_ranks
        target = shared_threads(self.limit, per_rank)
        current = torch.get_num_threads()
        if target != current:
            torch.set_num_threads(target)
            reason = (f"other processes use {others:.1f} of the cores" if target < current
                      else "the cores are free again")
            rank_zero_info(f"[idql_pl] {target} CPU thread{'s' if target != 1 else ''} from step"
                           f" {trainer.global_step}: {reason} (--threads N fixes the count)")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.get_num_threads() != self.limit:
            torch.set_num_threads(self.limit)  # evaluation after fit, and the caller: this process's share
        self._share = None


class ReuseLargeBlocks(L.Callback):
    """At ``setup`` (after the datamodule's ``setup`` has loaded the dataset, before the first step), call
    :func:`~idql_pl.runtime.reuse_large_blocks` once per process and say what it did. The CLI adds it to every
    run."""

    def __init__(self) -> None:
        self.done = ""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.done:
            self.done = reuse_large_blocks()
            rank_zero_info(f"[idql_pl] memory: {self.done}")

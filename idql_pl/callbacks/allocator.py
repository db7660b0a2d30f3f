"""ReuseLargeBlocks: large CPU tensors from glibc's reused heap once the data is loaded (see idql_pl/allocator.py)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from idql_pl.allocator import reuse_large_blocks


class ReuseLargeBlocks(L.Callback):
    """At ``setup`` (after the datamodule's ``setup`` has loaded the dataset, before the first step), call
    :func:`~idql_pl.allocator.reuse_large_blocks` once per process and say what it did. The CLI adds it to every run."""

    def __init__(self) -> None:
        self.done = ""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.done:
            self.done = reuse_large_blocks()
            rank_zero_info(f"[idql_pl] memory: {self.done}")

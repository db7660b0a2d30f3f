"""On-device transition storage with seeded index sampling (no per-sample `__getitem__` + collate)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

FIELDS = ("observations", "actions", "rewards", "next_observations", "masks")


class Batch(NamedTuple):
    """A batch of transitions; rewards and masks are 1-D, ``masks = 1 - terminal`` (IDQL_SPEC Sec. 1)."""

    observations: Tensor
    actions: Tensor
    rewards: Tensor
    next_observations: Tensor
    masks: Tensor


class TransitionBuffer:
    """Transitions packed into one ``[N, D]`` float32 tensor; ``sample`` is one ``randint`` + one ``index_select``.

    The buffer deliberately has no ``.to`` method, so Lightning hands the same object to ``training_step``
    untouched: models draw their own batches (critic 256, actor 1024, ...) from it, and Lightning's
    one-batch prefetch cannot advance the sampling generator ahead of the checkpoint.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray | Tensor], seed: int = 0, device: str | torch.device = "cpu"):
        columns = [torch.as_tensor(np.asarray(arrays[k]), dtype=torch.float32) for k in FIELDS]
        n = columns[0].shape[0]
        columns = [c.reshape(n, -1) for c in columns]
        self.obs_dim = columns[0].shape[1]
        self.action_dim = columns[1].shape[1]
        self._splits = [c.shape[1] for c in columns]
        self.data = torch.cat(columns, dim=1).contiguous()
        self.seed = seed
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.move_to(device)

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def device(self) -> torch.device:
        return self.data.device

    def move_to(self, device: str | torch.device) -> TransitionBuffer:
        """Move the storage (and a fresh generator of the same state) to ``device``."""
        device = torch.device(device)
        state = self.generator.get_state()
        self.data = self.data.to(device)
        self.generator = torch.Generator(device=device)
        if device.type == "cpu":
            self.generator.set_state(state)
        else:
            self.generator.manual_seed(self.seed)
        return self

    def sample(self, batch_size: int) -> Batch:
        """Draw ``batch_size`` transitions uniformly with replacement (paper App. D)."""
        idx = torch.randint(len(self), (batch_size,), device=self.device, generator=self.generator)
        return self.gather(idx)

    def fixed_batch(self, batch_size: int, seed: int = 12345) -> Batch:
        """The same rows at every call (validation losses), drawn without touching any training RNG."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        idx = torch.randint(len(self), (min(batch_size, len(self)),), generator=gen)
        return self.gather(idx.to(self.device))

    def gather(self, idx: Tensor) -> Batch:
        obs, act, rew, next_obs, mask = self.data.index_select(0, idx).split(self._splits, dim=1)
        return Batch(obs, act, rew.squeeze(1), next_obs, mask.squeeze(1))

    def all(self) -> Batch:
        """The whole buffer as one batch (views, no copy)."""
        obs, act, rew, next_obs, mask = self.data.split(self._splits, dim=1)
        return Batch(obs, act, rew.squeeze(1), next_obs, mask.squeeze(1))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class BufferStream:
    """The training 'dataloader': yields the same buffer forever (``trainer.max_steps`` ends the run)."""

    def __init__(self, buffer: TransitionBuffer):
        self.buffer = buffer

    def __iter__(self) -> Iterator[TransitionBuffer]:
        while True:
            yield self.buffer

"""The online replay buffer of finetuning and the symmetric (half online, half offline) batches
(paper Sec. 6.2).

Rows use :class:`~idql_pl.data.buffer.TransitionBuffer`'s packed layout (one ``[capacity, D]`` float32 tensor,
columns ``FIELDS``), so a mixed batch is two ``index_select`` s, one ``cat`` and one ``split``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from idql_pl.data.buffer import Batch, TransitionBuffer
from idql_pl.errors import CheckpointError, ConfigError


class ReplayBuffer:
    """Fixed-capacity ring of online transitions on ``device``, filled one environment step at a time.

    :meth:`add` takes host values (the env's numpy output) and copies one packed row to the device: no device
    to host sync. The fill count is a host integer, so sampling needs no sync either. ``state_dict`` holds the
    filled rows only (a CPU tensor), the write position and the sampling generator.
    """

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, seed: int = 0,
                 device: str | torch.device = "cpu"):
        if capacity < 1:
            raise ConfigError(f"replay capacity must be >= 1 (got {capacity})")
        self.capacity, self.obs_dim, self.action_dim = int(capacity), int(obs_dim), int(action_dim)
        self.width = 2 * obs_dim + action_dim + 2
        self._splits = [obs_dim, action_dim, 1, obs_dim, 1]
        self.data = torch.zeros(self.capacity, self.width, dtype=torch.float32, device=device)
        self.generator = torch.Generator(device=self.data.device).manual_seed(int(seed))
        self.size = 0  # filled rows
        self.ptr = 0  # next row written
        self._row = np.zeros(self.width, dtype=np.float32)  # host staging row

    def __len__(self) -> int:
        return self.size

    @property
    def device(self) -> torch.device:
        return self.data.device

    def add(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray,
            mask: float) -> None:
        """Append one transition (``mask = 1 - terminated``; time-limit truncation is not terminal)."""
        o, a = self.obs_dim, self.action_dim
        row = self._row
        row[:o] = np.asarray(obs, dtype=np.float32).reshape(-1)
        row[o : o + a] = np.asarray(action, dtype=np.float32).reshape(-1)
        row[o + a] = reward
        row[o + a + 1 : 2 * o + a + 1] = np.asarray(next_obs, dtype=np.float32).reshape(-1)
        row[-1] = mask
        self.data[self.ptr].copy_(torch.from_numpy(row), non_blocking=False)
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample_rows(self, n: int) -> Tensor:
        """``n`` packed rows drawn uniformly with replacement from the filled part."""
        if self.size == 0:
            raise RuntimeError("sampling an empty replay buffer")
        idx = torch.randint(self.size, (n,), device=self.device, generator=self.generator)
        return self.data.index_select(0, idx)

    def unpack(self, rows: Tensor) -> Batch:
        obs, act, rew, next_obs, mask = rows.split(self._splits, dim=1)
        return Batch(obs, act, rew.squeeze(1), next_obs, mask.squeeze(1))

    def all(self) -> Batch:
        """The filled rows, oldest first (views when the ring has not wrapped)."""
        return self.unpack(self._filled())

    def _filled(self) -> Tensor:
        if self.size < self.capacity:
            return self.data[: self.size]
        return torch.cat([self.data[self.ptr :], self.data[: self.ptr]])

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Compact: the filled rows in storage order (CPU float32), the write position and the generator, so a
        resumed run samples exactly the rows an uninterrupted one would."""
        return {
            "rows": self.data[: self.size].cpu().clone(),
            "ptr": self.ptr,
            "capacity": self.capacity,
            "width": self.width,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        rows = state["rows"]
        if int(state["width"]) != self.width or rows.ndim != 2 or rows.shape[1] != self.width:
            raise CheckpointError(
                f"the saved replay buffer has rows of width {int(state['width'])}, this environment needs"
                f" {self.width}: resume with the same dataset and environment"
            )
        ptr = int(state["ptr"])
        if int(state["capacity"]) != self.capacity:  # another capacity: keep the newest rows, oldest first
            if rows.shape[0] == int(state["capacity"]):
                rows = torch.cat([rows[ptr:], rows[:ptr]])
            rows = rows[max(0, rows.shape[0] - self.capacity) :]
            ptr = rows.shape[0] % self.capacity
        self.data.zero_()
        self.data[: rows.shape[0]].copy_(rows.to(self.device))
        self.size, self.ptr = rows.shape[0], ptr
        # e.g. a CPU checkpoint resumed on CUDA: seeded stream
        with contextlib.suppress(RuntimeError, TypeError):
            self.generator.set_state(state["generator"])


def mixed_batch(online: ReplayBuffer, offline: TransitionBuffer, batch_size: int,
                online_fraction: float = 0.5) -> Batch:
    """Symmetric sampling (RLPD / paper Sec. 6.2): ``round(online_fraction * batch_size)`` rows from the
    online buffer (its first rows) and the rest from the offline dataset, each drawn with its own
    generator."""
    n_online = int(round(online_fraction * batch_size))
    parts = []
    if n_online > 0:
        parts.append(online.sample_rows(n_online))
    if batch_size - n_online > 0:
        idx = torch.randint(len(offline), (batch_size - n_online,), device=offline.device,
                            generator=offline.generator)
        parts.append(offline.data.index_select(0, idx).to(online.device))
    return online.unpack(torch.cat(parts) if len(parts) > 1 else parts[0])

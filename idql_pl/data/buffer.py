"""On-device transition storage with seeded index sampling (no per-sample `__getitem__` + collate)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

FIELDS = ("observations", "actions", "rewards", "next_observations", "masks")


class Batch(NamedTuple):
    """A batch of transitions; rewards and masks are 1-D, ``masks = 1 - terminal`` (docs/fidelity.md §1)."""

    observations: Tensor
    actions: Tensor
    rewards: Tensor
    next_observations: Tensor
    masks: Tensor

    def for_agents(self, num_agents: int) -> Batch:
        """The batch with a leading agent dimension: a ``[K, B, ...]`` batch (rewards ``[K, B]``) as it is, a
        ``[B, ...]`` batch shared by all ``num_agents`` agents (expanded views, no copy)."""
        if self.rewards.dim() == 2:
            if self.rewards.shape[0] != num_agents:
                raise ValueError(f"a batch of {self.rewards.shape[0]} agents for a model of"
                                 f" {num_agents} agents")
            return self
        return Batch(*(t.expand(num_agents, *t.shape) for t in self))


class TransitionBuffer:
    """Transitions packed into one ``[N, D]`` float32 tensor; ``sample`` is one ``randint`` + one
    ``index_select``.

    ``sample(batch_size, num_agents=K)`` draws ``[K, B, ...]``, agent ``k`` from its own generator seeded
    ``seed + k`` (agent 0's is the single-run generator, so a one-agent batch is the single run's batch). The
    buffer deliberately has no ``.to`` method, so Lightning hands the same object to ``training_step``
    untouched: models draw their own batches (critic 256, actor 1024, ...) from it, and Lightning's
    one-batch prefetch cannot advance the sampling generator ahead of the checkpoint.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray | Tensor], seed: int = 0,
                 device: str | torch.device = "cpu"):
        columns = [torch.as_tensor(np.asarray(arrays[k]), dtype=torch.float32) for k in FIELDS]
        n = columns[0].shape[0]
        columns = [c.reshape(n, -1) for c in columns]
        self.obs_dim = columns[0].shape[1]
        self.action_dim = columns[1].shape[1]
        self._splits = [c.shape[1] for c in columns]
        self.data = torch.cat(columns, dim=1).contiguous()
        self.seed = seed
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.agent_generators: list[torch.Generator] = []  # agents 1, 2, ...: seeds seed + 1, seed + 2, ...
        self.move_to(device)

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def device(self) -> torch.device:
        return self.data.device

    def move_to(self, device: str | torch.device) -> TransitionBuffer:
        """Move the storage (and a fresh generator of the same state) to ``device``."""
        device = torch.device(device)
        self.data = self.data.to(device)
        self.generator = self._moved(self.generator, device, self.seed)
        self.agent_generators = [self._moved(g, device, self.seed + 1 + i)
                                 for i, g in enumerate(self.agent_generators)]
        return self

    @staticmethod
    def _moved(generator: torch.Generator, device: torch.device, seed: int) -> torch.Generator:
        moved = torch.Generator(device=device)
        if device.type == "cpu":
            moved.set_state(generator.get_state())
        else:
            moved.manual_seed(seed)
        return moved

    def _generators(self, num_agents: int) -> list[torch.Generator]:
        while len(self.agent_generators) < num_agents - 1:
            seed = self.seed + 1 + len(self.agent_generators)
            self.agent_generators.append(torch.Generator(device=self.device).manual_seed(seed))
        return [self.generator, *self.agent_generators[: num_agents - 1]]

    def sample(self, batch_size: int, num_agents: int | None = None) -> Batch:
        """Draw ``batch_size`` transitions uniformly with replacement (paper App. D): ``[B, ...]``, or with
        ``num_agents`` a ``[K, B, ...]`` batch, agent ``k``'s rows from agent ``k``'s generator (one
        ``randint`` per agent, one ``index_select`` for all)."""
        if num_agents is None:
            idx = torch.randint(len(self), (batch_size,), device=self.device, generator=self.generator)
            return self.gather(idx)
        idx = torch.stack([torch.randint(len(self), (batch_size,), device=self.device, generator=g)
                           for g in self._generators(num_agents)])
        return self.gather(idx)

    def fixed_batch(self, batch_size: int, seed: int = 12345) -> Batch:
        """The same rows at every call (validation losses), drawn without touching any training RNG."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        idx = torch.randint(len(self), (min(batch_size, len(self)),), generator=gen)
        return self.gather(idx.to(self.device))

    def gather(self, idx: Tensor) -> Batch:
        """The rows ``idx`` (any shape ``[...]``) as a batch of fields ``[..., D]`` (rewards, masks
        ``[...]``)."""
        rows = self.data.index_select(0, idx.reshape(-1)).view(*idx.shape, self.data.shape[1])
        obs, act, rew, next_obs, mask = rows.split(self._splits, dim=-1)
        return Batch(obs, act, rew.squeeze(-1), next_obs, mask.squeeze(-1))

    def all(self) -> Batch:
        """The whole buffer as one batch (views, no copy)."""
        obs, act, rew, next_obs, mask = self.data.split(self._splits, dim=1)
        return Batch(obs, act, rew.squeeze(1), next_obs, mask.squeeze(1))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"generator": self.generator.get_state()}
        if self.agent_generators:
            state["agent_generators"] = [g.get_state() for g in self.agent_generators]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the sampling generators (a state saved before agents existed holds agent 0's only)."""
        self.generator.set_state(state["generator"])
        agents = state.get("agent_generators", [])
        self._generators(len(agents) + 1)
        for generator, saved in zip(self.agent_generators, agents):
            generator.set_state(saved)


class BufferStream:
    """The training 'dataloader': yields the same buffer forever (``trainer.max_steps`` ends the run)."""

    def __init__(self, buffer: TransitionBuffer):
        self.buffer = buffer

    def __iter__(self) -> Iterator[TransitionBuffer]:
        while True:
            yield self.buffer

"""RNG states in checkpoints: restored exactly, and only for the devices that exist where a run resumes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from idql_pl.training import rng


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_restore_repeats_the_draws() -> None:
    state = rng.capture_rng_state()
    first = _draws()
    rng.restore_rng_state(state)
    assert _draws() == first


def test_more_saved_cuda_states_than_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint written on an 8-GPU node resumes on a machine with one GPU (or on `--trainer.devices 1`):
    device 0's generator is restored and the other seven states are left alone, instead of an IndexError."""
    calls: list[tuple[int, torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": calls.append((device, state)))

    def set_all(states: list[torch.Tensor]) -> None:  # as on a real 1-GPU machine: device 1 does not exist
        raise IndexError("list index out of range")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    state = rng.capture_rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    rng.restore_rng_state(state)
    assert [device for device, _ in calls] == [0]
    assert torch.equal(calls[0][1], state["cuda"][0])


def test_states_on_another_device_are_read_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """``map_location`` may put the saved states on a GPU: they are copied to the host before ``.numpy()`` and
    ``set_rng_state`` (which take CPU tensors). Here a tensor subclass stands in for a CUDA tensor: it refuses
    ``.numpy()`` and ``set_rng_state`` until ``.cpu()`` was called."""

    class OnDevice(torch.Tensor):
        def numpy(self, *args, **kwargs):  # noqa: D102 - as a CUDA tensor does
            raise TypeError("can't convert cuda:0 device type tensor to numpy")

        def cpu(self, *args, **kwargs):  # noqa: D102
            return torch.Tensor(self.as_subclass(torch.Tensor))

    real_set = torch.set_rng_state

    def set_state(new_state: torch.Tensor) -> None:
        if type(new_state) is OnDevice:
            raise TypeError("RNG state must be a torch.ByteTensor on the CPU")
        real_set(new_state)

    monkeypatch.setattr(torch, "set_rng_state", set_state)
    state = rng.capture_rng_state()
    first = _draws()
    state["numpy"] = state["numpy"].as_subclass(OnDevice)
    state["torch"] = state["torch"].as_subclass(OnDevice)
    rng.restore_rng_state(state)
    assert _draws() == first

"""Test environment: offline, deterministic, small. Dataset caches live in one per-session temp dir."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MUJOCO_GL", "disable")
# tiny test nets gain nothing from threads; spin-waits hurt on 2 cores
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_dataset_dirs(tmp_path_factory):
    """Point every dataset cache at a session temp dir so tests never touch ~/.d4rl or ~/.minari."""
    root = tmp_path_factory.mktemp("datasets")
    keys = ("D4RL_DATASET_DIR", "MINARI_DATASETS_PATH", "IDQL_DATA_DIR")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = str(root / k.lower())
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def aot_eager(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``torch.compile`` with the ``aot_eager`` backend (traced forward and backward, no C++ build; other
    options, e.g. ``fullgraph``, kept); returns the names of the functions it wrapped."""
    real, wrapped = torch.compile, []

    def compile_(fn, *args, **kwargs):
        wrapped.append(getattr(fn, "__qualname__", repr(fn)))
        options = {k: v for k, v in kwargs.items() if k != "mode"}
        return real(fn, **options, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    yield wrapped
    torch._dynamo.reset()

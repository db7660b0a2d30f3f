"""Each bad input exits 2 with one ``error:`` line naming the problem and the fix, no traceback, and leaves
the existing run folder untouched (docs/operations.md, "Errors")."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import zipfile

import h5py
import numpy as np
import pytest
import torch

from idql_pl.data import registry
from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, run_cli


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                   "--run_root", root, "--run_name", "good") == 0
    return root


def _digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _d4rl_file(path, n=50, obs_dim=11, act_dim=3, nan_obs=False):
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n, obs_dim)).astype(np.float32)
    if nan_obs:
        obs[7, 3] = np.nan
    with h5py.File(path, "w") as f:
        f["observations"] = obs
        f["actions"] = rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32)
        f["rewards"] = rng.normal(size=n).astype(np.float32)
        f["terminals"] = np.zeros(n, bool)
        timeouts = np.zeros(n, bool)
        timeouts[24::25] = True
        f["timeouts"] = timeouts
    return path


def _fails(capsys, run_root, *args, expect: tuple[str, ...]) -> str:
    before = _digest(run_root)
    code = run_cli(*args, "--run_root", run_root)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for word in expect:
        assert word.lower() in lines[0].lower(), lines[0]
    assert _digest(run_root) == before, "a failed command changed the existing run folder"
    print(f"\n[{args[-1] if len(args) else ''}] {lines[0]}")
    return lines[0]


FIT = ("fit", "--config", CONFIGS / "quickstart.yaml", *TINY_IDQL, *TINY_TRAINER)
FIT_D4RL = ("fit", "--config", CONFIGS / "loco.yaml", *TINY_IDQL, *TINY_TRAINER)


def test_unknown_dataset(capsys, run_root):
    _fails(capsys, run_root, *FIT_D4RL, "--data.dataset", "hopper-medum-v2", expect=("hopper-medum-v2",))


def test_unknown_dataset_with_the_quickstart_config(capsys, run_root):
    """The quickstart config sets dataset_size (a local-recipe option): the misspelt name is what the line
    says."""
    _fails(capsys, run_root, *FIT, "--data.dataset", "no-such-dataset-v9",
           expect=("unknown dataset", "no-such-dataset-v9"))


def test_dataset_unreachable_offline(capsys, run_root, monkeypatch):
    spec = registry.D4RL_DATASETS["hopper-medium-v2"]
    monkeypatch.setitem(registry.D4RL_DATASETS, "hopper-medium-v2",
                        dataclasses.replace(spec, url="http://127.0.0.1:9/hopper_medium-v2.hdf5"))
    line = _fails(capsys, run_root, *FIT_D4RL, "--data.dataset", "hopper-medium-v2", expect=("hopper",))
    assert "127.0.0.1:9" in line or "download" in line.lower()
    assert not any(p.suffix in {".tmp", ".part"} for p in (run_root.parent).rglob("*hopper*"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_hdf5(capsys, run_root, tmp_path, damage):
    path = _d4rl_file(tmp_path / "hopper-medium-v2.hdf5", n=400)
    data = path.read_bytes()
    path.write_bytes(os.urandom(4096) if damage == "garbage" else data[: len(data) // 2])
    _fails(capsys, run_root, *FIT_D4RL, "--data.dataset", path, expect=("hopper-medium-v2.hdf5",))


def test_nan_in_observations(capsys, run_root, tmp_path):
    path = _d4rl_file(tmp_path / "hopper-medium-v2.hdf5", nan_obs=True)
    _fails(capsys, run_root, *FIT_D4RL, "--data.dataset", path, expect=("observations", "nan"))


def test_checkpoint_from_other_dimensions(capsys, run_root):
    ckpt = run_root / "good" / "last.ckpt"  # trained on pointmaze: obs 4, action 2; the bandit has obs 1
    _fails(capsys, run_root, "validate", "--config", CONFIGS / "quickstart.yaml", *TINY_IDQL,
           "--data.dataset", "local/bandit", "--trainer.accelerator", "cpu", "--ckpt_path", ckpt,
           expect=("obs_dim=4", "obs_dim=1"))


def test_checkpoint_path_missing(capsys, run_root):
    _fails(capsys, run_root, *FIT, *SMALL_MAZE, "--ckpt_path", run_root / "nope" / "last.ckpt",
           expect=("does not exist",))


def test_resume_without_a_run(capsys, run_root):
    _fails(capsys, run_root, *FIT, *SMALL_MAZE, "--run_name", "never-ran", "--ckpt_path", "last",
           expect=("never-ran", "--run_name"))


def test_config_typo(capsys, run_root):
    _fails(capsys, run_root, *FIT, *SMALL_MAZE, "--model.critic.tauu", "0.8", expect=("tauu", "--help"))


@pytest.mark.parametrize(
    "override, words",
    [
        (("--model.critic.tau", "1.5"), ("tau", "(0, 1)")),
        (("--model.critic.tau", "0"), ("tau", "(0, 1)")),
        (("--model.num_samples", "0"), ("num_samples", ">= 1")),
        (("--model.behavior.T", "0"), ("T", ">= 1")),
        (("--model.critic.batch_size", "-4"), ("batch_size", ">= 1")),
        (("--model.behavior.batch_size", "-1"), ("batch_size", ">= 1")),
        (("--eval.num_episodes", "0"), ("num_episodes", ">= 1")),
        (("--trainer.max_steps", "-5"), ("max_steps", "positive")),
        (("--trainer.precision", "16-mixed"), ("16-mixed", "bf16-mixed")),
        (("--trainer.precision", "bf16-true"), ("bf16-true", "bf16-mixed")),
    ],
)
def test_invalid_hyperparameters(capsys, run_root, override, words):
    _fails(capsys, run_root, *FIT, *SMALL_MAZE, *override, expect=words)


def test_environment_cannot_be_created(capsys, run_root, tmp_path, monkeypatch):
    import gymnasium

    def broken_make(*args, **kwargs):
        raise gymnasium.error.DependencyNotInstalled("No module named 'mujoco'")

    monkeypatch.setattr(gymnasium, "make", broken_make)
    path = _d4rl_file(tmp_path / "hopper_medium-v2.hdf5")  # D4RL's own file name: its env is known
    _fails(capsys, run_root, *FIT_D4RL, "--data.dataset", path, expect=("Hopper", "pip install"))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['IDQL_PWNED']}",))


def test_malicious_checkpoint_is_refused(capsys, run_root, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("IDQL_PWNED", str(marker))
    good = torch.load(run_root / "good" / "last.ckpt", map_location="cpu", weights_only=True)
    good["extra"] = _Payload()
    evil = tmp_path / "evil.ckpt"
    torch.save(good, evil)
    _fails(capsys, run_root, "validate", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL,
           "--trainer.accelerator", "cpu", "--ckpt_path", evil, expect=("refused",))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # and torch agrees it is unsafe
        torch.load(evil, weights_only=True)
    assert zipfile.is_zipfile(evil)

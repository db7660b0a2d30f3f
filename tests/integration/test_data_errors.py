"""Every bad input is a one-line DatasetError/EvalEnvError naming the problem and the fix; nothing left
behind."""

import dataclasses
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest

from idql_pl.data import OfflineDataModule, load_dataset, registry
from idql_pl.data.d4rl import dataset_dir
from idql_pl.errors import DatasetError, EvalEnvError, IDQLError

# discard port on localhost: refused at once, never another host
CLOSED_PORT_URL = "http://127.0.0.1:9/x.hdf5"


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


def _write(path, **overrides):
    n = 6
    data = {
        "observations": np.zeros((n, 3), np.float32),
        "actions": np.zeros((n, 2), np.float32),
        "rewards": np.zeros(n, np.float32),
        "terminals": np.zeros(n, bool),
        "timeouts": np.zeros(n, bool),
    }
    data.update(overrides)
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            if v is not None:
                f.create_dataset(k, data=v)
    return path


def test_unknown_dataset_name_suggests():
    with pytest.raises(DatasetError) as e:
        load_dataset("hopper-medum-v2")
    msg = _one_line(e.value)
    assert "unknown dataset 'hopper-medum-v2'" in msg and "hopper-medium-v2" in msg and "Minari id" in msg
    with pytest.raises(DatasetError, match="unknown local recipe 'local/cartpole'.*local/pointmaze-umaze"):
        load_dataset("local/cartpole")


def test_offline_download_fails_fast_and_leaves_nothing(monkeypatch):
    spec = registry.D4RL_DATASETS["halfcheetah-expert-v2"]
    monkeypatch.setitem(registry.D4RL_DATASETS, spec.name, dataclasses.replace(spec, url=CLOSED_PORT_URL))
    before = set(dataset_dir().glob("*")) if dataset_dir().exists() else set()
    t0 = time.perf_counter()
    with pytest.raises(DatasetError) as e:
        OfflineDataModule("halfcheetah-expert-v2")
    elapsed = time.perf_counter() - t0
    msg = _one_line(e.value)
    assert elapsed < 10, elapsed
    assert CLOSED_PORT_URL in msg and "D4RL_DATASET_DIR" in msg and str(dataset_dir() / "x.hdf5") in msg
    assert set(dataset_dir().glob("*")) == before  # no .part file, no empty dataset


def test_minari_offline_fails_fast_and_leaves_nothing():
    from minari.storage.datasets_root_dir import get_dataset_path

    t0 = time.perf_counter()
    with pytest.raises(DatasetError) as e:
        load_dataset("D4RL/pointmaze/umaze-v2")
    assert time.perf_counter() - t0 < 10
    msg = _one_line(e.value)
    assert "minari download D4RL/pointmaze/umaze-v2" in msg and "MINARI_DATASETS_PATH" in msg
    assert not Path(get_dataset_path("D4RL/pointmaze/umaze-v2")).exists()


def test_malformed_minari_id():
    with pytest.raises(DatasetError, match="malformed Minari dataset id 'foo/bar'"):
        load_dataset("foo/bar")


def test_dataset_size_does_not_block_other_datasets(capsys, monkeypatch):
    """A recipe-only option (the quickstart config sets dataset_size) is ignored, with a note, for a D4RL
    file: the run goes on to load that file, here the canonical one, which is absent and unreachable
    offline."""
    from idql_pl.data import d4rl

    def no_download(*args, **kwargs):
        raise DatasetError("offline")

    monkeypatch.setattr(d4rl, "load_d4rl", no_download)
    with pytest.raises(DatasetError, match="offline"):
        load_dataset("hopper-medium-v2", dataset_size=10)
    assert ("dataset_size 10 applies to local recipes only: ignored for 'hopper-medium-v2'"
            in capsys.readouterr().err)


def test_unknown_dataset_is_named_before_recipe_options():
    with pytest.raises(DatasetError, match="unknown dataset 'no-such-dataset-v9'"):
        load_dataset("no-such-dataset-v9", dataset_size=200_000)


def test_missing_local_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(str(tmp_path / "nothing.hdf5"))


def test_corrupt_and_truncated_hdf5(tmp_path):
    junk = tmp_path / "junk.hdf5"
    junk.write_bytes(b"<html>proxy error</html>" * 100)
    with pytest.raises(DatasetError) as e:
        load_dataset(str(junk))
    assert "not a readable HDF5 file" in _one_line(e.value) and "re-create or re-download" in str(e.value)
    good = _write(tmp_path / "hopper_expert-v2.hdf5", observations=np.zeros((5000, 11), np.float32),
                  actions=np.zeros((5000, 3), np.float32), rewards=np.zeros(5000, np.float32),
                  terminals=np.zeros(5000, bool), timeouts=np.zeros(5000, bool))
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DatasetError) as e:
        load_dataset(str(good))
    msg = _one_line(e.value)
    assert "hopper-expert-v2" in msg and registry.D4RL_DATASETS["hopper-expert-v2"].url in msg


def test_missing_keys(tmp_path):
    path = _write(tmp_path / "m.hdf5", terminals=None)
    with pytest.raises(DatasetError) as e:
        load_dataset(str(path))
    assert "missing key(s) terminals" in _one_line(e.value)


def test_mismatched_lengths(tmp_path):
    path = _write(tmp_path / "l.hdf5", actions=np.zeros((5, 2), np.float32))
    with pytest.raises(DatasetError, match=r"mismatched lengths \(observations=6, actions=5"):
        load_dataset(str(path))


def test_nan_and_inf(tmp_path):
    rewards = np.zeros(6, np.float32)
    rewards[[1, 3]] = [np.nan, np.inf]
    path = _write(tmp_path / "n.hdf5", rewards=rewards)
    with pytest.raises(DatasetError) as e:
        load_dataset(str(path))
    assert "'rewards' contains 2 NaN/inf" in _one_line(e.value) and "re-download" in str(e.value)


def test_actions_outside_range(tmp_path):
    actions = np.zeros((6, 2), np.float32)
    actions[2, 1] = -3.25
    path = _write(tmp_path / "a.hdf5", actions=actions)
    with pytest.raises(DatasetError) as e:
        load_dataset(str(path))
    msg = _one_line(e.value)
    assert "|a| = 3.25" in msg and "rescale" in msg


def test_wrong_ndim(tmp_path):
    path = _write(tmp_path / "d.hdf5", observations=np.zeros(6, np.float32))
    with pytest.raises(DatasetError, match="'observations' has shape \\(6,\\) but must be 2-D"):
        load_dataset(str(path))


def test_bad_options():
    with pytest.raises(DatasetError, match="val_fraction"):
        OfflineDataModule("local/bandit", dataset_size=200, val_fraction=1.0)
    with pytest.raises(DatasetError, match="unknown reward_transform"):
        OfflineDataModule("local/bandit", dataset_size=200, reward_transform="scaled")
    with pytest.raises(DatasetError, match="action_clip"):
        OfflineDataModule("local/bandit", dataset_size=200, action_clip=1.5)
    with pytest.raises(DatasetError, match="dataset_size must be positive"):
        load_dataset("local/bandit", dataset_size=0)


def test_no_reference_scores_and_no_env(tmp_path):
    dm = OfflineDataModule(str(_write(tmp_path / "custom.hdf5", rewards=np.arange(6, dtype=np.float32))))
    assert dm.info.ref_min_score is None and "none (normalized scores unavailable)" in dm.summary()
    with pytest.raises(DatasetError) as e:
        dm.normalized_score(1.0)
    assert "no reference scores" in _one_line(e.value)
    with pytest.raises(EvalEnvError) as e:
        dm.make_env()
    assert "no evaluation environment" in _one_line(e.value)


def test_env_creation_failure_is_one_line(monkeypatch):
    dm = OfflineDataModule("local/bandit", dataset_size=200)

    def broken():
        raise gym.error.DependencyNotInstalled("mujoco is not installed")

    monkeypatch.setattr(dm, "_env_factory", broken)
    for call in (dm.make_env, lambda: dm.make_vector_env(2)):
        with pytest.raises(EvalEnvError) as e:
            call()
        msg = _one_line(e.value)
        assert "idql_pl/Bandit2D-v0" in msg and "pip install 'gymnasium[mujoco]'" in msg


def test_minari_dataset_without_env_or_scores():
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    buf = EpisodeBuffer(observations=np.zeros((4, 3)), actions=np.zeros((3, 2)), rewards=np.zeros(3),
                        terminations=np.array([0, 0, 1], bool), truncations=np.zeros(3, bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(
            "test/noenv-v0", [buf], observation_space=gym.spaces.Box(-1, 1, (3,)),
            action_space=gym.spaces.Box(-1, 1, (2,)),
        )
    dm = OfflineDataModule("test/noenv-v0")
    assert dm.info.num_transitions == 3 and dm._arrays["masks"].tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(DatasetError, match="no reference scores"):
        dm.normalized_score(np.zeros(2))
    with pytest.raises(EvalEnvError):
        dm.make_env()


def test_cli_prints_one_line_error_and_exit_code_2():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "idql_pl.data", "no-such-dataset"], capture_output=True,
                          text=True, env=env, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == IDQLError.exit_code == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "unknown dataset 'no-such-dataset'" in lines[0]

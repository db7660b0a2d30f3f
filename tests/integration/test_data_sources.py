"""Sources (synthetic D4RL hdf5, tiny Minari dataset, local recipe) through OfflineDataModule, offline."""

import os
import warnings

import gymnasium as gym
import h5py
import lightning as L
import numpy as np
import pytest
import torch

from idql_pl.data import OfflineDataModule, TransitionBuffer
from idql_pl.data.d4rl import dataset_dir
from idql_pl.data.registry import D4RL_DATASETS, get_d4rl_spec

POINTMAZE_SIZE = 6000  # same size as tests/unit/test_local_recipes.py, so the session generates it once


def write_d4rl(path, obs_dim=11, act_dim=3, seed=0):
    """3 episodes: 5 rows ending in a terminal, 4 rows ending in a timeout, 3 rows ending at the file end."""
    rng = np.random.default_rng(seed)
    n = 12
    data = {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
        "rewards": rng.uniform(0, 2, size=n).astype(np.float32),
        "terminals": np.zeros(n, bool),
        "timeouts": np.zeros(n, bool),
    }
    data["terminals"][4] = True
    data["timeouts"][[8, 11]] = True
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
        f.create_dataset("infos/qpos", data=np.zeros((n, 2)))
    return data


def test_d4rl_local_path_with_known_name(tmp_path, monkeypatch):
    # mujoco writes MUJOCO_LOG.TXT (deprecation warnings of the v4 xmls) to the cwd
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "hopper_medium-v2.hdf5"
    raw = write_d4rl(path)
    dm = OfflineDataModule(str(path))
    info = dm.info
    assert ((info.name, info.source, info.family, info.env_id)
            == ("hopper-medium-v2", "d4rl", "locomotion", "Hopper-v4"))
    assert (info.ref_min_score, info.ref_max_score, info.max_episode_steps) == (-20.272305, 3234.3, 1000)
    keep = np.array([0, 1, 2, 3, 4, 5, 6, 7, 9, 10])  # timeouts 8, 11 and the last row dropped
    a = dm._arrays
    np.testing.assert_array_equal(a["observations"], raw["observations"][keep])
    np.testing.assert_array_equal(a["next_observations"], raw["observations"][keep + 1])
    np.testing.assert_array_equal(a["masks"], np.where(keep == 4, 0.0, 1.0))
    r = raw["rewards"].astype(np.float64)
    returns = np.array([r[0:5].sum(), r[5:8].sum(), r[9:11].sum()])
    scale = 1000.0 / (returns.max() - returns.min())
    assert info.reward_transform == "locomotion" and info.reward_scale == pytest.approx(scale)
    np.testing.assert_allclose(a["rewards"], raw["rewards"][keep] * scale, rtol=1e-5)
    assert (info.num_transitions, info.num_episodes) == (10, 3)
    assert info.return_max == pytest.approx(returns.max(), rel=1e-6)
    assert dm.normalized_score(3234.3) == pytest.approx(100.0)
    env = dm.make_env()
    obs, _ = env.reset(seed=0)
    assert obs.shape == (11,) and obs.dtype == np.float32 and env.spec.max_episode_steps == 1000
    env.close()


def test_d4rl_name_from_dataset_dir_without_network():
    spec = D4RL_DATASETS["walker2d-medium-replay-v2"]
    assert spec.url == "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/walker2d_medium_replay-v2.hdf5"
    dataset_dir().mkdir(parents=True, exist_ok=True)
    write_d4rl(dataset_dir() / spec.filename, obs_dim=17, act_dim=6)
    dm = OfflineDataModule("walker2d-medium-replay-v2", reward_transform="none")
    assert (dm.obs_dim, dm.action_dim, dm.info.env_id, dm.info.reward_scale) == (17, 6, "Walker2d-v4", 1.0)


@pytest.mark.parametrize(
    ("name", "obs_dim", "act_dim"),
    [("hopper-random-v2", 11, 3), ("halfcheetah-medium-v2", 17, 6), ("walker2d-expert-v2", 17, 6),
     ("antmaze-medium-diverse-v2", 29, 8), ("antmaze-large-play-v0", 29, 8), ("maze2d-large-v1", 4, 2)],
)
def test_d4rl_eval_envs_match_d4rl_dimensions(name, obs_dim, act_dim, tmp_path, monkeypatch):
    from idql_pl.data.d4rl import make_d4rl_env

    monkeypatch.chdir(tmp_path)  # keep MUJOCO_LOG.TXT out of the repository

    env = make_d4rl_env(name)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (obs_dim,) and obs.dtype == np.float32 and env.action_space.shape == (act_dim,)
    assert env.spec.max_episode_steps == D4RL_DATASETS[name].max_episode_steps
    obs, r, *_ = env.step(env.action_space.sample())
    assert obs.shape == (obs_dim,) and np.isfinite(r)
    env.close()


def test_registry_covers_the_paper_datasets():
    for env in ("hopper", "halfcheetah", "walker2d"):
        for level in ("random", "medium", "medium-replay", "medium-expert", "expert"):
            assert f"{env}-{level}-v2" in D4RL_DATASETS
    for task in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse"):
        spec = D4RL_DATASETS[f"antmaze-{task}-v2"]
        assert (spec.ref_min_score, spec.ref_max_score) == (0.0, 1.0) and "ant_maze_v2" in spec.url
        assert spec.max_episode_steps == (700 if task.startswith("umaze") else 1000)
    for maze, limit in (("umaze", 300), ("medium", 600), ("large", 800)):
        assert D4RL_DATASETS[f"maze2d-{maze}-v1"].max_episode_steps == limit
    assert D4RL_DATASETS["maze2d-umaze-v1"].ref_max_score == 161.86
    assert get_d4rl_spec("antmaze_whatever.hdf5") is None


@pytest.fixture(scope="module")
def tiny_minari():
    """A tiny real Minari dataset recorded in gymnasium-robotics' PointMaze (dict observations)."""
    import gymnasium_robotics
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    gym.register_envs(gymnasium_robotics)
    env = gym.make("PointMaze_UMaze-v3")
    rng = np.random.default_rng(0)
    buffers, firsts = [], []
    for ep in range(3):
        obs, _ = env.reset(seed=ep)
        keys = ("achieved_goal", "desired_goal", "observation")
        seq = {k: [obs[k]] for k in keys}
        acts, rews = [], []
        for _ in range(20):
            a = rng.uniform(-1, 1, 2).astype(np.float32)
            obs, r, _, _, _ = env.step(a)
            acts.append(a)
            rews.append(r)
            for k in keys:
                seq[k].append(obs[k])
        firsts.append(np.concatenate([seq[k][0] for k in keys]))
        buffers.append(
            EpisodeBuffer(
                observations={k: np.array(v) for k, v in seq.items()}, actions=np.array(acts),
                rewards=np.array(rews), terminations=np.zeros(20, bool),
                truncations=np.r_[np.zeros(19, bool), True],
            )
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(
            "test/pointmaze-tiny-v0", buffers, env=env, ref_min_score=0.0, ref_max_score=10.0,
            author="t", author_email="t", code_permalink="t", algorithm_name="random", description="t",
        )
    env.close()
    os.remove(env.unwrapped.tmp_xml_file_path)  # gymnasium-robotics leaves its maze xml in /tmp
    return np.array(firsts)


def test_minari_dataset_flattened_in_sorted_key_order(tiny_minari):
    dm = OfflineDataModule("test/pointmaze-tiny-v0", seed=0)
    info = dm.info
    assert (dm.obs_dim, dm.action_dim, info.num_transitions, info.num_episodes) == (8, 2, 60, 3)
    assert ((info.source, info.family, info.ref_min_score, info.ref_max_score)
            == ("minari", "maze2d", 0.0, 10.0))
    assert info.max_episode_steps == 300 and info.env_id == "PointMaze_UMaze-v3"
    obs = dm._arrays["observations"]
    np.testing.assert_allclose(obs[[0, 20, 40]], tiny_minari, rtol=1e-6)  # achieved | desired | observation
    np.testing.assert_array_equal(dm._arrays["next_observations"][:19], obs[1:20])
    assert np.all(dm._arrays["masks"] == 1.0)  # truncations are not terminals
    env = dm.make_env()
    o, _ = env.reset(seed=0)
    assert o.shape == (8,) and o.dtype == np.float32
    np.testing.assert_allclose(o[:2], o[4:6])  # achieved_goal == observation[:2]: same order as the data
    o2, *_ = env.step(np.zeros(2, np.float32))
    assert o2.shape == (8,)
    env.close()
    os.remove(env.unwrapped.tmp_xml_file_path)


@pytest.fixture(scope="module")
def pointmaze_dm():
    return OfflineDataModule("local/pointmaze-umaze", dataset_size=POINTMAZE_SIZE, seed=7)


def test_datamodule_attributes_before_setup(pointmaze_dm):
    dm = pointmaze_dm
    assert (dm.obs_dim, dm.action_dim) == (4, 2) and dm.info.num_transitions == POINTMAZE_SIZE
    assert "transitions      6,000" in dm.summary() and "reference min/max" in dm.summary()
    assert dm.reward_fn(1.0) == 1.0
    assert dm.hparams["dataset"] == "local/pointmaze-umaze"


def test_setup_builds_one_copy_and_is_idempotent():
    dm = OfflineDataModule("local/pointmaze-umaze", dataset_size=POINTMAZE_SIZE, seed=7)
    dm.setup("fit")
    buf = dm.train_buffer
    assert isinstance(buf, TransitionBuffer) and len(buf) == POINTMAZE_SIZE and dm._arrays is None
    assert buf.seed == 7 and buf.device == torch.device("cpu") and dm.val_buffer is None
    dm.setup("validate")
    assert dm.train_buffer is buf
    assert next(iter(dm.train_dataloader())) is buf
    assert list(dm.val_dataloader()) == [buf]  # one item per validation run: the train buffer here


def test_seed_defaults_to_torch_initial_seed():
    torch.manual_seed(1234)
    dm = OfflineDataModule("local/pointmaze-umaze", dataset_size=POINTMAZE_SIZE)
    dm.setup()
    assert dm.train_buffer.seed == 1234


def test_val_split_is_seeded_and_disjoint():
    def split(seed):
        dm = OfflineDataModule("local/pointmaze-umaze", dataset_size=POINTMAZE_SIZE, val_fraction=0.1,
                               seed=seed)
        dm.setup()
        return dm

    a, b, c = split(3), split(3), split(4)
    assert len(a.val_buffer) == 600 and len(a.train_buffer) == 5400
    torch.testing.assert_close(a.val_buffer.data, b.val_buffer.data)
    assert not torch.equal(a.val_buffer.data, c.val_buffer.data)
    rows = torch.cat([a.train_buffer.data, a.val_buffer.data])
    assert torch.unique(rows, dim=0).shape[0] == POINTMAZE_SIZE  # a partition of the data
    assert list(a.val_dataloader()) == [a.val_buffer]


def test_state_dict_roundtrip_before_and_after_setup():
    dm = OfflineDataModule("local/pointmaze-umaze", dataset_size=POINTMAZE_SIZE, seed=5)
    dm.setup()
    dm.train_buffer.sample(3)
    state = dm.state_dict()
    assert set(state) == {"train_buffer", "train_seed"}
    assert isinstance(state["train_buffer"]["generator"], torch.Tensor)
    first = dm.train_buffer.sample(16).observations
    dm.load_state_dict(state)
    torch.testing.assert_close(dm.train_buffer.sample(16).observations, first)
    fresh = OfflineDataModule("local/pointmaze-umaze", dataset_size=POINTMAZE_SIZE, seed=99)
    fresh.load_state_dict(state)  # Lightning may restore before setup: applied once the buffer exists
    fresh.setup()
    torch.testing.assert_close(fresh.train_buffer.sample(16).observations, first)


def test_normalized_score_keeps_type(pointmaze_dm):
    dm = pointmaze_dm
    lo, hi = dm.info.ref_min_score, dm.info.ref_max_score
    assert isinstance(dm.normalized_score(lo), float) and dm.normalized_score(lo) == pytest.approx(0.0)
    out = dm.normalized_score(np.array([lo, hi]))
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, [0.0, 100.0])
    t = dm.normalized_score(torch.tensor([hi], dtype=torch.float64))
    assert isinstance(t, torch.Tensor) and t.item() == pytest.approx(100.0)
    assert dm.normalized_score([hi, lo]) == pytest.approx([100.0, 0.0])


def test_make_env_and_vector_env_match_dataset(pointmaze_dm):
    env = pointmaze_dm.make_env()
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4,) and obs.dtype == np.float32 and env.spec.max_episode_steps == 300
    env.close()
    venv = pointmaze_dm.make_vector_env(3)
    obs, _ = venv.reset(seed=0)
    assert obs.shape == (3, 4) and obs.dtype == np.float32
    obs, rew, term, trunc, _ = venv.step(np.zeros((3, 2), np.float32))
    assert rew.shape == (3,) and not term.any()
    venv.close()


class _DrawModel(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.draws, self.val_batches = [], []

    def training_step(self, buffer, batch_idx):
        batch = buffer.sample(32)
        self.draws.append(batch.observations.clone())
        return self.lin(batch.observations).pow(2).mean()

    def validation_step(self, buffer, batch_idx):
        self.val_batches.append(type(buffer))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(tmp_path, max_steps):
    return L.Trainer(
        max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        enable_checkpointing=False,
    )


def test_lightning_fit_validate_and_resume_draws(tmp_path):
    full = _DrawModel()
    _trainer(tmp_path, 4).fit(full, datamodule=OfflineDataModule("local/pointmaze-umaze",
                                                                 dataset_size=POINTMAZE_SIZE, seed=11))
    assert len(full.draws) == 4 and full.val_batches == [TransitionBuffer, TransitionBuffer]
    half = _DrawModel()
    trainer = _trainer(tmp_path, 2)
    trainer.fit(half,
                datamodule=OfflineDataModule("local/pointmaze-umaze", dataset_size=POINTMAZE_SIZE, seed=11))
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = torch.load(ckpt, weights_only=True)
    assert isinstance(loaded["OfflineDataModule"]["train_buffer"]["generator"], torch.Tensor)
    resumed = _DrawModel()
    _trainer(tmp_path, 4).fit(
        resumed, datamodule=OfflineDataModule("local/pointmaze-umaze", dataset_size=POINTMAZE_SIZE, seed=11),
        ckpt_path=ckpt
    )
    assert len(resumed.draws) == 2
    for got, want in zip(resumed.draws, full.draws[2:], strict=True):
        torch.testing.assert_close(got, want)

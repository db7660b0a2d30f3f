"""Own datasets: a D4RL-layout file under any name, or a Minari dataset without metadata, gets its evaluation
env, reference scores, family and episode limit from --data.* options; the summary says where each came
from."""

import warnings

import gymnasium as gym
import numpy as np
import pytest

from idql_pl.data import OfflineDataModule
from idql_pl.errors import DatasetError, EvalEnvError
from tests.helpers import TINY_IDQL, TINY_TRAINER, read_csv, run_cli
from tests.integration.test_data_sources import write_d4rl

HOPPER_REF = [-20.272305, 3234.3]


@pytest.fixture
def own_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # mujoco writes MUJOCO_LOG.TXT to the cwd
    path = tmp_path / "my_data.hdf5"  # not a D4RL file name: nothing can be inferred
    write_d4rl(path)
    return path


def test_nothing_inferred_from_an_arbitrary_name(own_file):
    dm = OfflineDataModule(str(own_file))
    info = dm.info
    assert ((info.env_id, info.ref_min_score, info.max_episode_steps, info.family)
            == (None, None, None, "other"))
    assert info.provenance["family"] == "inferred from the file name"
    with pytest.raises(EvalEnvError, match="--data.eval_env"):
        dm.make_env()


def test_given_settings_and_their_provenance(own_file):
    dm = OfflineDataModule(str(own_file), eval_env="Hopper-v4", ref_scores=HOPPER_REF, family="locomotion",
                           max_episode_steps=50)
    info = dm.info
    assert ((info.env_id, info.ref_min_score, info.ref_max_score, info.max_episode_steps)
            == ("Hopper-v4", *HOPPER_REF, 50))
    # family chose the reward transform
    assert info.family == "locomotion" and info.reward_transform == "locomotion"
    assert info.provenance == dict.fromkeys(("eval env", "reference scores", "family", "episode limit"),
                                            "given")
    summary = dm.summary()
    assert "eval env         Hopper-v4  (given)" in summary and "episode limit    50  (given)" in summary
    assert dm.normalized_score(HOPPER_REF[1]) == pytest.approx(100.0)
    env = dm.make_env()
    assert env.spec.max_episode_steps == 50 and env.observation_space.shape == (11,)
    env.close()


def test_limit_from_the_gymnasium_registry_and_d4rl_name_as_eval_env(own_file):
    dm = OfflineDataModule(str(own_file), eval_env="Hopper-v4")
    assert (dm.info.max_episode_steps == 1000
            and dm.info.provenance["episode limit"] == "gymnasium registry (Hopper-v4)")
    dm = OfflineDataModule(str(own_file), eval_env="hopper-medium-v2")  # that D4RL entry's env and scores
    info = dm.info
    assert ((info.env_id, info.ref_min_score, info.max_episode_steps, info.family)
            == ("Hopper-v4", HOPPER_REF[0], 1000, "locomotion"))
    assert info.provenance["reference scores"] == "D4RL table via eval_env hopper-medium-v2"


def test_canonical_file_name_is_inferred_and_given_values_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "hopper_medium-v2.hdf5"
    write_d4rl(path)
    dm = OfflineDataModule(str(path))
    assert dm.info.provenance["eval env"] == "D4RL table (inferred from the file name hopper_medium-v2.hdf5)"
    dm = OfflineDataModule(str(path), ref_scores=[0, 10], max_episode_steps=20)
    assert (dm.info.ref_min_score, dm.info.ref_max_score, dm.info.env_id) == (0.0, 10.0, "Hopper-v4")
    assert (dm.info.provenance["reference scores"] == "given"
            and dm.info.provenance["eval env"].startswith("D4RL table"))
    env = dm.make_env()
    assert env.spec.max_episode_steps == 20  # the known env, with the given limit
    env.close()


def test_given_limit_splits_a_file_without_timeouts(tmp_path):
    import h5py

    n = 10
    with h5py.File(tmp_path / "nt.hdf5", "w") as f:
        f["observations"] = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
        f["actions"] = np.zeros((n, 1), np.float32)
        f["rewards"] = np.ones(n, np.float32)
        f["terminals"] = np.zeros(n, bool)
    # D4RL's counter: rows 4 and 9 are timeouts with a limit of 5 -> 8 transitions in 2 episodes
    dm = OfflineDataModule(str(tmp_path / "nt.hdf5"), max_episode_steps=5)
    assert (dm.info.num_transitions, dm.info.num_episodes) == (8, 2)


def test_minari_dataset_without_metadata_gets_env_and_scores():
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    rng = np.random.default_rng(0)
    bufs = [EpisodeBuffer(observations=rng.normal(size=(6, 11)), actions=rng.uniform(-1, 1, (5, 3)),
                          rewards=rng.normal(size=5) + i, terminations=np.zeros(5, bool),
                          truncations=np.r_[np.zeros(4, bool), True]) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(
            "test/own-noenv-v0", bufs, observation_space=gym.spaces.Box(-np.inf, np.inf, (11,)),
            action_space=gym.spaces.Box(-1, 1, (3,)),
        )
    dm = OfflineDataModule("test/own-noenv-v0", eval_env="Hopper-v4", ref_scores=HOPPER_REF,
                           family="locomotion")
    assert (dm.info.source == "minari" and dm.info.env_id == "Hopper-v4"
            and dm.info.provenance["eval env"] == "given")
    assert dm.info.reward_transform == "locomotion"
    env = dm.make_env()
    env.close()


@pytest.mark.parametrize(
    ("kwargs", "exc", "needle"),
    [
        ({"eval_env": "Hoper-v4"}, DatasetError, "Did you mean: Hopper-v4"),
        ({"ref_scores": [1.0]}, DatasetError, "two numbers [min, max]"),
        ({"ref_scores": [5.0, 1.0]}, DatasetError, "min < max"),
        ({"ref_scores": [float("nan"), 1.0]}, DatasetError, "finite"),
        ({"max_episode_steps": 0}, DatasetError, "positive integer"),
        ({"family": "robots"}, DatasetError, "unknown family"),
        ({"eval_env_kwargs": {"maze": "umaze"}}, DatasetError, "needs eval_env"),
    ],
)
def test_bad_values_are_one_line_errors(own_file, kwargs, exc, needle):
    with pytest.raises(exc) as e:
        OfflineDataModule(str(own_file), **kwargs)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    print(msg)


def test_env_of_another_size_is_refused(own_file):
    dm = OfflineDataModule(str(own_file), eval_env="Walker2d-v4")
    with pytest.raises(EvalEnvError,
                       match="obs_dim 17, action_dim 6 but dataset 'my_data' has obs_dim 11, action_dim 3"):
        dm.make_env()


def test_own_file_trains_evaluates_and_logs_a_normalized_score(own_file, tmp_path):
    code = run_cli(
        "fit", "--data.dataset", own_file, "--data.eval_env", "Hopper-v4",
        "--data.ref_scores", str(HOPPER_REF), "--data.family", "locomotion", "--data.max_episode_steps", "30",
        *TINY_IDQL, *TINY_TRAINER, "--run_root", tmp_path / "runs", "--run_name", "own",
    )
    assert code == 0
    run = tmp_path / "runs" / "own"
    episodes = [r for r in read_csv(run / "eval_episodes.csv") if r["stage"] == "fit"]
    assert {int(r["step"]) for r in episodes} == {6} and len(episodes) == 2
    assert all(1 <= int(r["length"]) <= 30 for r in episodes)
    scores = [float(r["eval/normalized_score"]) for r in read_csv(run / "csv" / "metrics.csv")
              if r.get("eval/normalized_score")]
    returns = np.array([float(r["return"]) for r in episodes])
    expected = np.mean(100 * (returns - HOPPER_REF[0]) / (HOPPER_REF[1] - HOPPER_REF[0]))
    assert scores and scores[-1] == pytest.approx(expected, rel=1e-4)


def test_cli_bad_ref_scores_is_one_line_exit_2(own_file, tmp_path, capsys):
    code = run_cli("fit", "--data.dataset", own_file, "--data.ref_scores", "[3, 1]", *TINY_IDQL,
                   *TINY_TRAINER, "--run_root", tmp_path / "runs")
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "min < max" in errors[0]

"""docs/fidelity.md §5 preprocessing against hand-computed numbers."""

import numpy as np
import pytest
import torch

from idql_pl.data.preprocess import (
    DEFAULT_ACTION_CLIP,
    DatasetInfo,
    RewardTransform,
    SourceData,
    clip_actions,
    d4rl_transitions,
    episodes_to_transitions,
    finalize,
    make_reward_transform,
    resolve_reward_kind,
    validate_arrays,
)
from idql_pl.errors import DatasetError


def _raw(n=7, terminals=(), timeouts=()):
    obs = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)  # obs[i] = [i, i]
    t = np.zeros(n, bool)
    t[list(terminals)] = True
    to = np.zeros(n, bool)
    to[list(timeouts)] = True
    return {
        "observations": obs,
        "actions": np.full((n, 1), 0.5, np.float32),
        "rewards": np.arange(1, n + 1, dtype=np.float32),  # r[i] = i + 1
        "terminals": t,
        "timeouts": to,
    }


def test_d4rl_qlearning_convention_hand_computed():
    # rows 0..6; terminal at 2, timeout at 5; the last row (6) is dropped too
    out, returns = d4rl_transitions(_raw(7, terminals=[2], timeouts=[5]))
    np.testing.assert_array_equal(out["observations"][:, 0], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(out["next_observations"][:, 0], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(out["rewards"], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(out["terminals"], [False, False, True, False, False])
    # episodes: rows 0-2 (terminal) -> 1+2+3 = 6; rows 3-5 (timeout, row 5 dropped) -> 4+5 = 9; row 6 has no
    # kept row
    np.testing.assert_array_equal(returns, [6.0, 9.0])


def _d4rl_reference(data, max_episode_steps):
    """A literal port of d4rl.qlearning_dataset's loop (no timeouts key), for comparison."""
    n = len(data["rewards"])
    kept, step = [], 0
    for i in range(n - 1):
        final = step == max_episode_steps - 1
        if final:
            step = 0
            continue
        if data["terminals"][i]:
            step = 0
        kept.append(i)
        step += 1
    return np.array(kept)


def test_d4rl_counter_without_timeouts_matches_d4rl_loop():
    rng = np.random.default_rng(0)
    raw = _raw(200)
    raw["terminals"] = rng.random(200) < 0.05
    del raw["timeouts"]
    out, _ = d4rl_transitions(raw, max_episode_steps=7)
    expected = _d4rl_reference(raw, 7)
    np.testing.assert_array_equal(out["observations"][:, 0], expected)
    np.testing.assert_array_equal(out["next_observations"][:, 0], expected + 1)


def test_episodes_to_transitions_keeps_truncated_step_and_splits_packed_terminals():
    ep1 = {
        "observations": np.array([[0.0], [1.0], [2.0]]),
        "actions": np.zeros((2, 1)),
        "rewards": np.array([1.0, 2.0]),
        "terminations": np.array([False, False]),
        "truncations": np.array([False, True]),
    }
    packed = {  # three one-step episodes packed in one stored episode (like local/bandit)
        "observations": np.zeros((4, 1)),
        "actions": np.zeros((3, 1)),
        "rewards": np.array([0.5, 0.0, 1.0]),
        "terminations": np.array([True, True, True]),
        "truncations": np.zeros(3, bool),
    }
    out, returns = episodes_to_transitions([ep1, packed])
    np.testing.assert_array_equal(out["observations"][:2, 0], [0.0, 1.0])
    np.testing.assert_array_equal(out["next_observations"][:2, 0], [1.0, 2.0])
    np.testing.assert_array_equal(out["terminals"], [False, False, True, True, True])
    np.testing.assert_array_equal(returns, [3.0, 0.5, 0.0, 1.0])


def test_locomotion_reward_scaling_hand_computed():
    t = make_reward_transform("auto", "locomotion", np.array([10.0, 30.0, 20.0]))
    assert t.kind == "locomotion" and t.scale == pytest.approx(50.0) and t.shift == 0.0  # 1000 / (30 - 10)
    np.testing.assert_allclose(t(np.array([1.0, -0.5], np.float32)), [50.0, -25.0])


def test_antmaze_and_none_transforms_and_online_use():
    t = make_reward_transform("auto", "antmaze")
    assert (t.scale, t.shift) == (1.0, -1.0)
    assert t(1.0) == 0.0 and t(0.0) == -1.0
    torch.testing.assert_close(t(torch.tensor([0.0, 1.0])), torch.tensor([-1.0, 0.0]))
    assert make_reward_transform("auto", "maze2d").kind == "none"
    assert make_reward_transform("none", "antmaze").kind == "none"  # override
    assert make_reward_transform("antmaze", "other").shift == -1.0
    assert (RewardTransform("locomotion", 2.0, 0.0).to_dict()
            == {"kind": "locomotion", "scale": 2.0, "shift": 0.0})


def test_resolve_reward_kind():
    assert resolve_reward_kind("auto", "locomotion") == "locomotion"
    assert resolve_reward_kind("auto", "bandit") == "none"
    with pytest.raises(DatasetError, match="unknown reward_transform"):
        resolve_reward_kind("scale", "locomotion")


def test_locomotion_scaling_needs_return_spread():
    with pytest.raises(DatasetError, match="reward_transform none"):
        make_reward_transform("locomotion", "locomotion", np.array([5.0]))


def test_clip_actions():
    a = np.array([[1.0, -1.0, 0.3, 1.0005]], np.float32)
    out = clip_actions(a)
    np.testing.assert_allclose(out, [[DEFAULT_ACTION_CLIP, -DEFAULT_ACTION_CLIP, 0.3, DEFAULT_ACTION_CLIP]])
    assert np.abs(out).max() < 1.0
    with pytest.raises(DatasetError, match=r"\|a\| = 1\.5.*rescale"):
        clip_actions(np.array([[0.2, -1.5]], np.float32))


def test_validate_arrays_errors():
    good = {"observations": np.zeros((3, 2)), "actions": np.zeros((3, 1)), "rewards": np.zeros((3, 1)),
            "terminals": np.zeros(3)}
    out = validate_arrays(good, ("observations", "actions", "rewards", "terminals"), "x")
    assert out["rewards"].shape == (3,)  # [N, 1] accepted and flattened
    with pytest.raises(DatasetError, match="missing key.*terminals"):
        validate_arrays({k: v for k, v in good.items() if k != "terminals"},
                        ("observations", "actions", "rewards", "terminals"), "x")
    with pytest.raises(DatasetError, match="mismatched lengths.*actions=2"):
        validate_arrays({**good, "actions": np.zeros((2, 1))}, ("observations",), "x")
    bad = good["observations"].copy()
    bad[0, 0], bad[2, 1] = np.nan, np.inf
    with pytest.raises(DatasetError, match="'observations' contains 2 NaN/inf"):
        validate_arrays({**good, "observations": bad}, ("observations",), "x")
    with pytest.raises(DatasetError, match="'observations' has shape \\(3,\\) but must be 2-D"):
        validate_arrays({**good, "observations": np.zeros(3)}, ("observations",), "x")


def test_finalize_masks_rewards_and_stats():
    info = DatasetInfo("toy", "d4rl", "antmaze", None, 0.0, 1.0, 10)
    src = SourceData(
        info=info,
        observations=np.zeros((3, 2), np.float32),
        actions=np.array([[1.0], [0.0], [-1.0]], np.float32),
        rewards=np.array([0.0, 1.0, 0.0], np.float32),
        next_observations=np.ones((3, 2), np.float32),
        terminals=np.array([False, True, False]),
        episode_returns=np.array([1.0, 0.0]),
    )
    arrays, transform = finalize(src)
    np.testing.assert_array_equal(arrays["masks"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(arrays["rewards"], [-1.0, 0.0, -1.0])
    assert transform.kind == "antmaze" and info.reward_shift == -1.0
    assert (info.num_transitions, info.num_episodes, info.obs_dim, info.action_dim) == (3, 2, 2, 1)
    assert (info.return_mean, info.return_min, info.return_max) == (0.5, 0.0, 1.0)
    assert all(a.dtype == np.float32 for a in arrays.values())

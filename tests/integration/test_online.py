"""Online finetuning (OnlineIDQL, IDQL-Max / IDQL-Imp): symmetric batches, warm-up, the frozen behavior model
of Max, the implicit exploration of Imp, online rewards and masks, resume parity, and the bad-input errors."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from idql_pl.algorithm.losses import implicit_weights
from idql_pl.data.buffer import Batch, TransitionBuffer
from idql_pl.data.preprocess import RewardTransform
from idql_pl.data.replay import ReplayBuffer, mixed_batch
from idql_pl.envs.bandit import bandit_reward
from idql_pl.models.behavior import CosineDecay, DiffusionBehavior
from idql_pl.models.critic import ImplicitCritic
from idql_pl.models.online import OnlineIDQL, pretrained_behavior_optimizer
from tests.helpers import CONFIGS, TINY_IDQL, load_state, random_transitions, run_cli

BANDIT = ["--data.dataset", "local/bandit", "--data.dataset_size", "2000"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
         "--eval.every_n_steps", "0", "--eval.at_end", "false", "--trainer.val_check_interval", "1000"]
FINETUNE = ["fit", "--config", CONFIGS / "finetune_quickstart.yaml", *BANDIT, *TINY_IDQL, *QUIET,
            "--eval.at_start", "false", "--trainer.log_every_n_steps", "2"]


def tiny_module(variant: str = "max", obs_dim: int = 2, action_dim: int = 1, **kwargs) -> OnlineIDQL:
    return OnlineIDQL(
        obs_dim, action_dim, variant=variant, num_samples=kwargs.pop("num_samples", 2),
        critic=partial(ImplicitCritic, hidden_dims=[8]),
        behavior=partial(DiffusionBehavior, hidden_dim=8, ff_dim=8, num_blocks=1, time_dim=8), **kwargs,
    )


# ------------------------------------------------------------------------------------------ unit tests
@pytest.mark.parametrize("batch_size", [32, 33])
def test_mixed_batch_is_half_online_half_offline(batch_size):
    offline = TransitionBuffer(random_transitions(200, obs_dim=3, action_dim=2), seed=0)
    online = ReplayBuffer(50, obs_dim=3, action_dim=2, seed=1)
    for i in range(10):  # online rows are marked by reward 100 + i (offline rewards are N(0, 1))
        online.add(np.full(3, i), np.zeros(2), 100.0 + i, np.full(3, i + 1), 1.0)
    batch = mixed_batch(online, offline, batch_size)
    is_online = batch.rewards >= 100
    assert int(is_online.sum()) == round(batch_size / 2)
    assert torch.equal(is_online, torch.arange(batch_size) < round(batch_size / 2))  # online rows first
    i = batch.rewards[is_online] - 100  # each online row is a whole stored transition
    assert torch.equal(batch.observations[is_online], i[:, None].expand(-1, 3))
    assert torch.equal(batch.next_observations[is_online], (i + 1)[:, None].expand(-1, 3))
    assert all(o.shape[0] == batch_size for o in batch)
    assert (int((mixed_batch(online, offline, batch_size, online_fraction=1.0).rewards >= 100).sum())
            == batch_size)


def test_replay_ring_and_compact_state():
    buf = ReplayBuffer(4, obs_dim=1, action_dim=1, seed=0)
    for i in range(6):
        buf.add(np.array([i]), np.array([0.5]), float(i), np.array([i + 1]), 1.0)
    assert len(buf) == 4 and buf.all().rewards.tolist() == [2.0, 3.0, 4.0, 5.0]  # oldest dropped
    other = ReplayBuffer(4, obs_dim=1, action_dim=1, seed=99)
    other.load_state_dict(buf.state_dict())
    assert torch.equal(other.all().rewards, buf.all().rewards)
    assert torch.equal(other.sample_rows(8), buf.sample_rows(8))  # the sampling generator travels too
    small = ReplayBuffer(10, obs_dim=1, action_dim=1)
    small.add(np.array([0]), np.array([0.0]), 0.0, np.array([1]), 1.0)
    assert small.state_dict()["rows"].shape == (1, 5)  # only the filled part is saved
    bigger = ReplayBuffer(5, obs_dim=1, action_dim=1)  # another capacity: the newest rows, oldest first
    bigger.load_state_dict(buf.state_dict())
    assert bigger.all().rewards.tolist() == [2.0, 3.0, 4.0, 5.0]
    bigger.add(np.array([6]), np.array([0.5]), 6.0, np.array([7]), 1.0)
    assert bigger.all().rewards.tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]


class ScriptedEnv:
    """obs = [episode, t]; episode 0 terminates after 3 steps, later ones are truncated after 2 (time
    limit)."""

    def __init__(self):
        self.episode, self.t, self.seeds = -1, 0, []

    def reset(self, seed=None):
        self.episode, self.t = self.episode + 1, 0
        self.seeds.append(seed)
        return np.array([self.episode, 0.0], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        terminated = self.episode == 0 and self.t == 3
        truncated = self.episode > 0 and self.t == 2
        return np.array([self.episode, self.t], dtype=np.float32), 1.0, terminated, truncated, {}

    def close(self):
        pass


def test_online_rows_reward_transform_and_masks():
    module = tiny_module()
    env = ScriptedEnv()
    module.attach_env(env, RewardTransform("antmaze", 1.0, -1.0), capacity=10, seed=7,
                      normalize=lambda r: 10.0 * r)
    module.reset_episode()
    ends = [module.env_step() for _ in range(5)]
    rows = module.replay.all()
    assert rows.rewards.tolist() == [0.0] * 5  # r - 1 applied to every online row (raw reward 1)
    assert rows.masks.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]  # termination is terminal, truncation is not
    assert rows.observations[:, 1].tolist() == [0, 1, 2, 0, 1]
    # true final states kept
    assert rows.next_observations.tolist() == [[0, 1], [0, 2], [0, 3], [1, 1], [1, 2]]
    assert ends[:2] == [None, None] and ends[3] is None
    assert ends[2] == {"train/online/episode_return": 3.0, "train/online/episode_length": 3.0,
                       "train/online/episode_normalized_score": 30.0}  # raw rewards, the normalizer's score
    assert ends[4]["train/online/episode_return"] == 2.0
    assert env.seeds == [7, 7 + 1, 7 + 1]  # reset seed = seed + env steps so far (global_step stays 0 here)


@pytest.mark.parametrize("variant", ["imp", "max"])
def test_exploration_follows_implicit_weights_or_argmax(variant, monkeypatch):
    torch.manual_seed(0)
    module = tiny_module(variant, obs_dim=2, action_dim=1, num_samples=4)
    candidates = torch.tensor([[-0.9], [-0.3], [0.2], [0.8]])
    state = torch.tensor([[0.1, -0.2]])
    q = module.critic.q_target(state.expand(4, 2), candidates)[0]  # the one agent
    # two candidates above V, two below: expectile weights tau and 1 - tau
    v_value = q.sort().values[1:3].mean()
    monkeypatch.setattr(
        module.behavior, "sample",
        lambda s, n, generator=None: candidates.T.expand(s.shape[-2], n).unsqueeze(-1)[None].clone())
    monkeypatch.setattr(module.critic, "v", lambda s: torch.full(s.shape[:-1], float(v_value)))
    n = 20_000
    actions = module.explore(state.expand(n, 2))[0]
    index = (actions - candidates.T).abs().argmin(dim=1)
    freq = torch.bincount(index, minlength=4).double() / n
    if variant == "max":
        assert torch.equal(index, torch.full((n,), int(q.argmax())))
        return
    w = implicit_weights(q - v_value, "expectile", 0.7).double()
    p = w / w.sum()
    assert sorted(w.tolist()) == pytest.approx([0.3, 0.3, 0.7, 0.7])
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 4 * sigma).all(), (freq, p)


# -------------------------------------------------------------------------------------- through the CLI
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny joint IDQL, critic-only and behavior-only checkpoints on local/bandit."""
    root = tmp_path_factory.mktemp("pretrained")
    common = [*BANDIT, *QUIET, "--trainer.max_steps", "3", "--run_root", root]  # after --config: they win
    assert run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *common, *TINY_IDQL,
                   "--run_name", "joint") == 0
    common = ["fit", *common]
    assert run_cli(*common, "--model", "idql_pl.ImplicitCritic", "--model.hidden_dims", "[32, 32]",
                   "--run_name", "critic") == 0
    assert run_cli(*common, "--model", "idql_pl.DiffusionBehavior", "--model.hidden_dim", "32",
                   "--model.ff_dim", "64", "--run_name", "behavior") == 0
    return {name: root / name / "last.ckpt" for name in ("joint", "critic", "behavior")}


def _finetune(pretrained, root, name, variant, steps, *extra):
    return run_cli(*FINETUNE, "--model.pretrained", pretrained["joint"], "--model.variant", variant,
                   "--trainer.max_steps", steps, "--run_root", root, "--run_name", name, *extra)


def _replay(run_dir):
    (file,) = run_dir.glob("last.ckpt.replay.*.pt")
    return load_state(file)


def _half(state, prefix):
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def test_warmup_then_updates_max_freezes_behavior(pretrained, tmp_path):
    start = load_state(pretrained["joint"])["state_dict"]
    # max_steps == warmup_steps: only collection, nothing moves
    assert _finetune(pretrained, tmp_path, "warm", "max", 5, "--model.warmup_steps", "5",
                     "--data.reward_transform", "antmaze") == 0
    warm = load_state(tmp_path / "warm" / "last.ckpt")
    assert warm["global_step"] == 5
    for k, v in start.items():
        assert torch.equal(warm["state_dict"][k], v), k
    replay = _replay(tmp_path / "warm")
    rows = replay["rows"]
    assert rows.shape == (5, 1 + 2 + 1 + 1 + 1)
    actions, rewards, masks = rows[:, 1:3], rows[:, 3], rows[:, 5]
    # the offline transform
    assert torch.allclose(rewards, torch.as_tensor(bandit_reward(actions.numpy())) - 1.0)
    assert torch.equal(masks, torch.zeros(5))  # the bandit terminates every step
    # 3 steps past the warm-up: 3 critic updates, the behavior model (and its EMA copy) bit-identical
    assert _finetune(pretrained, tmp_path, "max", "max", 8, "--model.warmup_steps", "5") == 0
    ckpt = load_state(tmp_path / "max" / "last.ckpt")
    state = ckpt["state_dict"]
    for k, v in _half(start, "behavior.").items():
        assert torch.equal(state[k], v), k
    assert any(not torch.equal(state[k], v) for k, v in _half(start, "critic.q_net.").items())
    assert len(ckpt["optimizer_states"]) == 2  # V and Q only: no behavior optimizer under Max
    assert all(int(s["step"]) == 3 for opt in ckpt["optimizer_states"] for s in opt["state"].values())


@pytest.mark.parametrize("behavior_optimizer", ["continue", "restart"])
def test_imp_trains_behavior_twice_per_env_step(pretrained, tmp_path, behavior_optimizer):
    joint = load_state(pretrained["joint"])
    start = joint["state_dict"]
    # pretraining's actor steps
    done = {int(s["step"]) for s in joint["optimizer_states"][0]["state"].values()}.pop()
    assert done == 6 and joint["lr_schedulers"][0]["_last_lr"] == [0.0]  # 3 joint steps, cosine decayed to 0
    assert _finetune(pretrained, tmp_path, "imp", "imp", 7, "--model.warmup_steps", "4",
                     "--model.behavior_optimizer", behavior_optimizer) == 0
    ckpt = load_state(tmp_path / "imp" / "last.ckpt")
    actor, v_opt, q_opt = ckpt["optimizer_states"]
    (schedule,) = ckpt["lr_schedulers"]
    # 2 behavior steps per env step after the warm-up: 6; "continue" adds them to pretraining's AdamW step
    # count and schedule (one cosine over 6 + 6 actor steps), "restart" starts a fresh AdamW and cosine over 6
    offset = done if behavior_optimizer == "continue" else 0
    assert {int(s["step"]) for s in actor["state"].values()} == {offset + 6}
    assert schedule["lr_lambdas"] == [{"total_steps": offset + 6, "start": offset}]
    # the critic's start fresh
    assert {int(s["step"]) for o in (v_opt, q_opt) for s in o["state"].values()} == {3}
    assert any(not torch.equal(ckpt["state_dict"][k], v)
               for k, v in _half(start, "behavior.ema_net.").items())


def test_compiled_imp_finetuning_makes_the_same_updates(pretrained, tmp_path, aot_eager):
    """``--model.compile true`` compiles online finetuning's iteration too (IDQL-Imp: behavior steps and the
    critic step on half-online batches), with the same update counts as eager."""
    assert _finetune(pretrained, tmp_path, "imp", "imp", 7, "--model.warmup_steps", "4",
                     "--model.compile", "true") == 0
    assert aot_eager == ["IDQLModule.compile_training.<locals>.functional"]
    ckpt = load_state(tmp_path / "imp" / "last.ckpt")
    actor, v_opt, q_opt = ckpt["optimizer_states"]
    assert {int(s["step"]) for s in actor["state"].values()} == {6 + 6}  # pretraining's 6, then 2 per update
    assert {int(s["step"]) for o in (v_opt, q_opt) for s in o["state"].values()} == {3}
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_continued_behavior_optimizer_keeps_moments_and_cosine():
    """The pretraining's AdamW moments and step count are loaded, the LR is the cosine's value at step P of
    P + U, and a checkpoint without a behavior optimizer (frozen behavior model, or IDQL-Max) gives None."""
    source = tiny_module("imp")
    opt, _ = source.behavior.make_optimizer(10)
    for _ in range(4):  # 4 pretraining steps
        source.behavior.update(random_batch(), opt, None)
    ckpt = {"optimizer_states": [tiny_module().critic.configure_optimizers()[0].state_dict(),
                                 opt.state_dict()]}
    model = tiny_module("imp")
    state, done = pretrained_behavior_optimizer(ckpt, model.behavior)
    assert done == 4
    new_opt, sched = model.behavior.make_optimizer(done + 6, start_step=done, state=state)
    assert new_opt.param_groups[0]["lr"] == pytest.approx(3e-4 * CosineDecay(10)(4))  # not the peak LR
    for p_src, p_new in zip(source.behavior.net.parameters(), model.behavior.net.parameters(), strict=True):
        assert torch.equal(opt.state[p_src]["exp_avg_sq"], new_opt.state[p_new]["exp_avg_sq"])
    model.behavior.update(random_batch(), new_opt, sched)
    assert new_opt.param_groups[0]["lr"] == pytest.approx(3e-4 * CosineDecay(10)(5))
    assert int(new_opt.state[next(model.behavior.net.parameters())]["step"]) == 5
    assert pretrained_behavior_optimizer({"optimizer_states": ckpt["optimizer_states"][:1]},
                                         model.behavior) is None
    assert CosineDecay(10, start=4)(0) == CosineDecay(10)(4) and CosineDecay(10, start=4)(9) == 0.0


def random_batch(n: int = 16) -> Batch:
    g = torch.Generator().manual_seed(n)
    return Batch(torch.randn(n, 2, generator=g), torch.rand(n, 1, generator=g) * 2 - 1, torch.zeros(n),
                 torch.randn(n, 2, generator=g), torch.ones(n))


def test_resumed_finetuning_equals_uninterrupted(pretrained, tmp_path):
    k = 4
    common = ["--model.warmup_steps", "2", "--checkpoint.every_n_train_steps", str(k),
              "--model.behavior.lr_decay_steps", "16"]
    assert _finetune(pretrained, tmp_path, "straight", "imp", 2 * k, *common) == 0
    assert _finetune(pretrained, tmp_path, "split", "imp", k, *common) == 0
    assert _replay(tmp_path / "split")["rows"].shape[0] == k
    assert _finetune(pretrained, tmp_path, "split", "imp", 2 * k, *common, "--ckpt_path", "last") == 0
    straight, split = (load_state(tmp_path / "straight" / "last.ckpt"),
                       load_state(tmp_path / "split" / "last.ckpt"))
    assert straight["global_step"] == split["global_step"] == 2 * k
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "idql_rng"):
        _assert_same(straight[key], split[key], key)
    a, b = _replay(tmp_path / "straight"), _replay(tmp_path / "split")
    assert a["rows"].shape[0] == 2 * k
    _assert_same(a, b, "replay")
    assert len(list((tmp_path / "split").glob("last.ckpt.replay.*.pt"))) == 1  # older sidecars removed


def _assert_same(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.parametrize(
    ("which", "extra", "message"),
    [
        ("critic", [], "is a critic-only (ImplicitCritic) checkpoint"),
        ("behavior", [], "is a behavior-only (DiffusionBehavior) checkpoint"),
        ("joint", ["--data.dataset", "local/pointmaze-umaze", "--data.dataset_size", "4000"],
         "was trained with obs_dim=1, action_dim=2"),
        ("missing", [], "does not exist"),
        ("joint", ["--model.variant", "best"], "variant"),
        ("joint", ["--model.warmup_steps", "-1"], "warmup_steps must be >= 0"),
        ("joint", ["--model.behavior_optimizer", "reset"], "behavior_optimizer"),
    ],
)
def test_bad_finetuning_inputs(pretrained, tmp_path, capsys, which, extra, message):
    path = pretrained.get(which, tmp_path / "nope.ckpt")
    code = run_cli(*FINETUNE, "--trainer.max_steps", "2", "--run_root", tmp_path, "--model.pretrained", path,
                   *extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert err.count("error:") == 1 and "Traceback" not in err

"""Several N in one evaluation (``--eval.num_samples "[16, 64, 256]"``): the settings played, one batched
policy call for N settings x K agents with per-state candidate counts, the episode CSV's N column, resume
state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from idql_pl.algorithm.extraction import extract_actions
from idql_pl.errors import ConfigError
from idql_pl.training.evaluation import EPISODE_COLUMNS, PolicyEvaluation
from tests.helpers import IndexedCandidates, QIsTheAction, read_csv


class _LabelledCandidates:
    """Candidate ``j`` drawn (in the order of one sampler call) for a state with first feature ``s`` is the
    action ``1000 s + j``: it tells which state it was drawn for and in which slot. Records the batch of each
    call."""

    def __init__(self):
        self.calls = []

    def sample(self, states, num_samples=1, generator=None):
        agents, batch = states.shape[:2]
        self.calls.append((batch, num_samples))
        slot = torch.arange(batch * num_samples, dtype=torch.float32).view(1, batch, num_samples)
        return (1000 * states[..., :1] + slot).unsqueeze(-1)  # [K, batch, N, 1]


def test_per_state_counts_draw_each_states_own_n_in_one_call():
    """A ``[K, B]`` tensor of counts: one sampler call draws exactly sum(N) candidates per agent (in units of
    gcd(N)), state b of agent k extracts among the N candidates drawn for it (argmax: the last of them;
    implicit: never one of another state's), and the dense path of one N per agent is unchanged."""
    # agent 1 draws 14 of agent 0's 16: one padding repeat
    counts = torch.tensor([[2, 8, 4, 2], [8, 2, 2, 2]])
    states = torch.arange(4, dtype=torch.float32).view(1, 4, 1).expand(2, 4, 3)  # state b's feature: b
    behavior = _LabelledCandidates()
    best = extract_actions(behavior, QIsTheAction(), states, counts)[..., 0]
    assert behavior.calls == [(8, 2)]  # 16 / 2 repeats of 2 candidates: one call, sum(N), not 4 x 8
    slots_end = torch.cumsum(counts, dim=1)  # the state's candidates are its own consecutive slots
    assert torch.equal(best, 1000 * torch.arange(4.0) + slots_end - 1)
    drawn = extract_actions(_LabelledCandidates(), QIsTheAction(), states, counts, extraction="implicit",
                            generator=torch.Generator().manual_seed(0))[..., 0]
    state, slot = torch.div(drawn, 1000, rounding_mode="floor"), drawn % 1000
    assert torch.equal(state, torch.arange(4.0).expand(2, 4))
    assert torch.all((slot >= slots_end - counts) & (slot < slots_end))
    with pytest.raises(ConfigError, match="num_samples must be >= 1"):
        extract_actions(IndexedCandidates(), QIsTheAction(), states, counts * 0)


def test_per_state_counts_match_single_n_in_distribution():
    """Candidates uniform in [0, 1], Q = the action: the argmax of N candidates averages N / (N + 1) at each
    N, whether a state's N comes alone or beside others (a wrong count or a leak between states would
    show)."""

    class Uniform:
        def sample(self, states, num_samples=1, generator=None):
            return torch.rand(*states.shape[:2], num_samples, 1, generator=generator)

    ns = torch.tensor([1, 3, 12]).repeat_interleave(4000).view(1, -1)
    states = torch.zeros(1, ns.shape[1], 2)
    best = extract_actions(Uniform(), QIsTheAction(), states, ns, generator=torch.Generator().manual_seed(1))
    means = best[0, :, 0].view(3, -1).mean(dim=1)
    assert torch.allclose(means, torch.tensor([1 / 2, 3 / 4, 12 / 13]), atol=0.01)


class _RecordingModel:
    """A model with ``act``: returns, per agent and state,
    ``[first state feature, N used for that state]``."""

    def __init__(self, num_samples, num_agents):
        self.hparams = {"num_samples": num_samples}
        self.num_agents = num_agents
        self.calls = 0

    def act(self, states, num_samples=None, extraction=None, generator=None, precision="auto"):
        self.calls += 1
        counts = (num_samples.float() if isinstance(num_samples, torch.Tensor)
                  else torch.full(states.shape[:2], 0.0))
        return torch.stack([states[..., 0], counts], dim=-1)


@pytest.mark.parametrize("own, listed, expected", [
    (64, [16, 64, 256], [64, 16, 256]),  # the model's N is listed: its episodes are reused, first
    (32, [16, 64, 256], [None, 16, 64, 256]),  # not listed: played too, first
    ([8, 32], [16, 64], [None, 16, 64]),  # one N per agent: played as the model's own setting
])
def test_settings_put_the_models_own_n_first(own, listed, expected):
    model = _RecordingModel(own, 2)
    assert PolicyEvaluation(num_samples=listed).settings(model) == expected
    assert PolicyEvaluation(num_samples=16).settings(model) == [16]  # one int: today's single setting
    assert PolicyEvaluation().settings(model) == [None]


def test_n_settings_times_k_agents_are_one_act_call_with_each_states_n():
    """3 settings x 2 agents: one ``act`` call sees each agent's states of every setting and each state's N;
    the actions come back to their (setting, agent) group and env slot."""
    agents, slots = 2, 5
    model = _RecordingModel([8, 32], agents)
    evaluation = PolicyEvaluation(num_samples=[16, 64])
    settings = evaluation.settings(model)
    policy = evaluation._policy(model, settings, agents)
    groups = len(settings) * agents
    states = torch.arange(groups * slots, dtype=torch.float32).view(groups, slots, 1).expand(groups, slots, 3)
    actions = policy(states, torch.Generator())
    assert model.calls == 1 and actions.shape == (groups, slots, 2)
    assert torch.equal(actions[..., 0], states[..., 0])  # every group's own states, in place
    n_of_group = [8, 32, 16, 16, 64, 64]  # setting-major: own (per agent), 16, 64
    assert torch.equal(actions[..., 1], torch.tensor(n_of_group).float().view(-1, 1).expand(groups, slots))


def test_a_list_of_n_needs_a_model_with_candidates():
    class Iql:
        hparams = {}

        def act(self, states, **kwargs):
            return states

    with pytest.raises(ConfigError, match="draws no candidates"):
        PolicyEvaluation(num_samples=[4, 8]).settings(Iql())
    with pytest.raises(ConfigError, match="empty list"):
        PolicyEvaluation(num_samples=[])
    with pytest.raises(ConfigError, match="video_episodes must be >= 0"):
        PolicyEvaluation(video_episodes=-1)


def _trainer(tmp_path, step=5):
    return SimpleNamespace(default_root_dir=str(tmp_path), global_step=step,
                           state=SimpleNamespace(fn=SimpleNamespace(value="fit")))


def test_episode_rows_record_n_and_an_old_file_keeps_its_columns(tmp_path):
    """Each row names its N and whether it is the model's own (the rows ``eval/normalized_score`` summarizes);
    a file written before these columns existed keeps its header and gets the model's own rows only."""
    evaluation = PolicyEvaluation(num_samples=[2, 8], seed=100)
    episodes = torch.tensor([1, 0])
    returns = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])  # 3 settings x 1 agent
    lengths = torch.full((3, 2), 7)
    evaluation._write_episodes(_trainer(tmp_path), episodes, returns, lengths, [4, 2, 8], 1)
    rows = read_csv(tmp_path / "eval_episodes.csv")
    assert list(rows[0]) == EPISODE_COLUMNS
    assert [(r["num_samples"], r["model_n"], r["episode"], r["seed"], float(r["return"])) for r in rows] == [
        ("4", "1", "0", "100", 0.0), ("4", "1", "1", "101", 1.0), ("2", "0", "0", "100", 2.0),
        ("2", "0", "1", "101", 3.0), ("8", "0", "0", "100", 4.0), ("8", "0", "1", "101", 5.0)]
    old = tmp_path / "old"
    old.mkdir()
    (old / "eval_episodes.csv").write_text("stage,step,agent,episode,seed,return,length\n"
                                           "fit,1,0,0,100,0.5,7\n")
    evaluation._write_episodes(_trainer(old), episodes, returns, lengths, [4, 2, 8], 1)
    rows = read_csv(old / "eval_episodes.csv")
    assert list(rows[0]) == ["stage", "step", "agent", "episode", "seed", "return", "length"]
    assert [float(r["return"]) for r in rows] == [0.5, 0.0, 1.0]


def test_per_n_history_survives_a_resume():
    evaluation = PolicyEvaluation(num_samples=[2, 8])
    evaluation.history, evaluation.n_history = [(3, 1.5)], [(3, {2: 1.0, 8: 2.0})]
    restored = PolicyEvaluation(num_samples=[2, 8])
    restored.load_state_dict(evaluation.state_dict())
    assert restored.history == [(3, 1.5)] and restored.n_history == [(3, {2: 1.0, 8: 2.0})]
    restored.load_state_dict({"history": [[1, 0.5]]})  # a checkpoint from before per-N evaluations
    assert restored.n_history == []


def test_n_settings_of_a_two_agent_idql_share_one_sampler_call():
    """A real K = 2 IDQL with one N per agent ([4, 8]) evaluated at N 2 and 8: settings (own, 2, 8) x 2
    agents, one behavior sampler call per step drawing sum(N) candidates per state, actions in [-1, 1]."""
    from tests.unit.test_policy import tiny_idql

    model = tiny_idql(2, critic={"tau": [0.7, 0.9]})
    model.hparams.num_samples = [4, 8]
    evaluation = PolicyEvaluation(num_samples=[2, 8])
    settings = evaluation.settings(model)
    assert settings == [None, 2, 8]
    calls, sample = [], model.behavior.sample

    def counting_sample(states, num_samples=1, generator=None):
        calls.append((tuple(states.shape), num_samples))
        return sample(states, num_samples, generator)

    model.behavior.sample = counting_sample
    slots = 3
    actions = evaluation._policy(model, settings, 2)(torch.randn(6, slots, 5),
                                                     torch.Generator().manual_seed(0))
    assert actions.shape == (6, slots, 3) and actions.abs().max() <= 1.0
    # gcd(4, 8, 2, 8) = 2 candidates per repeat; agent 1 (8 + 2 + 8 = 18 per slot) sets the batch: 9 x 3
    # repeats
    assert calls == [((2, 27, 5), 2)]


def test_videos_go_to_every_wandb_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from idql_pl.training.video import log_videos

    class RecordingWandb(WandbLogger):
        def __init__(self):
            self.logged = []

        def log_video(self, key, videos, step=None, **kwargs):
            self.logged.append((key, videos, step, kwargs))

    wandb = RecordingWandb()
    trainer = SimpleNamespace(loggers=[CSVLogger(tmp_path), wandb])
    log_videos(trainer, [tmp_path / "step3_ep0.mp4"], 3, ["step 3, episode 0"])
    assert wandb.logged == [("eval/video", [str(tmp_path / "step3_ep0.mp4")], 3,
                             {"caption": ["step 3, episode 0"]})]

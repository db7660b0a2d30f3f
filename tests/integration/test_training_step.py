"""Algorithm 1 under Lightning: a training step's order and counts, and decoupled training of the two
halves."""

from __future__ import annotations

import lightning as L
import torch

from idql_pl import IDQL, DiffusionBehavior, ImplicitCritic
from idql_pl.data.buffer import BufferStream, TransitionBuffer
from tests.helpers import SMALL_MAZE, TINY_IDQL, TINY_TRAINER, load_state, random_transitions, run_cli


def test_idql_training_step_order_counts_and_actor_schedule(monkeypatch):
    """One training step = 2 behavior steps, then V, Q, target; global_step counts critic steps, the actor's
    cosine schedule spans 2 x max_steps, and every optimizer made exactly its share of steps."""
    calls: list[str] = []
    for cls, names in ((DiffusionBehavior, ["loss", "ema_update"]),
                       (ImplicitCritic, ["v_loss", "q_loss", "target_update"])):
        for name in names:
            real = getattr(cls, name)
            monkeypatch.setattr(
                cls, name, lambda self, *a, _r=real, _n=name, **k: (calls.append(_n), _r(self, *a, **k))[1])
    L.seed_everything(0, verbose=False)
    model = IDQL(5, 2,
                 critic=lambda o, a, **kw: ImplicitCritic(o, a, hidden_dims=(16, 16), batch_size=8, **kw),
                 behavior=lambda o, a, **kw: DiffusionBehavior(o, a, hidden_dim=16, ff_dim=32, batch_size=8,
                                                               **kw),
                 num_samples=2)
    steps = 5
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(model, train_dataloaders=BufferStream(TransitionBuffer(random_transitions(200), seed=0)))
    behavior_step = ["loss", "ema_update"]
    assert calls == [*behavior_step, *behavior_step, "v_loss", "q_loss", "target_update"] * steps
    assert trainer.global_step == steps
    actor_opt, v_opt, q_opt = model.plain_optimizers()
    scheduler = model.lr_schedulers()
    assert scheduler.lr_lambdas[0].total_steps == 2 * steps and scheduler.last_epoch == 2 * steps
    for opt, n in ((actor_opt, 2 * steps), (v_opt, steps), (q_opt, steps)):
        assert {int(state["step"]) for state in opt.state.values()} == {n}


def test_decoupled_training_keeps_a_frozen_pretrained_behavior_bit_identical(tmp_path):
    """A behavior-only run, then a joint run that loads it frozen: the behavior weights (and EMA copy) in the
    joint checkpoint are the pretrained ones bit for bit, and only the critic's two optimizers stepped."""
    tiny_behavior = ["--model.hidden_dim", "32", "--model.ff_dim", "64", "--model.batch_size", "64"]
    assert run_cli("fit", "--model", "idql_pl.DiffusionBehavior", *SMALL_MAZE, *tiny_behavior, *TINY_TRAINER,
                   "--eval.at_end", "false", "--run_root", tmp_path, "--run_name", "bc") == 0
    bc = tmp_path / "bc" / "last.ckpt"
    assert run_cli("fit", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER, "--eval.at_end", "false",
                   "--model.behavior_ckpt", bc, "--model.freeze_behavior", "true",
                   "--run_root", tmp_path, "--run_name", "joint") == 0
    pretrained, joint = load_state(bc), load_state(tmp_path / "joint" / "last.ckpt")
    behavior = {k[len("behavior."):]: v for k, v in joint["state_dict"].items() if k.startswith("behavior.")}
    assert behavior.keys() == pretrained["state_dict"].keys()
    for key, value in pretrained["state_dict"].items():
        assert torch.equal(behavior[key], value), key
    assert joint["global_step"] == 6 and len(joint["optimizer_states"]) == 2  # V and Q only
    for opt_state in joint["optimizer_states"]:
        states = opt_state["state"].values()
        assert {int(s["step"]) for s in states} == {6}
        assert all(s["exp_avg"].abs().sum() > 0 for s in states)  # the critic trained

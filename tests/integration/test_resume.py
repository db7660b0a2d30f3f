"""Resume parity: fit 2k steps in one go == fit k, stop, ``--ckpt_path last``, continue to 2k."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml

from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, load_state, run_cli

K = 4
COMMON = [
    "fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL,
    "--model.behavior.lr_decay_steps", str(4 * K),  # the cosine schedule must not depend on where we stop
    "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
    "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "3", "--eval.every_n_steps", "0",
    "--eval.at_end", "false", "--checkpoint.every_n_train_steps", str(K),
]


def _assert_same(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys differ"
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.parametrize(("compile_", "agents"),  # compile: true's fast version: tests/unit/test_compile.py
                         [("false", 1), pytest.param("true", 1, marks=pytest.mark.slow), ("false", 2)])
def test_resumed_run_equals_uninterrupted(tmp_path, compile_, agents, request):
    """Eager, with the whole iteration compiled (``compile: true``, aot_eager backend), and with two agents
    (each draws its batches from its own generator: all of them are restored)."""
    if compile_ == "true":
        request.getfixturevalue("aot_eager")
    common = [*COMMON, "--model.compile", compile_, "--model.num_agents", agents]
    assert run_cli(*common, "--trainer.max_steps", 2 * K, "--run_root", tmp_path,
                   "--run_name", "straight") == 0
    assert run_cli(*common, "--trainer.max_steps", K, "--run_root", tmp_path, "--run_name", "split") == 0
    halfway = load_state(tmp_path / "split" / "last.ckpt")
    assert halfway["global_step"] == K
    assert run_cli(*common, "--trainer.max_steps", 2 * K, "--run_root", tmp_path, "--run_name", "split",
                   "--ckpt_path", "last") == 0
    straight = load_state(tmp_path / "straight" / "last.ckpt")
    split = load_state(tmp_path / "split" / "last.ckpt")
    assert straight["global_step"] == split["global_step"] == 2 * K
    state = straight["state_dict"]
    assert (any(k.startswith("behavior.ema_net.") for k in state)
            and any(k.startswith("critic.q_target_net.") for k in state))
    _assert_same(state, split["state_dict"], "state_dict")  # weights, EMA copies, target Q
    _assert_same(straight["optimizer_states"], split["optimizer_states"], "optimizer_states")
    _assert_same(straight["lr_schedulers"], split["lr_schedulers"], "lr_schedulers")
    _assert_same(straight["idql_rng"], split["idql_rng"], "rng")
    # the second half really trained: every parameter group moved away from the step-K state
    for key in ("critic.v_net", "critic.q_net", "behavior.net", "behavior.ema_net"):
        names = [k for k in state if k.startswith(key + ".")]
        assert any(not torch.equal(state[k], halfway["state_dict"][k]) for k in names), key


def _train_losses(run_dir):
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {(row["step"], k): float(v) for row in rows for k, v in row.items()
            if k.startswith("train/") and v}


def test_resumed_run_keeps_the_metrics_history(tmp_path):
    """Lightning's CSVLogger deletes metrics.csv when a run in the same folder starts logging; a resume keeps
    the rows up to its checkpoint, so the resumed run's losses equal the uninterrupted run's, row for row."""
    assert run_cli(*COMMON, "--trainer.max_steps", 2 * K, "--run_root", tmp_path,
                   "--run_name", "straight") == 0
    assert run_cli(*COMMON, "--trainer.max_steps", K, "--run_root", tmp_path, "--run_name", "split") == 0
    # a killed run may have logged past its last checkpoint: the resume redoes that step, so its row goes
    metrics = tmp_path / "split" / "csv" / "metrics.csv"
    header = metrics.read_text().splitlines()[0].split(",")
    with open(metrics, "a") as f:
        f.write(",".join(str(K + 1) if c == "step" else ("123.0" if c == "train/critic/q_loss" else "")
                         for c in header)
                + "\n")
    assert run_cli(*COMMON, "--trainer.max_steps", 2 * K, "--run_root", tmp_path, "--run_name", "split",
                   "--ckpt_path", "last") == 0
    straight, split = _train_losses(tmp_path / "straight"), _train_losses(tmp_path / "split")
    assert len(straight) >= 2 * K and {s for s, _ in straight} == {s for s, _ in split}
    assert split == straight


BASELINES = {
    "iql_quickstart.yaml": ["--model.critic.hidden_dims", "[32, 32]", "--model.critic.batch_size", "32",
                            "--model.actor_hidden_dims", "[32, 32]"],
    "bc_quickstart.yaml": ["--model.hidden_dim", "32", "--model.ff_dim", "64", "--model.batch_size", "64"],
}


@pytest.mark.parametrize("config", list(BASELINES))
def test_iql_and_diffusion_bc_resume_from_a_checkpoint_path(tmp_path, config):
    """``--ckpt_path <run>/last.ckpt`` (what ``python -m idql_pl.suite`` passes): Lightning parses the
    checkpoint's hyperparameters into the config; when they named no class they were read as IDQL's, so IQL
    and diffusion BC runs could not resume (``Option 'beta' is not accepted``). They carry ``_class_path``."""
    common = ["fit", "--config", CONFIGS / config, *SMALL_MAZE, *BASELINES[config], "--trainer.accelerator",
              "cpu", "--trainer.enable_progress_bar", "false", "--eval.every_n_steps", "0", "--eval.at_end",
              "false", "--checkpoint.every_n_train_steps", str(K), "--run_root", tmp_path,
              "--run_name", "run"]
    assert run_cli(*common, "--trainer.max_steps", K) == 0
    ckpt = tmp_path / "run" / "last.ckpt"
    first = load_state(ckpt)
    assert run_cli(*common, "--trainer.max_steps", 2 * K, "--ckpt_path", ckpt) == 0
    resumed = load_state(ckpt)
    assert (first["global_step"], resumed["global_step"]) == (K, 2 * K)
    assert resumed["hyper_parameters"] == first["hyper_parameters"]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["class_path"]
    assert saved == yaml.safe_load((CONFIGS / config).read_text())["model"]["class_path"]

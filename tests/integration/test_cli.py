"""The CLI end to end: every config's structure fits (tiny sizes), validate from a checkpoint,
--print_config round-trips, the sweep's keys are accepted, each half trains alone."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, load_state, read_csv, run_cli


@pytest.mark.parametrize("config", ["quickstart", "loco", "antmaze", "maze2d"])
def test_fit_each_config_structure(config, tmp_path):
    code = run_cli("fit", "--config", CONFIGS / f"{config}.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                   "--run_root", tmp_path, "--run_name", "r")
    assert code == 0
    run = tmp_path / "r"
    assert (run / "config.yaml").is_file() and (run / "last.ckpt").is_file()
    ckpt = load_state(run / "last.ckpt")
    assert ckpt["global_step"] == 6  # one Lightning-counted step per critic step
    assert (any(k.startswith("behavior.ema") for k in ckpt["state_dict"])
            or any("ema" in k for k in ckpt["state_dict"]))
    assert (run / "csv" / "metrics.csv").is_file()


def test_fresh_fit_never_overwrites_a_run(tmp_path):
    args = ("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
            "--run_root", tmp_path)
    assert run_cli(*args) == 0
    assert run_cli(*args) == 0
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert len(runs) == 2 and runs[1] == runs[0] + "-1"


def record_noise_seeds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The seed of each evaluation's policy-noise generator, in order, from now on."""
    import idql_pl.training.evaluation as evaluation

    seeds: list[int] = []
    real_rollout = evaluation.rollout

    def recording_rollout(env, policy, episode_seeds, device, generator, *args, **kwargs):
        seeds.append(generator.initial_seed())
        return real_rollout(env, policy, episode_seeds, device, generator, *args, **kwargs)

    monkeypatch.setattr(evaluation, "rollout", recording_rollout)
    return seeds


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    """One tiny quickstart fit, evaluated at its last step (6); each test validates its own copy."""
    root = tmp_path_factory.mktemp("fitted")
    with pytest.MonkeyPatch.context() as mp:
        noise_seeds = record_noise_seeds(mp)
        assert run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                       "--eval.at_end", "true", "--run_root", root, "--run_name", "r") == 0
    return root / "r", noise_seeds


def test_validate_from_checkpoint_runs_the_requested_episodes(fitted_run, tmp_path):
    run = shutil.copytree(fitted_run[0], tmp_path / "r")
    code = run_cli("validate", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL,
                   "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
                   "--eval.num_episodes", "3", "--eval.num_envs", "3", "--eval.num_samples", "2",
                   "--eval.extraction", "implicit", "--ckpt_path", run / "last.ckpt")
    assert code == 0
    assert (run / "config_validate.yaml").is_file()  # beside the fit's config.yaml, never over it
    rows = read_csv(run / "eval_episodes.csv")
    validate_rows = [r for r in rows if r["stage"] == "validate"]
    assert sorted(int(r["episode"]) for r in validate_rows) == [0, 1, 2]
    metrics = read_csv(run / "csv_validate" / "metrics.csv")
    logged = [float(m["eval/return"]) for m in metrics if m.get("eval/return")]
    assert logged and logged[-1] == pytest.approx(sum(float(r["return"]) for r in validate_rows) / 3,
                                                  rel=1e-6)


def test_validate_replays_the_fits_final_evaluation_and_keeps_its_curve(fitted_run, tmp_path, monkeypatch):
    """validate evaluates at the checkpoint's step (Lightning restores global_step for fit only): the same
    policy noise and rows as the fit's evaluation at that step; the run's eval_curve.png stays as fit drew
    it."""
    run = shutil.copytree(fitted_run[0], tmp_path / "r")
    curve = (run / "eval_curve.png").read_bytes()
    noise_seeds = record_noise_seeds(monkeypatch)
    assert run_cli("validate", "--config", run / "config.yaml", "--ckpt_path", run / "last.ckpt") == 0
    assert len(fitted_run[1]) == 1 and noise_seeds == fitted_run[1]

    def episodes(stage):
        return [(r["step"], r["episode"], r["return"], r["length"]) for r in rows if r["stage"] == stage]

    rows = read_csv(run / "eval_episodes.csv")
    assert [r[0] for r in episodes("fit")] == ["6", "6"]
    assert episodes("validate") == episodes("fit")
    assert (run / "eval_curve.png").read_bytes() == curve


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", CONFIGS / "loco.yaml", "--model.critic.tau", "0.8", "--print_config")
    assert exit_info.value.code == 0
    first = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(first)
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", tmp_path / "printed.yaml", "--print_config")
    second = capsys.readouterr().out
    assert first == second
    cfg = yaml.safe_load(first)
    assert cfg["model"]["init_args"]["critic"]["init_args"]["tau"] == 0.8
    assert cfg["model"]["class_path"] == "idql_pl.IDQL"


def test_every_sweep_key_is_accepted(capsys):
    sweep = yaml.safe_load((CONFIGS / "sweep_loco.yaml").read_text())
    assert sweep["command"][-1] == "${args}" and "configs/loco.yaml" in sweep["command"]
    for key, spec in sweep["parameters"].items():
        value = spec["values"][-1]
        with pytest.raises(SystemExit) as exit_info:
            run_cli("fit", "--config", CONFIGS / "loco.yaml", f"--{key}={value}", "--print_config")
        assert exit_info.value.code == 0, key
        cfg = yaml.safe_load(capsys.readouterr().out)
        node = cfg
        for part in key.split("."):
            node = node["init_args"][part] if "init_args" in node and part not in node else node[part]
        assert node == value, key


@pytest.mark.parametrize("dataset", [["--data.dataset", "local/bandit"], SMALL_MAZE])
def test_critic_alone(dataset, tmp_path):
    code = run_cli("fit", "--model", "idql_pl.ImplicitCritic", *dataset, "--model.hidden_dims", "[32, 32]",
                   "--model.batch_size", "32", *TINY_TRAINER, "--run_root", tmp_path, "--run_name", "c")
    assert code == 0
    ckpt = load_state(tmp_path / "c" / "last.ckpt")
    assert ckpt["global_step"] == 6
    assert not any(k.startswith("behavior") for k in ckpt["state_dict"])


@pytest.mark.parametrize("dataset", [["--data.dataset", "local/bandit"], SMALL_MAZE])
def test_behavior_alone(dataset, tmp_path):
    code = run_cli("fit", "--model", "idql_pl.DiffusionBehavior", *dataset, "--model.hidden_dim", "32",
                   "--model.ff_dim", "64", "--model.batch_size", "64", *TINY_TRAINER,
                   "--eval.every_n_steps", "3", "--run_root", tmp_path, "--run_name", "b")
    assert code == 0
    ckpt = load_state(tmp_path / "b" / "last.ckpt")
    assert ckpt["global_step"] == 6
    rows = read_csv(tmp_path / "b" / "eval_episodes.csv")
    assert {int(r["step"]) for r in rows} == {3, 6}  # the behavior model alone is evaluated as a BC policy


def test_bf16_mixed_precision_fit_and_eval(tmp_path):
    """The bf16 autocast path (training and the extraction sampler) runs end to end; weights stay float32."""
    code = run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                   "--trainer.precision", "bf16-mixed", "--eval.precision", "bf16",
                   "--eval.every_n_steps", "6", "--run_root", tmp_path, "--run_name", "bf16")
    assert code == 0
    ckpt = load_state(tmp_path / "bf16" / "last.ckpt")
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert len(read_csv(tmp_path / "bf16" / "eval_episodes.csv")) == 2


@pytest.mark.parametrize("wandb_mode", [None, "offline"])
def test_wandb_offline_run_resumes_under_the_same_id(tmp_path, monkeypatch, wandb_mode):
    """With no W&B API key anywhere (a fresh machine), or with WANDB_MODE=offline, runs log offline."""
    import wandb

    wandb.teardown()  # wandb keeps process-wide settings: start from none
    if wandb_mode:
        monkeypatch.setenv("WANDB_MODE", wandb_mode)
    else:
        monkeypatch.delenv("WANDB_MODE", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
        monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    args = ("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
            "--run_root", tmp_path, "--run_name", "w")
    assert run_cli(*args, "--trainer.max_steps", "3") == 0
    run_id = (tmp_path / "w" / "wandb_run_id.txt").read_text().strip()
    assert run_cli(*args, "--trainer.max_steps", "6", "--ckpt_path", "last") == 0
    runs = sorted(p.name for p in (tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs), runs

"""An evaluation through the command line with videos (``--eval.video_episodes``), several N
(``--eval.num_samples "[...]"``) and TensorBoard (``--tensorboard true``); one N keeps the usual metrics
only."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, read_csv, run_cli

SHORT = ["--data.max_episode_steps", "20", "--eval.num_episodes", "3", "--eval.num_envs", "2"]


def test_fit_films_an_episode_and_scores_several_n_side_by_side(tmp_path, monkeypatch):
    """A pointmaze fit (the model's N 4) evaluated with N 2 and 8: one MP4 of the first episode that PyAV
    decodes (its frames differ as the point moves), ``eval/N2/*`` and ``eval/N8/*`` beside the usual
    ``eval/*`` of N 4, which is played too; the CSV names each row's N; TensorBoard writes an events file."""
    av = pytest.importorskip("av")
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("MUJOCO_GL", "egl")  # offscreen through Mesa's libEGL, on the CPU
    args = ["--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER, *SHORT]
    assert run_cli("fit", *args, "--run_root", tmp_path, "--run_name", "v", "--eval.video_episodes", "1",
                   "--eval.video_size", "64", "--eval.num_samples", "[2, 8]", "--tensorboard", "true") == 0
    run = tmp_path / "v"

    videos = sorted(p.name for p in (run / "videos").iterdir())
    assert videos == ["step6_ep0.mp4"]
    with av.open(str(run / "videos" / videos[0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 21 and frames[0].shape == (64, 64, 3)  # the reset and 20 steps
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 0.05

    metrics = read_csv(run / "csv" / "metrics.csv")
    last = [r for r in metrics if r.get("eval/normalized_score")][-1]
    for name in ("eval/N2/normalized_score", "eval/N2/return", "eval/N8/normalized_score", "eval/N8/return",
                 "eval/normalized_score", "eval/return"):
        assert last.get(name) not in (None, ""), name
    assert not any(name.startswith("eval/N4") for name in last)  # the model's N: the usual metrics

    rows = read_csv(run / "eval_episodes.csv")
    at_end = [r for r in rows if r["step"] == "6"]
    by_n = {n: [r["seed"] for r in at_end if r["num_samples"] == n] for n in ("2", "4", "8")}
    assert by_n["2"] == by_n["4"] == by_n["8"] and len(by_n["4"]) == 3  # the same seeded episodes per N
    assert {r["model_n"] for r in at_end if r["num_samples"] == "4"} == {"1"}
    returns = [float(r["return"]) for r in at_end if r["num_samples"] == "4"]
    assert float(last["eval/return"]) == pytest.approx(np.mean(returns))
    assert (run / "eval_curve.png").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_one_n_keeps_the_usual_metrics_and_renders_nothing(tmp_path):
    args = ["--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER, *SHORT]
    assert run_cli("fit", *args, "--run_root", tmp_path, "--run_name", "one", "--eval.num_samples", "2") == 0
    run = tmp_path / "one"
    names = set(read_csv(run / "csv" / "metrics.csv")[0])
    assert "eval/normalized_score" in names and not any(n.startswith("eval/N") for n in names)
    rows = read_csv(run / "eval_episodes.csv")
    assert (len(rows) == 3 and {r["num_samples"] for r in rows} == {"2"}
            and {r["model_n"] for r in rows} == {"1"})
    assert not (run / "videos").exists() and not (run / "tensorboard").exists()


def test_videos_on_an_env_that_cannot_render_are_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "disable")
    args = ["--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER, *SHORT]
    assert run_cli("fit", *args, "--run_root", tmp_path, "--run_name", "bad",
                   "--eval.video_episodes", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "MUJOCO_GL=egl" in err and "--eval.video_episodes" in err

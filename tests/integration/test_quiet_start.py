"""A quiet start and an honest progress bar: non-actionable third-party notices are dropped by text and kind
(never all warnings, and a real warning of ours still prints); progress counts steps of max_steps with the
rate, the ETA and the latest eval/normalized_score; outside a terminal it is one plain line every N steps."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import warnings

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from idql_pl import runtime
from idql_pl.data.local import minari_id
from idql_pl.training.progress import StepProgressBar
from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, run_cli

NOISE = ("reward functions were updated in v1.2.1", "litlogger", "anonymous setting has no effect",
         "limit_val_batches=1)` was configured", "isinstance(treespec, LeafSpec)", "pre-optimization state",
         "Epoch ", "v_num")


def test_filters_are_narrow_by_message_and_category():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        runtime.drop_notices()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        # other kind
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", UserWarning, stacklevel=1)
        warnings.warn("cached dataset /x is unreadable; regenerating it", UserWarning, stacklevel=1)  # ours
        warnings.warn("something else deprecated", FutureWarning, stacklevel=1)
    texts = [(str(w.message), w.category) for w in seen]
    assert ("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning) not in texts
    assert ("`isinstance(treespec, LeafSpec)` is deprecated, use ...", UserWarning) in texts
    assert ("cached dataset /x is unreadable; regenerating it", UserWarning) in texts
    assert ("something else deprecated", FutureWarning) in texts


def test_log_filter_drops_only_the_named_records():
    runtime.drop_notices()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        logger.info("💡 Tip: For seamless cloud logging and experiment tracking,"
                    " try installing [litlogger](...)")
        logger.info("GPU available: False, used: False")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert stream.getvalue() == "GPU available: False, used: False\n"


@pytest.mark.timeout(400)
def test_cli_start_is_quiet_but_our_own_warning_gets_through(tmp_path):
    """A real `python -m idql_pl fit` with W&B offline and a damaged dataset cache: the notices above are
    gone, the dataset summary, run folder and our own 'regenerating' warning are there, progress is plain
    lines."""
    datasets = tmp_path / "minari"
    (datasets / minari_id("local/pointmaze-umaze", 4000)).mkdir(parents=True)  # a damaged cache: ours warns
    env = {**os.environ, "MINARI_DATASETS_PATH": str(datasets), "WANDB_MODE": "offline",
           "HOME": str(tmp_path / "home"), "WANDB_CONFIG_DIR": str(tmp_path / "home" / "wandb"),
           "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    env.pop("WANDB_SILENT", None)
    proc = subprocess.run([sys.executable, "-m", "idql_pl", "fit",
                           "--config", str(CONFIGS / "quickstart.yaml"),
                           *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER, "--trainer.enable_progress_bar", "true",
                           "--eval.every_n_steps", "4", "--trainer.max_steps", "8",
                           "--trainer.log_every_n_steps", "4", "--run_root", str(tmp_path / "runs"),
                           "--run_name", "q"],
                          env=env, capture_output=True, text=True, timeout=360)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for noise in NOISE:
        assert noise not in out, noise
    assert not [ln for ln in out.splitlines() if ln.startswith("wandb: WARNING")], out[-3000:]  # deprecations
    assert "regenerating it" in proc.stderr  # a real warning of our own (UserWarning from idql_pl.data)
    assert "transitions      4,000" in out and f"[idql_pl] run folder: {tmp_path / 'runs' / 'q'}" in out
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("[idql_pl] critic step")]
    assert [ln.split(" | ")[0] for ln in progress] == ["[idql_pl] critic step 4/8 (50%)",
                                                       "[idql_pl] critic step 8/8 (100%)"]
    assert "steps/s" in progress[0] and "ETA" in progress[0]
    # each line is printed after its step's evaluation, so it shows that evaluation's score, not the last one
    evals = dict(re.findall(r"\[eval\] step (\d+): .*?normalized score (-?[\d.]+)", out))
    assert sorted(evals) == ["4", "8"], out[-3000:]
    assert [ln.rsplit(" | ", 1)[1] for ln in progress] == [f"eval/normalized_score {evals[s]}" for s in "48"]
    assert "\r" not in proc.stderr


def test_non_interactive_progress_lines(tmp_path, capsys):
    assert run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                   "--trainer.enable_progress_bar", "true", "--trainer.log_every_n_steps", "2",
                   "--run_root", tmp_path, "--run_name", "p") == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("[idql_pl] critic step")]
    assert [ln.split(" | ")[0] for ln in lines] == [f"[idql_pl] critic step {s}/6 ({p}%)" for s, p in
                                                    ((2, 33), (4, 67), (6, 100))]
    assert "\r" not in err and "Epoch" not in err and "v_num" not in err


def test_interactive_bar_counts_steps_not_epochs(tmp_path):
    stream = io.StringIO()
    bar = StepProgressBar(interactive=True, stream=stream)
    trainer = L.Trainer(max_steps=5, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar], default_root_dir=tmp_path,
                        accelerator="cpu")
    trainer.fit(BoringModel())
    text = stream.getvalue()
    assert "5/5" in text and "steps/s" in text
    assert "Epoch" not in text and "v_num" not in text
    assert bar.get_metrics(trainer, trainer.lightning_module).get("v_num") is None


def test_line_format():
    bar = StepProgressBar()
    bar.label = "critic step"
    line = bar.format_line(5000, 25000, elapsed=50.0, done=5000, score=13.64)
    assert line == ("[idql_pl] critic step 5,000/25,000 (20%) | 100.0 steps/s | elapsed 0:00:50 | ETA 0:03:20"
                    " | eval/normalized_score 13.6")

"""Precision under a Trainer and the CLI: 16-mixed refused before its first step; bf16 on a CPU without native
bf16 said at start."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from idql_pl.data import OfflineDataModule
from idql_pl.errors import ConfigError
from idql_pl.training import precision
from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, run_cli


def test_16_mixed_is_refused_before_its_first_step(tmp_path) -> None:
    """With Lightning's gradient scaler in place (what 16-mixed gets on a GPU; here a CPU scaler), the run
    stops at setup with the one-line error instead of "No inf checks were recorded" after its first step. (On
    a CPU Lightning itself swaps 16-mixed for bf16-mixed; the CLI refuses that too:
    tests/integration/test_bad_inputs.py.)"""
    from functools import partial

    from idql_pl import IDQL, DiffusionBehavior, ImplicitCritic

    data = OfflineDataModule("local/pointmaze-umaze", dataset_size=4000)
    model = IDQL(data.obs_dim, data.action_dim,
                 critic=partial(ImplicitCritic, hidden_dims=[16, 16], batch_size=8),
                 behavior=partial(DiffusionBehavior, hidden_dim=16, ff_dim=32, batch_size=8))
    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = L.Trainer(accelerator="cpu", plugins=[scaled], max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match="bf16-mixed"):
        trainer.fit(model, datamodule=data)


def test_bf16_on_a_cpu_without_native_bf16_says_so(tmp_path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    assert run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                   "--trainer.max_steps", "2", "--trainer.precision", "bf16-mixed", "--eval.at_end", "false",
                   "--run_root", tmp_path, "--run_name", "bf16") == 0
    lines = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(lines) == 1 and "--trainer.precision bf16-mixed" in lines[0] and "32-true" in lines[0]

"""Traps found by trying bad inputs, and a full disk: each is one ``error:`` line, exit 2, nothing damaged.
- ``validate`` without ``--ckpt_path`` would evaluate an untrained model: an error naming the fix;
- a YAML syntax error in a ``--config`` names the file, line and column;
- ``--ckpt_path`` naming a directory says so and lists the checkpoints in it;
- a checkpoint save that fails for lack of space leaves the previous checkpoint intact."""

from __future__ import annotations

import errno

import pytest
import torch

from idql_pl.errors import CheckpointError
from idql_pl.training.checkpointing import AtomicCheckpointIO, safe_load
from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, load_state, run_cli

FIT = ("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
       "--eval.at_end", "false")
VALIDATE = ("validate", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL,
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert run_cli(*FIT, "--run_root", root, "--run_name", "r") == 0
    return root


def _one_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    print(f"\n{lines[0]}")
    return lines[0]


def test_validate_without_a_checkpoint(capsys, tmp_path):
    line = _one_error(capsys, run_cli(*VALIDATE, "--run_root", tmp_path))
    assert "validate needs a trained model" in line and "--ckpt_path" in line
    assert not any(tmp_path.iterdir())  # nothing was evaluated or written


def test_yaml_syntax_error_names_file_line_and_column(capsys, tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("trainer:\n  max_steps: 100\nmodel:\n  init_args:\n"
                   "    num_samples: [1, 2\n    extraction: argmax\n")
    line = _one_error(capsys, run_cli("fit", "--config", bad, "--run_root", tmp_path))
    assert str(bad) in line and "line 6, column 15" in line, line
    assert "YAML syntax error" in line


def test_yaml_error_in_a_command_line_value(capsys, tmp_path):
    line = _one_error(capsys, run_cli(*FIT, "--model.critic.hidden_dims", "[32, 32", "--run_root", tmp_path))
    assert "command-line value" in line or "hidden_dims" in line, line


def test_ckpt_path_that_is_a_directory_lists_its_checkpoints(capsys, trained):
    run = trained / "r"
    line = _one_error(capsys, run_cli(*VALIDATE, "--ckpt_path", run, "--run_root", trained))
    assert "is a directory" in line and "last.ckpt" in line and str(run / "last.ckpt") in line, line
    line = _one_error(capsys, run_cli(*VALIDATE, "--ckpt_path", trained, "--run_root", trained))
    assert "is a directory" in line and "r/last.ckpt" in line, line  # the run folders under a run root
    empty = trained / "empty"
    empty.mkdir()
    line = _one_error(capsys, run_cli(*FIT, "--ckpt_path", empty, "--run_root", trained))
    assert "holds no .ckpt files" in line, line


def _enospc_after(n_ok: int, monkeypatch):
    original, calls = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= n_ok:
            return original(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 part of a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)


def test_no_space_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, path)
    _enospc_after(0, monkeypatch)
    with pytest.raises(CheckpointError, match="no space left on the device") as info:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert "the previous last.ckpt is intact" in str(info.value)
    assert safe_load(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_fit_running_out_of_space_is_one_line(tmp_path, monkeypatch, capsys):
    _enospc_after(1, monkeypatch)  # the step-3 save succeeds, the step-6 one finds the disk full
    line = _one_error(capsys, run_cli(*FIT, "--run_root", tmp_path, "--run_name", "full"))
    monkeypatch.undo()
    assert "no space left" in line and "previous last.ckpt is intact" in line, line
    assert load_state(tmp_path / "full" / "last.ckpt")["global_step"] == 3
    assert not [p for p in (tmp_path / "full").iterdir() if p.name.endswith(".tmp")]

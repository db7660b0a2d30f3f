"""compile: true under fit: the whole iteration is compiled, and nothing is without the flag."""

from __future__ import annotations

import torch

from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, run_cli


def test_compile_true_under_fit_compiles_the_whole_iteration(aot_eager, tmp_path) -> None:
    code = run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                   "--model.compile", "true", "--run_root", tmp_path, "--run_name", "c")
    assert code == 0
    assert aot_eager == ["IDQLModule.compile_training.<locals>.functional"]  # one function: the iteration
    state = torch.load(tmp_path / "c" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    assert state["optimizer_states"][0]["state"][0]["step"] == 12  # 2 behavior steps per iteration


def test_without_the_flag_nothing_is_compiled(aot_eager, tmp_path) -> None:
    assert run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                   "--run_root", tmp_path, "--run_name", "e") == 0
    assert aot_eager == []

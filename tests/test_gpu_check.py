"""``make gpu-check``'s script on a CPU machine: its plan, the missing-package report, and the wheel install's
behavior without wheels (the GPU steps themselves need a CUDA machine)."""

from __future__ import annotations

import json

from idql_pl import gpu_check


def test_dry_run_writes_the_plan(tmp_path) -> None:
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["steps"]) == {"cuda_tests", "fit_loco_local", "benchmark"}
    assert "tests/test_cuda.py" in report["steps"]["cuda_tests"]["command"]
    fit = report["steps"]["fit_loco_local"]["command"]
    assert "configs/loco.yaml" in fit and "local/pointmaze-umaze" in fit and "--trainer.max_time 00:00:02:00" in fit
    bench = report["steps"]["benchmark"]["command"]
    assert "--compile" in bench and "--agents 1,10" in bench and "--device cuda" in bench
    assert all("returncode" not in step for step in report["steps"].values())  # nothing ran
    assert "torch" in report["machine"]


def test_missing_packages_are_named_and_installed_only_from_wheels(tmp_path) -> None:
    needed = {"json": "json-is-stdlib", "surely_not_a_module_xyz": "surely-not-a-dist"}
    assert gpu_check.missing_packages(needed) == ["surely-not-a-dist"]
    installed, log = gpu_check.install_from_wheels(["surely-not-a-dist"], tmp_path / "no-wheels-here")
    assert installed == [] and "no wheels directory" in log
    (tmp_path / "wheels").mkdir()
    installed, log = gpu_check.install_from_wheels(["surely-not-a-dist"], tmp_path / "wheels")
    assert installed == [] and "surely-not-a-dist: failed" in log  # pip --no-index finds nothing: no download

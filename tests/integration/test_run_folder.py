"""Two fits started at once with the same run name never share a run folder: the folder is claimed atomically
(an exclusive flock held for the life of the process; an atomic mkdir where flock is unsupported), and the
second takes the next suffix. A resumed run refuses a folder that a live fit holds."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from idql_pl.training import run_folder
from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, load_state, run_cli

REPO = Path(__file__).resolve().parents[2]

# The claimers load run_folder.py by path: a claim needs nothing of torch, and four interpreters importing
# torch at once on a small machine would take long to reach the barrier.
LOAD = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('run_folder', {path!r}); "
        "run_folder = importlib.util.module_from_spec(spec); spec.loader.exec_module(run_folder)\n")
CLAIMER = LOAD.format(path=str(REPO / "idql_pl" / "training" / "run_folder.py")) + """
import json, os, time
from pathlib import Path
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):  # all claimers leave the barrier together
    pass
path = run_folder.claim_fresh(Path(sys.argv[1]))
print(json.dumps(str(path)), flush=True)
time.sleep(2)  # hold the claim while the others try
"""
CLAIM_ONCE = LOAD.format(path=str(REPO / "idql_pl" / "training" / "run_folder.py")) + (
    "from pathlib import Path; print(run_folder.claim_fresh(Path(sys.argv[1])))")


@pytest.fixture(autouse=True)
def _release():
    yield
    run_folder.release_all()


def test_racing_processes_each_claim_their_own_folder(tmp_path):
    base, go = tmp_path / "same-name", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(base), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    claimed = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        claimed.append(json.loads(out.splitlines()[-1]))
    assert sorted(claimed) == sorted({str(base), f"{base}-1", f"{base}-2", f"{base}-3"}), claimed


def test_a_claim_is_held_while_the_process_lives_and_released_after(tmp_path):
    base = tmp_path / "r"
    first = run_folder.claim_fresh(base)
    assert first == base
    other = subprocess.run([sys.executable, "-c", CLAIM_ONCE, str(base)], capture_output=True, text=True,
                           timeout=60)
    assert other.stdout.strip() == f"{base}-1", other.stderr  # held by this (live) process: the next suffix
    run_folder.release_all()
    again = subprocess.run([sys.executable, "-c", CLAIM_ONCE, str(base)], capture_output=True, text=True,
                           timeout=60)
    assert again.stdout.strip() == str(base)  # released, and it holds no checkpoint: free again


def test_folders_with_checkpoints_are_skipped(tmp_path):
    base = tmp_path / "r"
    base.mkdir()
    (base / "last.ckpt").write_bytes(b"x")
    assert run_folder.claim_fresh(base) == Path(f"{base}-1")


def test_mkdir_claim_where_flock_is_unsupported(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    base = tmp_path / "nfs"
    assert run_folder.claim_fresh(base) == base and (base / run_folder.CLAIM_DIR).is_dir()
    assert run_folder.claim_fresh(base) == Path(f"{base}-1")  # the marker is there: the next suffix
    run_folder.release_all()
    assert not (base / run_folder.CLAIM_DIR).exists()
    assert run_folder.claim_fresh(base) == base


def test_a_requeued_slurm_job_takes_its_own_folder_back(tmp_path):
    base = tmp_path / "r"
    base.mkdir()
    (base / "last.ckpt").write_bytes(b"x")
    (base / "hpc_ckpt_1.ckpt").write_bytes(b"x")
    (base / run_folder.SLURM_JOB_FILE).write_text("123")
    assert run_folder.claim_fresh(base, slurm_job="123") == base  # Lightning then resumes its hpc_ckpt
    run_folder.release_all()
    other = run_folder.claim_fresh(base, slurm_job="456")
    assert other == Path(f"{base}-1") and (other / run_folder.SLURM_JOB_FILE).read_text() == "456"


FIT = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
       "--eval.at_end", "false"]


@pytest.mark.timeout(600)
def test_two_fits_started_at_once_with_one_name_get_two_folders(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "idql_pl", *FIT, "--run_root", str(tmp_path), "--run_name", "twin"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=500)
        assert proc.returncode == 0, err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twin", "twin-1"]
    for name in ("twin", "twin-1"):
        assert load_state(tmp_path / name / "last.ckpt")["global_step"] == 6
        assert len((tmp_path / name / "csv" / "metrics.csv").read_text().splitlines()) > 1


def test_resume_refuses_a_folder_a_live_fit_holds(tmp_path, capsys):
    assert run_cli(*FIT, "--run_root", tmp_path, "--run_name", "busy") == 0
    code = LOAD.format(path=str(REPO / "idql_pl" / "training" / "run_folder.py")) + (
        "import time; from pathlib import Path; run_folder.try_claim(Path(sys.argv[1]));"
        " print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "busy")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_cli(*FIT, "--run_root", tmp_path, "--run_name", "busy", "--ckpt_path", "last") == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "in use by another fit" in lines[0], lines
    finally:
        holder.kill()
        holder.wait()

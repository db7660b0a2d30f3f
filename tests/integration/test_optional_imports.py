"""W&B, rliable and submitit are optional: only ``wandb`` logging, ``idql_pl.experiments.report`` and
``idql_pl.experiments.suite --launcher slurm`` use them. In a process where importing them fails (a meta-path
blocker that also records who asked), ``import idql_pl``, a W&B-disabled ``fit`` (evaluation and checkpoint
included), ``validate``, the benchmark and the GPU check's plan all work, and no module of the package tried
to import them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OPTIONAL = ("wandb", "rliable", "submitit")

SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys, traceback
    OPTIONAL = set(sys.argv[2].split(","))
    attempts = []

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in OPTIONAL:
                frames = [f.filename for f in traceback.extract_stack()]
                attempts.append({"module": name, "from_idql_pl": [f for f in frames if "/idql_pl/" in f]})
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    for name in list(sys.modules):  # nothing of theirs is loaded before the blocker
        assert name.split(".")[0] not in OPTIONAL, name
    sys.meta_path.insert(0, Blocker())

    import idql_pl
    from idql_pl import IDQL, IQL, DiffusionBehavior, ImplicitCritic, OfflineDataModule, OnlineIDQL
    import idql_pl.experiments.benchmark, idql_pl.training.cli, idql_pl.experiments.gpu_check  # noqa: F401
    import idql_pl.experiments.report, idql_pl.experiments.suite  # noqa: F401
    from idql_pl.training.cli import main

    run_root = sys.argv[1]
    common = [
        "--config", "configs/quickstart.yaml", "--data.dataset", "local/pointmaze-umaze",
        "--data.dataset_size", "3000", "--model.critic.hidden_dims", "[16, 16]",
        "--model.critic.batch_size", "16", "--model.behavior.hidden_dim", "16",
        "--model.behavior.ff_dim", "32", "--model.behavior.batch_size", "16",
        "--model.num_samples", "2", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--eval.num_episodes", "2", "--eval.num_envs", "2",
    ]
    fit = main([
        "fit", *common, "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "2",
        "--trainer.val_check_interval", "2", "--eval.every_n_steps", "4",
        "--checkpoint.every_n_train_steps", "2", "--run_root", run_root, "--run_name", "r",
    ])
    validate = main(["validate", *common, "--ckpt_path", run_root + "/r/last.ckpt"])
    bench = idql_pl.experiments.benchmark.main([
        "--tiny", "--repeats", "1", "--threads", "1", "--only", "critic", "--device", "cpu",
        "--dataset_size", "3000",
    ])
    plan = idql_pl.experiments.gpu_check.main(["--plan"])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in OPTIONAL)
    print(json.dumps({"fit": fit, "validate": validate, "bench": bench, "plan": plan, "loaded": loaded,
                      "attempts": attempts}))
""")


def test_wandb_rliable_submitit_are_never_imported_by_fit_validate_benchmark_or_gpu_check(
    tmp_path: Path,
) -> None:
    env = {
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "MUJOCO_GL": "disable",
        "OMP_NUM_THREADS": "1",
        "MINARI_DATASETS_PATH": str(tmp_path / "minari"),
        "D4RL_DATASET_DIR": str(tmp_path / "d4rl"),
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "runs"), ",".join(OPTIONAL)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["fit"], result["validate"], result["bench"], result["plan"]) == (0, 0, 0, 0), proc.stderr[
        -3000:
    ]
    assert (tmp_path / "runs" / "r" / "last.ckpt").is_file()
    assert result["loaded"] == []
    by_package = [a for a in result["attempts"] if a["from_idql_pl"]]
    assert by_package == [], by_package  # an eager (even guarded) import in the package's import graph

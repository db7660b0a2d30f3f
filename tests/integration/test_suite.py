"""python -m idql_pl.suite: expansion, run state (skip / resume / conflict), the local launcher, the SLURM job
array through submitit's local executor, and the W&B sweep files."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from idql_pl.entrypoint import CLOSED_PIPE_EXIT
from idql_pl.errors import ConfigError
from idql_pl.experiments import suite
from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, read_csv, run_cli

TINY = [*SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER]  # passed to every run of the quickstart-seeds suite


def test_table1_expands_into_paper_runs(tmp_path):
    runs = suite.expand("table1", root=tmp_path)
    assert len(runs) == 15 * 10 and len({r.name for r in runs}) == 150
    by_config = {}
    for r in runs:
        by_config.setdefault(Path(r.config).name, set()).add(r.dataset)
    assert by_config == {"loco.yaml": set(suite.LOCO_DATASETS), "antmaze.yaml": set(suite.ANTMAZE_DATASETS)}
    assert {r.seed for r in runs} == set(range(10))
    r = next(r for r in runs if r.dataset == "hopper-medium-replay-v2" and r.seed == 3)
    assert r.name == "hopper-medium-replay-v2-seed3" and r.run_dir == tmp_path.resolve() / r.name
    assert r.expected_max_steps() == 1_000_000  # the "-1" protocol
    assert "--model.num_samples=64" in r.fit_args()
    args = r.fit_args()
    assert args[:5] == ["fit", "--config", str(CONFIGS / "loco.yaml"),
                        "--data.dataset", "hopper-medium-replay-v2"]
    assert args[-4:] == ["--run_root", str(tmp_path.resolve()), "--run_name", r.name]


def test_suites_share_roots_and_protocol_a_keeps_the_configs():
    full = {(r.dataset, r.seed): r for r in suite.expand("table1", seeds=[0])}
    for part in ("table1-loco", "table1-antmaze"):
        for r in suite.expand(part, seeds=[0]):
            assert full[(r.dataset, r.seed)] == r  # the same run folder: a sub-suite's runs count for table1
    a = suite.expand("table1-antmaze", seeds=[0], protocol="A")
    assert (a[0].root.endswith("runs/table1-A") and a[0].overrides == ()
            and a[0].expected_max_steps() == 1_500_000)
    t5 = suite.expand("table5")
    assert ([r.dataset for r in t5[::10]] == list(suite.MAZE2D_DATASETS)
            and t5[0].expected_max_steps() == 1_000_000)
    q = suite.expand("quickstart-seeds")
    assert [(r.dataset, r.seed) for r in q] == [("local/pointmaze-umaze", s) for s in (0, 1, 2)]
    assert q[0].expected_max_steps() == 25_000 and q[0].root.endswith("runs/quickstart-seeds")


def test_argument_helpers():
    assert suite.parse_seeds("0-2,7") == (0, 1, 2, 7) and suite.parse_seeds("4") == (4,)
    assert suite.set_to_args(["trainer.max_steps=20", "data.ref_scores=[0, 1]"]) == [
        "--trainer.max_steps=20", "--data.ref_scores=[0, 1]"]
    q = suite.expand("quickstart-seeds", extra=["--trainer.max_steps", "20"])
    assert q[0].expected_max_steps() == 20
    for bad in (lambda: suite.parse_seeds("a-b"), lambda: suite.set_to_args(["trainer.max_steps"]),
                lambda: suite.expand("table9"), lambda: suite.expand("table1", datasets=["hopper-v9"])):
        with pytest.raises(ConfigError):
            bad()


def _fake_run(run_dir: Path, max_steps: int, eval_steps=(), ckpts=()):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_steps": max_steps}}))
    if eval_steps:
        rows = "".join(f"fit,{s},0,1000000,1.0,10\n" for s in eval_steps)
        (run_dir / "eval_episodes.csv").write_text("stage,step,episode,seed,return,length\n" + rows)
    for i, name in enumerate(ckpts):
        (run_dir / name).write_bytes(b"x")
        os.utime(run_dir / name, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))  # later in the list = newer


def test_status_skip_resume_and_conflict(tmp_path):
    run = suite.expand("quickstart-seeds", seeds=[0], root=tmp_path)[0]
    assert suite.status(run) == ("new", None)
    _fake_run(run.run_dir, 25_000, eval_steps=[12_500], ckpts=["last.ckpt", "hpc_ckpt_1.ckpt"])
    # Lightning's requeue checkpoint is newer
    assert suite.status(run) == ("resume", run.run_dir / "hpc_ckpt_1.ckpt")
    assert (run.fit_args(str(run.run_dir / "hpc_ckpt_1.ckpt"))[-2:]
            == ["--ckpt_path", str(run.run_dir / "hpc_ckpt_1.ckpt")])
    _fake_run(run.run_dir, 25_000, ckpts=["hpc_ckpt_1.ckpt", "last.ckpt"])
    assert suite.status(run)[1] == run.run_dir / "last.ckpt"
    _fake_run(run.run_dir, 25_000, eval_steps=[12_500, 25_000])
    assert suite.status(run) == ("done", None)
    smoke = suite.expand("quickstart-seeds", seeds=[1], root=tmp_path)[0]
    _fake_run(smoke.run_dir, 20, eval_steps=[20], ckpts=["last.ckpt"])
    with pytest.raises(ConfigError, match="trainer.max_steps=20 but this suite asks for 25000"):
        suite.status(smoke)


def test_dry_run_lists_states_and_commands(tmp_path, capsys):
    _fake_run(tmp_path / "local-pointmaze-umaze-seed1", 25_000, eval_steps=[25_000])
    assert suite.main(["quickstart-seeds", "--root", str(tmp_path), "--dry-run",
                       "--set", "eval.num_episodes=5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "3 runs" in out[0] and "(1 done, 0 to resume, 2 new)" in out[0]
    assert out[1].startswith("new     local-pointmaze-umaze-seed0: python -m idql_pl fit --config")
    assert "--eval.num_episodes=5" in out[1] and out[2].startswith("done ")
    assert suite.main(["quickstart-seeds", "--seeds", "x"]) == 2
    assert "error: --seeds 'x'" in capsys.readouterr().err


def _finished(run: "suite.Run") -> bool:
    rows = read_csv(run.run_dir / "eval_episodes.csv")
    return ({int(r["step"]) for r in rows if r["stage"] == "fit"} == {6}
            and (run.run_dir / "last.ckpt").is_file())


def test_listing_into_a_closed_pipe_ends_quietly(tmp_path):
    """`python -m idql_pl.suite ... --dry-run | head -1`: when the reader has gone, the command exits as a
    shell tool killed by SIGPIPE would (141), without a traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader leaves before the first line
    proc = subprocess.run([sys.executable, "-m", "idql_pl.suite", "table5-local", "--dry-run", "--root",
                           str(tmp_path)], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert proc.returncode == CLOSED_PIPE_EXIT == 141 and proc.stderr == "", proc.stderr[-2000:]


def test_local_launcher_runs_then_skips(tmp_path, capsys):
    argv = ["quickstart-seeds", "--seeds", "0", "--root", str(tmp_path), "--threads", "1", "--", *TINY]
    assert suite.main(argv) == 0
    run = suite.expand("quickstart-seeds", seeds=[0], root=tmp_path, extra=TINY)[0]
    assert _finished(run)
    cfg = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert (cfg["seed_everything"] == 0 and cfg["trainer"]["max_steps"] == 6
            and cfg["data"]["dataset_size"] == 4000)
    ends = [m for m in map(suite.END_LINE.match, (run.run_dir / "suite.log").read_text().splitlines()) if m]
    assert [(m["how"], m["threads"]) for m in ends] == [("exit 0", "1")] and float(ends[0]["seconds"]) > 0
    capsys.readouterr()
    assert suite.main(argv) == 0  # second time: nothing to do
    assert "nothing to do" in capsys.readouterr().out


def test_slurm_launcher_through_submitit_local_executor(tmp_path, capsys):
    """The SLURM path (a submitit job array, one task per run) on submitit's local executor: both runs
    finish."""
    argv = ["quickstart-seeds", "--seeds", "0-1", "--root", str(tmp_path), "--launcher", "slurm",
            "--submitit-cluster", "local", "--time", "10", "--", *TINY]
    assert suite.main(argv) == 0
    out = capsys.readouterr().out
    assert "submitted 2 array tasks (local)" in out and "2 of 2 array tasks finished" in out
    for run in suite.expand("quickstart-seeds", seeds=[0, 1], root=tmp_path, extra=TINY):
        assert _finished(run), run.name
    assert any((tmp_path / "submitit").rglob("*_result.pkl"))


def test_sweep_files_are_current_and_match_the_suites():
    files = suite.sweep_files()
    assert set(files) == {"table1_loco.yaml", "table1_antmaze.yaml", "table5.yaml", "quickstart_seeds.yaml"}
    for name, text in files.items():
        assert (CONFIGS / "sweeps" / name).read_text() == text, \
            f"regenerate: python -m idql_pl.suite --write-sweeps configs/sweeps ({name})"
    loco = yaml.safe_load(files["table1_loco.yaml"])
    assert loco["command"] == ["${env}", "python", "-m", "idql_pl", "fit", "--config", "configs/loco.yaml",
                               "${args}"]
    runs = suite.expand("table1-loco")
    assert {(d, s) for d in loco["parameters"]["data.dataset"]["values"]
            for s in loco["parameters"]["seed_everything"]["values"]} \
        == {(r.dataset, r.seed) for r in runs}
    assert loco["parameters"]["trainer.max_steps"] == {"value": 1_000_000}


@pytest.mark.parametrize("name",
                         ["table1_loco.yaml", "table1_antmaze.yaml", "table5.yaml", "quickstart_seeds.yaml"])
def test_every_sweep_key_is_accepted(name, capsys):
    sweep = yaml.safe_load((CONFIGS / "sweeps" / name).read_text())
    config = sweep["command"][sweep["command"].index("--config") + 1]
    args = [f"--{k}={spec['values'][-1] if 'values' in spec else spec['value']}"
            for k, spec in sweep["parameters"].items()]
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", CONFIGS.parent / config, *args, "--print_config")
    assert exit_info.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["data"]["dataset"] == sweep["parameters"]["data.dataset"]["values"][-1]


@pytest.mark.slow
def test_lightning_slurm_requeue_then_resume(tmp_path):
    """SIGUSR1 under (simulated) SLURM: Lightning saves hpc_ckpt_1.ckpt and calls scontrol requeue (a stub
    that kills the job like SLURM would); the suite's next start resumes from that checkpoint and finishes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/requeued\nkill -9 $PPID\n")
    (bin_dir / "scontrol").chmod(0o755)
    extra = [*TINY, "--trainer.max_steps", "400", "--checkpoint.every_n_train_steps", "100"]
    run = suite.expand("quickstart-seeds", seeds=[0], root=tmp_path / "runs", extra=extra)[0]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NTASKS": "1",
           "SLURM_JOB_NAME": "idql", "SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "77",
           "SLURM_ARRAY_TASK_ID": "0", "SLURM_NODELIST": "localhost"}
    run.run_dir.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "idql_pl", *run.fit_args()], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run.run_dir / "last.ckpt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) != 0  # killed by the stub, as SLURM's requeue would
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "77_0"]
    state, ckpt = suite.status(run)
    assert state == "resume" and ckpt == run.run_dir / "hpc_ckpt_1.ckpt"
    result = suite.execute(run)  # the requeued task
    assert result["status"] == "resume" and result["returncode"] == 0
    assert 400 in suite.final_eval_steps(run.run_dir) and suite.status(run) == ("done", None)


def test_importing_submitit_keeps_the_logging_handlers(tmp_path):
    """submitit configures logging with dictConfig on import, which closes every handler already installed."""
    code = ("import logging; h = logging.FileHandler(r'%s'); logging.getLogger('lightning').addHandler(h);"
            "from idql_pl.experiments.suite import import_submitit; import_submitit();"
            " assert not h.stream.closed") % (tmp_path / "x.log")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------------ table5-local
MAZES = ("local/pointmaze-umaze", "local/pointmaze-medium", "local/pointmaze-large")


def test_table5_local_expands_methods_mazes_and_seeds(tmp_path):
    runs = suite.expand("table5-local", root=tmp_path, agents={"idql": 1, "bc": 1})
    assert len(runs) == 27 and len({r.name for r in runs}) == 27 and len({r.run_dir for r in runs}) == 27
    assert [r.dataset for r in runs] == [d for d in MAZES for _ in range(9)]  # maze by maze
    configs = {"idql": "maze2d_local.yaml", "iql": "iql_maze2d_local.yaml", "bc": "bc_maze2d_local.yaml"}
    for r in runs:
        method = r.name.split("-")[0]
        assert r.name == f"{method}-{suite.slug(r.dataset)}-seed{r.seed}"
        assert r.seed in (0, 1, 2) and r.agents == 1
        assert Path(r.config) == CONFIGS / configs[method] and r.overrides == ()
        assert r.expected_max_steps() == (200_000 if method == "bc" else 100_000)
    args = runs[0].fit_args()
    assert args[:5] == ["fit", "--config", str(CONFIGS / "maze2d_local.yaml"), "--data.dataset", MAZES[0]]
    assert args[-4:] == ["--run_root", str(tmp_path.resolve()), "--run_name", runs[0].name]
    assert runs[0].name == "idql-local-pointmaze-umaze-seed0"


def test_table5_local_agents_and_budget(tmp_path):
    runs = suite.expand("table5-local", root=tmp_path, agents={"idql": 3, "bc": 1})
    assert len(runs) == 21
    idql = [r for r in runs if r.name.startswith("idql-")]
    assert [r.name for r in idql] == [f"idql-{suite.slug(d)}-seeds0-2" for d in MAZES]
    assert all(r.seed == 0 and r.agents == 3 and r.seeds == (0, 1, 2) for r in idql)
    assert idql[0].overrides == ("--model.num_agents=3", "--model.compile=true")
    assert all(r.agents == 1 for r in runs if not r.name.startswith("idql-"))  # IQL and BC: one seed per run
    default = suite.expand("table5-local")  # the suite's default: IDQL and BC train their 3 seeds in one run
    assert len(default) == 15 and suite.SUITES["table5-local"].agents == {"idql": 3, "bc": 3}
    bc = [r for r in default if r.name.startswith("bc-")]
    assert [r.name for r in bc] == [f"bc-{suite.slug(d)}-seeds0-2" for d in MAZES]
    assert bc[0].overrides == ("--model.num_agents=3", "--model.compile=true") and bc[0].seeds == (0, 1, 2)
    assert sum(r.name.startswith("iql-") for r in default) == 9  # IQL trains one agent
    uneven = suite.expand("table5-local", seeds=[0, 1, 2, 3, 7], agents={"idql": 2}, methods=["idql"],
                          datasets=[MAZES[1]])
    assert [(r.name, r.seeds) for r in uneven] == [("idql-local-pointmaze-medium-seeds0-1", (0, 1)),
                                                   ("idql-local-pointmaze-medium-seeds2-3", (2, 3)),
                                                   ("idql-local-pointmaze-medium-seed7", (7,))]
    assert "--model.num_agents=2" not in uneven[-1].overrides
    small = suite.expand("table5-local", critic_steps=20_000, extra=["--eval.num_episodes=5"],
                         agents={"bc": 1})
    bc = next(r for r in small if r.name.startswith("bc-"))
    assert bc.overrides == ("--trainer.max_steps=40000", "--eval.every_n_steps=10000",
                            "--eval.num_episodes=5")
    assert bc.expected_max_steps() == 40_000 and small[0].expected_max_steps() == 20_000
    assert small[0].overrides[:2] == ("--trainer.max_steps=20000", "--eval.every_n_steps=5000")
    for bad in (dict(methods=["sac"]), dict(agents={"idql": 0}), dict(agents={"iql": 3}),
                dict(critic_steps=2)):
        with pytest.raises(ConfigError):
            suite.expand("table5-local", **bad)
    with pytest.raises(ConfigError, match="--critic-steps applies to table5-local only"):
        suite.expand("table1", critic_steps=1000)


def test_other_suites_keep_their_folder_names():
    names = [r.name for r in suite.expand("table5", seeds=[0])]
    assert names == [f"{d}-seed0" for d in suite.MAZE2D_DATASETS]
    names = [r.name for r in suite.expand("quickstart-seeds")]
    assert names == [f"local-pointmaze-umaze-seed{s}" for s in range(3)]
    assert suite.expand("table1-loco", seeds=[2])[0].name == "halfcheetah-medium-v2-seed2"
    assert all(r.agents == 1 for r in suite.expand("table1"))


def test_seed_chunks():
    assert suite.seed_chunks([0, 1, 2], 3) == [(0, 1, 2)]
    assert suite.seed_chunks([4, 0, 1, 2, 3], 3) == [(0, 1, 2), (3, 4)]
    assert suite.seed_chunks([0, 2, 3, 9], 2) == [(0,), (2, 3), (9,)]
    assert suite.seed_chunks([0, 1, 2], 1) == [(0,), (1,), (2,)]


def test_table5_local_dry_run_and_resume_state(tmp_path, capsys):
    done = tmp_path / "iql-local-pointmaze-umaze-seed1"
    _fake_run(done, 100_000, eval_steps=[25_000, 100_000])
    _fake_run(tmp_path / "idql-local-pointmaze-large-seeds0-2", 100_000, eval_steps=[25_000],
              ckpts=["last.ckpt"])
    assert suite.main(["table5-local", "--root", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "15 runs" in out[0] and "(1 done, 1 to resume, 13 new)" in out[0] and len(out) == 16
    line = next(x for x in out if "idql-local-pointmaze-large-seeds0-2:" in x)
    assert line.startswith("resume ") and "--model.num_agents=3 --model.compile=true" in line
    assert line.endswith(f"--ckpt_path {tmp_path / 'idql-local-pointmaze-large-seeds0-2' / 'last.ckpt'}")
    assert next(x for x in out if "iql-local-pointmaze-umaze-seed1:" in x).startswith("done ")
    argv = ["table5-local", "--root", str(tmp_path), "--dry-run"]
    assert suite.main([*argv, "--bc-agents", "1"]) == 0
    assert "21 runs" in capsys.readouterr().out.splitlines()[0]
    assert suite.main([*argv, "--idql-agents", "1", "--bc-agents", "1"]) == 0
    assert "27 runs" in capsys.readouterr().out.splitlines()[0]
    assert suite.main([*argv, "--bc-agents", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --bc-agents 0: give K >= 1")
    assert suite.main(["table5-local", "--methods", "dqn", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("error: --methods dqn not in suite table5-local")


def test_table5_local_runs_one_thread_each_by_default(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(suite, "launch_local",
                        lambda runs, parallel: seen.extend((r.threads, parallel) for r in runs) or [])
    argv = ["table5-local", "--root", str(tmp_path), "--methods", "iql"]
    assert suite.main([*argv, "--datasets", MAZES[0]]) == 0
    assert seen == [(1, 1)] * 3 and "3 locally, 1 at a time, 1 thread(s) each" in capsys.readouterr().out
    seen.clear()
    assert suite.main([*argv, "--threads", "2"]) == 0
    assert {t for t, _ in seen} == {2}


@pytest.mark.parametrize("name", ["maze2d_local.yaml", "iql_maze2d_local.yaml", "bc_maze2d_local.yaml"])
def test_table5_local_configs(name, capsys):
    """Each method's config parses and has the quickstart's network sizes, the data, evaluation, budget."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", CONFIGS / name, "--data.dataset", MAZES[2], "--print_config")
    assert exit_info.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    quick = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    model = cfg["model"]["init_args"]
    bc = name.startswith("bc_")
    assert cfg["data"]["dataset"] == MAZES[2] and cfg["data"]["dataset_size"] is None  # the recipe's size
    assert cfg["data"]["reward_transform"] == "none" and cfg["trainer"]["precision"] == "32-true"
    assert (cfg["eval"]["num_episodes"], cfg["eval"]["seed"]) == (30, 1_000_000)
    assert cfg["trainer"]["max_steps"] == (200_000 if bc else 100_000)
    assert cfg["eval"]["every_n_steps"] == cfg["trainer"]["max_steps"] // 4
    behavior = quick["model"]["init_args"]["behavior"]["init_args"]
    critic = quick["model"]["init_args"]["critic"]["init_args"]
    if bc:
        assert cfg["model"]["class_path"] == "idql_pl.DiffusionBehavior"
        assert {k: model[k] for k in behavior} == behavior
    else:
        assert {k: model["critic"]["init_args"][k] for k in critic} == critic
    if name == "maze2d_local.yaml":
        assert {k: model["behavior"]["init_args"][k] for k in behavior} == behavior
        assert (model["num_samples"], model["actor_updates_per_step"]) == (32, 2)

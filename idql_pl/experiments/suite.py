"""``python -m idql_pl.suite SUITE``: the runs of a paper table, on this machine or as a SLURM job array.

A suite expands into runs (dataset x seed, with the per-domain config and the protocol's overrides); each run
is one ``python -m idql_pl fit`` with a deterministic folder ``<root>/<dataset>-seed<N>`` (suites that compare
methods: ``<root>/<method>-<dataset>-seed<N>``; K seeds trained as one run: ``...-seeds<N>-<N+K-1>``). Runs
whose final evaluation is already in their folder are skipped; runs with a checkpoint resume from the newest
one (``last.ckpt``, or the ``hpc_ckpt_*.ckpt`` that Lightning's SLURM integration writes before a requeue).

Suites (docs/fidelity.md §6-7):

* ``table1-loco``: the 9 D4RL locomotion datasets of Table 1 with ``configs/loco.yaml``;
* ``table1-antmaze``: the 6 antmaze datasets with ``configs/antmaze.yaml``;
* ``table1``: both (15 datasets);
* ``table5``: the 3 maze2d datasets of Table 5 with ``configs/maze2d.yaml``;
* ``quickstart-seeds``: ``configs/quickstart.yaml`` on ``local/pointmaze-umaze`` (no download), 3 seeds;
* ``table5-local``: Table 5's comparison where it can run (no download): IDQL (``configs/maze2d_local.yaml``),
  IQL (``configs/iql_maze2d_local.yaml``) and diffusion BC (``configs/bc_maze2d_local.yaml``) on
  ``local/pointmaze-umaze``, ``-medium``, ``-large``, seeds 0-2, at one CPU budget (100k critic steps; BC 200k
  actor steps), one thread per run by default. ``--idql-agents K`` / ``--bc-agents K`` (default 3) train K
  seeds as one run (``--model.num_agents K``, agent k = seed + k, with ``--model.compile true``);
  ``--critic-steps N`` scales the budget (BC 2N actor steps, 4 evaluations per
  run). See docs/table5-local.md.

Table 1 runs follow the ``-1`` protocol by default (``--protocol 1``: 1M critic steps, docs/fidelity.md §6,
and N = 64 candidate actions, Sec. 4's one-hyperparameter runs; tau stays the domain config's);
``--protocol A`` keeps the domain config as it is (1.5M steps, N 128 / 32). The two protocols use different
default roots.

Launchers: ``local`` runs them one after another (``--parallel P``: P at a time, the CPU threads split
between them: the CLI's ``--threads`` and ``OMP_NUM_THREADS``); ``slurm`` submits one job array through
submitit (partition, time, GPUs per task, CPUs per task as options). SLURM sends SIGUSR1 ``--signal-delay``
seconds before the time limit; Lightning's SLURM integration (``SLURMEnvironment(auto_requeue=True)``, on by
default under SLURM) catches it in the training process, saves ``hpc_ckpt_N.ckpt`` and requeues the array
task, and the requeued task resumes from that checkpoint. ``--submitit-cluster local`` runs the same job array
on this machine through submitit's local executor (what the tests do).

``--set KEY=VALUE`` (repeatable) and anything after ``--`` are passed to every run, e.g.
``--set trainer.max_steps=20`` for a smoke test (use another ``--root`` for it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from idql_pl.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # idql_pl/configs, shipped with the package
LOCO_DATASETS = tuple(
    f"{env}-{level}-v2" for level in ("medium", "medium-replay", "medium-expert")
    for env in ("halfcheetah", "hopper", "walker2d")
)
ANTMAZE_DATASETS = tuple(
    f"antmaze-{task}-v2" for task in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play",
                                      "large-diverse")
)
MAZE2D_DATASETS = ("maze2d-umaze-v1", "maze2d-medium-v1", "maze2d-large-v1")
LOCAL_MAZE2D_DATASETS = ("local/pointmaze-umaze", "local/pointmaze-medium", "local/pointmaze-large")
# the "-1" protocol (docs/fidelity.md §6: 1M critic / 2M actor steps; Sec. 4: N = 64 in the one-hyperparameter
# runs)
PROTOCOLS: dict[str, tuple[str, ...]] = {
    "1": ("--trainer.max_steps=1000000", "--model.num_samples=64"),
    "A": (),
}


@dataclass(frozen=True)
class Group:
    """Datasets that share one config file (and, in suites that compare methods, one method)."""

    config: str  # file name under configs/
    datasets: tuple[str, ...]
    method: str = ""  # folder prefix where a suite compares methods: <method>-<dataset>-seed<N>
    # K seeds as one run: --model.num_agents K (agent k = seed + k) and these arguments (None: one per run)
    agent_args: tuple[str, ...] | None = None
    steps_per_critic_step: int = 1  # trainer steps per critic step under --critic-steps (BC: 2 actor steps)


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    groups: tuple[Group, ...]
    seeds: tuple[int, ...]
    root: str  # default root folder name under runs/ (suites that share runs share it)
    uses_protocol: bool = False
    sweep_files: tuple[str, ...] = ()  # configs/sweeps/<file> per group
    about: str = ""
    threads: int | None = None  # the local launcher's default --threads (None: usable cores // --parallel)
    agents: dict[str, int] = field(default_factory=dict)  # method -> seeds per run (--<method>-agents)
    evals_per_run: int = 0  # evaluations per run under --critic-steps (0: the suite has no such option)


SUITES: dict[str, SuiteSpec] = {
    "table1-loco": SuiteSpec("table1-loco", (Group("loco.yaml", LOCO_DATASETS),), tuple(range(10)), "table1",
                             True, ("table1_loco.yaml",), "Table 1, locomotion: 9 datasets"),
    "table1-antmaze": SuiteSpec("table1-antmaze", (Group("antmaze.yaml", ANTMAZE_DATASETS),),
                                tuple(range(10)), "table1", True, ("table1_antmaze.yaml",),
                                "Table 1, antmaze: 6 datasets"),
    "table1": SuiteSpec("table1",
                        (Group("loco.yaml", LOCO_DATASETS), Group("antmaze.yaml", ANTMAZE_DATASETS)),
                        tuple(range(10)), "table1", True, ("table1_loco.yaml", "table1_antmaze.yaml"),
                        "Table 1: 9 locomotion + 6 antmaze datasets"),
    "table5": SuiteSpec("table5", (Group("maze2d.yaml", MAZE2D_DATASETS),), tuple(range(10)), "table5", False,
                        ("table5.yaml",), "Table 5: 3 maze2d datasets"),
    "quickstart-seeds": SuiteSpec("quickstart-seeds", (Group("quickstart.yaml", ("local/pointmaze-umaze",)),),
                                  (0, 1, 2), "quickstart-seeds", False, ("quickstart_seeds.yaml",),
                                  "configs/quickstart.yaml on local/pointmaze-umaze (no download)"),
    "table5-local": SuiteSpec(
        "table5-local",
        (Group("maze2d_local.yaml", LOCAL_MAZE2D_DATASETS, "idql", agent_args=("--model.compile=true",)),
         Group("iql_maze2d_local.yaml", LOCAL_MAZE2D_DATASETS, "iql"),
         Group("bc_maze2d_local.yaml", LOCAL_MAZE2D_DATASETS, "bc", agent_args=("--model.compile=true",),
               steps_per_critic_step=2)),
        (0, 1, 2), "table5-local", False, (),
        "Table 5 on the local maze2d recipes: IDQL vs IQL vs diffusion BC",
        threads=1, agents={"idql": 3, "bc": 3}, evals_per_run=4),
}


def slug(dataset: str) -> str:
    """A folder-safe dataset name: ``local/pointmaze-umaze`` -> ``local-pointmaze-umaze``."""
    text = Path(dataset).stem if dataset.endswith((".hdf5", ".h5")) else dataset
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


@dataclass(frozen=True)
class Run:
    """One ``python -m idql_pl fit`` of a suite (picklable: it travels to SLURM jobs)."""

    name: str
    root: str  # absolute
    config: str  # absolute
    dataset: str
    seed: int
    overrides: tuple[str, ...] = ()  # the suite's (protocol, budget, agents), then the user's (--set, --)
    threads: int | None = None  # --threads of the CLI (and OMP_NUM_THREADS of the process)
    agents: int = 1  # seeds trained in this run: seed .. seed + agents - 1 (--model.num_agents)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.seed, self.seed + self.agents))

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / self.name

    def fit_args(self, ckpt_path: str | None = None) -> list[str]:
        args = ["fit", "--config", self.config, "--data.dataset", self.dataset,
                f"--seed_everything={self.seed}", *([f"--threads={self.threads}"] if self.threads else []),
                *self.overrides, "--run_root", self.root, "--run_name", self.name]
        return [*args, "--ckpt_path", ckpt_path] if ckpt_path else args

    def expected_max_steps(self) -> int:
        return expected_max_steps(["--config", self.config, *self.overrides])


def parse_seeds(text: str) -> tuple[int, ...]:
    """``0-9``, ``0,3,5`` or ``0-2,7`` -> sorted unique seeds."""
    seeds: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            lo, _, hi = part.partition("-")
            seeds.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(f"--seeds '{text}' is not a seed list; write e.g. 0-9, 0,3,5 or 0-2,7") from None
    if not seeds:
        raise ConfigError(f"--seeds '{text}' selects no seed; write e.g. 0-9")
    return tuple(sorted(seeds))


def set_to_args(items: Sequence[str]) -> list[str]:
    """``--set trainer.max_steps=20`` -> ``--trainer.max_steps=20``."""
    out = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set '{item}' must be KEY=VALUE, e.g. --set trainer.max_steps=20")
        out.append(f"--{key.strip().lstrip('-')}={value}")
    return out


def expected_max_steps(args: Sequence[str]) -> int:
    """``trainer.max_steps`` as the CLI would resolve it from ``--config`` files and overrides, in order."""
    steps = 1_000  # IDQLCLI's trainer default
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if not eq and i + 1 < len(args) and key in ("--config", "--trainer.max_steps"):
            value, i = args[i + 1], i + 1
        if key == "--config":
            cfg = yaml.safe_load(Path(value).read_text()) or {}
            steps = int((cfg.get("trainer") or {}).get("max_steps", steps))
        elif key == "--trainer.max_steps":
            steps = int(value)
        i += 1
    return steps


def seed_chunks(seeds: Sequence[int], size: int) -> list[tuple[int, ...]]:
    """Sorted seeds in runs of consecutive seeds of at most ``size`` (``0-4``, 3 -> ``(0, 1, 2), (3, 4)``)."""
    chunks: list[list[int]] = []
    for s in sorted(set(seeds)):
        if chunks and len(chunks[-1]) < size and chunks[-1][-1] == s - 1:
            chunks[-1].append(s)
        else:
            chunks.append([s])
    return [tuple(c) for c in chunks]


def budget_args(spec: SuiteSpec, group: Group, critic_steps: int) -> tuple[str, ...]:
    """``--critic-steps N``: ``trainer.max_steps`` and ``eval.every_n_steps`` of one group's runs."""
    steps = critic_steps * group.steps_per_critic_step
    return (f"--trainer.max_steps={steps}", f"--eval.every_n_steps={max(1, steps // spec.evals_per_run)}")


def expand(
    suite: str,
    *,
    seeds: Sequence[int] | None = None,
    root: str | os.PathLike | None = None,
    protocol: str = "1",
    extra: Sequence[str] = (),
    datasets: Sequence[str] | None = None,
    config_dir: str | os.PathLike = CONFIG_DIR,
    methods: Sequence[str] | None = None,
    agents: dict[str, int] | None = None,
    critic_steps: int | None = None,
) -> list[Run]:
    """The suite's runs in a fixed order (group, dataset, seed; suites that compare methods: dataset first).

    ``methods``: a subset of the suite's methods; ``agents``: method -> seeds per run, for the methods that
    can train several in one run (default the suite's); ``critic_steps``: the budget, where the suite has
    ``evals_per_run`` (:func:`budget_args`).
    """
    if suite not in SUITES:
        raise ConfigError(f"unknown suite '{suite}'; available: {', '.join(SUITES)}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{protocol}'; use 1 (the -1 protocol) or A")
    spec = SUITES[suite]
    agents = {**spec.agents, **(agents or {})}
    for method, k in agents.items():
        if not any(g.method == method and g.agent_args is not None for g in spec.groups) or int(k) < 1:
            raise ConfigError(f"--{method}-agents {k}: give K >= 1 for a method of {suite} that trains "
                              f"several seeds in one run ({', '.join(spec.agents) or 'none has'})")
    if critic_steps is not None and (not spec.evals_per_run or critic_steps < spec.evals_per_run):
        allowed = ", ".join(n for n, s in SUITES.items() if s.evals_per_run)
        raise ConfigError(f"--critic-steps applies to {allowed} only, and must be >= "
                          f"{spec.evals_per_run or 1} (got {critic_steps} for {suite})")
    known_methods = [g.method for g in spec.groups if g.method]
    if methods:
        unknown = [m for m in methods if m not in known_methods]
        if unknown:
            raise ConfigError(f"--methods {', '.join(unknown)} not in suite {suite}; it has "
                              f"{', '.join(known_methods) or 'no method dimension'}")
    seeds = tuple(seeds) if seeds is not None else spec.seeds
    default_root = Path("runs") / (spec.root if not spec.uses_protocol or protocol == "1"
                                   else f"{spec.root}-A")
    root_path = Path(root if root is not None else default_root).expanduser().resolve()
    proto = PROTOCOLS[protocol] if spec.uses_protocol else ()
    known = {d for g in spec.groups for d in g.datasets}
    if datasets:
        unknown = [d for d in datasets if d not in known]
        if unknown:
            raise ConfigError(f"--datasets {', '.join(unknown)} not in suite {suite};"
                              f" it has {', '.join(sorted(known))}")
    runs = []
    for group in spec.groups:
        if methods and group.method not in methods:
            continue
        config = (Path(config_dir) / group.config).resolve()
        if not config.is_file():
            raise ConfigError(f"config {config} not found; run from the repository (or pass --config-dir)")
        budget = budget_args(spec, group, critic_steps) if critic_steps is not None else ()
        prefix = f"{group.method}-" if group.method else ""
        for dataset in group.datasets:
            if datasets and dataset not in datasets:
                continue
            per_run = int(agents.get(group.method, 1)) if group.agent_args is not None else 1
            for chunk in seed_chunks(seeds, per_run):
                k = len(chunk)
                many = (f"--model.num_agents={k}", *(group.agent_args or ())) if k > 1 else ()
                tail = f"seeds{chunk[0]}-{chunk[-1]}" if k > 1 else f"seed{chunk[0]}"
                name = f"{prefix}{slug(dataset)}-{tail}"
                runs.append(Run(name, str(root_path), str(config), dataset, int(chunk[0]),
                                (*proto, *budget, *many, *extra), agents=k))
    if known_methods:  # suites that compare methods: dataset by dataset, so a partial suite already compares
        order = {d: i for i, d in enumerate(dict.fromkeys(r.dataset for r in runs))}
        runs.sort(key=lambda r: order[r.dataset])
    return runs


# ------------------------------------------------------------------------------------------ run state
def final_eval_steps(run_dir: Path) -> set[int]:
    """Steps with a fit-stage evaluation in ``eval_episodes.csv``."""
    import csv

    path = run_dir / "eval_episodes.csv"
    if not path.is_file():
        return set()
    with open(path) as f:
        return {int(r["step"]) for r in csv.DictReader(f) if r.get("stage", "fit") == "fit" and r.get("step")}


def newest_checkpoint(run_dir: Path) -> Path | None:
    """``last.ckpt`` or Lightning's ``hpc_ckpt_N.ckpt`` (written before a SLURM requeue), the newest."""
    found = [p for p in (run_dir / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def saved_max_steps(run_dir: Path) -> int | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text()) or {}
    value = (cfg.get("trainer") or {}).get("max_steps")
    return None if value is None else int(value)


def status(run: Run) -> tuple[str, Path | None]:
    """``done`` (its final evaluation exists), ``resume`` (from the returned checkpoint) or ``new``."""
    run_dir, want = run.run_dir, run.expected_max_steps()
    if want in final_eval_steps(run_dir):
        return "done", None
    ckpt = newest_checkpoint(run_dir)
    saved = saved_max_steps(run_dir)
    if (ckpt is not None or final_eval_steps(run_dir)) and saved is not None and saved != want:
        raise ConfigError(
            f"{run_dir} holds a run with trainer.max_steps={saved} but this suite asks for {want}; "
            "delete that folder or pass another --root"
        )
    return ("resume", ckpt) if ckpt is not None else ("new", None)


def machine() -> str:
    """This machine in a few words (host, CPU model, usable cores), for the runs' ``suite.log``."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{platform.node() or 'unknown host'} ({model}, {cpu_count()} usable cores)"


END_LINE = re.compile(r"^# (?P<time>\S+ \S+) end: (?P<how>exit -?\d+|interrupted) after (?P<seconds>[\d.]+) s"
                      r" on (?P<machine>.*), (?P<threads>\S+) thread\(s\)$")


def _log_end(out: Any, how: str, seconds: float, threads: int | None) -> None:
    """The line that closes one attempt in ``suite.log`` (:data:`END_LINE`; the report sums these)."""
    out.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} end: {how} after {seconds:.1f} s on {machine()}, "
              f"{threads or 'default'} thread(s)\n")
    out.flush()


def execute(run: Run) -> dict[str, Any]:
    """Run one suite entry to completion in a subprocess (skip when done, resume when a checkpoint exists)."""
    state, ckpt = status(run)
    result: dict[str, Any] = {"run": run.name, "status": state, "returncode": 0, "seconds": 0.0}
    if state == "done":
        return result
    run.run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if run.threads:
        env.update({k: str(run.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    cmd = [sys.executable, "-m", "idql_pl", *run.fit_args(str(ckpt) if ckpt else None)]
    t0 = time.perf_counter()
    log_path = run.run_dir / "suite.log"
    with open(log_path, "a") as out:
        out.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {state}: {subprocess.list2cmdline(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait()
            _log_end(out, "interrupted", time.perf_counter() - t0, run.threads)
            raise
        _log_end(out, f"exit {code}", time.perf_counter() - t0, run.threads)
    result.update(returncode=code, seconds=round(time.perf_counter() - t0, 1), log=str(log_path))
    word = "finished" if code == 0 else f"FAILED (exit {code}, see {log_path})"
    print(f"[suite] {run.name}: {word} in {result['seconds']:.0f} s", flush=True)
    return result


def _absorb(signum: int, frame: Any) -> None:
    print(f"[suite] signal {signal.Signals(signum).name}: the training process saves an hpc checkpoint"
          " and requeues",
          file=sys.stderr, flush=True)


def slurm_job(run: Run) -> dict[str, Any]:
    """The submitit job: one run. SLURM signals every process of the step; the fit subprocess (Lightning's
    SLURMEnvironment) handles SIGUSR1 by checkpointing and requeueing, so this process only has to survive
    it."""
    if threading.current_thread() is threading.main_thread():
        # a Python handler: the child's exec resets it, Lightning sets its own
        signal.signal(signal.SIGUSR1, _absorb)
    result = execute(run)
    if result["returncode"] != 0:
        raise RuntimeError(f"{run.name} failed with exit code {result['returncode']};"
                           f" see {result.get('log')}")
    return result


# ------------------------------------------------------------------------------------------- launchers
def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def launch_local(runs: Sequence[Run], parallel: int = 1) -> list[dict[str, Any]]:
    if parallel <= 1:
        return [execute(r) for r in runs]
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(execute, runs))


@dataclass
class SlurmOptions:
    partition: str | None = None
    time_min: int = 24 * 60
    gpus_per_task: int = 1
    cpus_per_task: int = 4
    mem_gb: float | None = None
    array_parallelism: int = 64
    signal_delay_s: int = 120
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: list[str] = field(default_factory=list)
    cluster: str = "slurm"  # submitit executor: slurm | local | debug
    folder: str | None = None
    wait: bool = False


def import_submitit() -> Any:
    """``import submitit`` without its ``logging.config.dictConfig``, which closes every logging handler
    already installed in this process (Lightning's, pytest's, a user's); its logger gets a stderr handler
    instead."""
    if "submitit" in sys.modules:
        return sys.modules["submitit"]
    import logging

    old = os.environ.get("SUBMITIT_LOG_LEVEL")
    os.environ["SUBMITIT_LOG_LEVEL"] = "NOCONFIG"
    try:
        import submitit
    finally:
        if old is None:
            os.environ.pop("SUBMITIT_LOG_LEVEL", None)
        else:
            os.environ["SUBMITIT_LOG_LEVEL"] = old
    logger = logging.getLogger("submitit")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s (%(asctime)s) - %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
    return submitit


def launch_submitit(runs: Sequence[Run], opts: SlurmOptions, name: str = "idql") -> list[Any]:
    """One job array (one task per run) through submitit; returns the jobs (``job.result()`` waits)."""
    submitit = import_submitit()

    folder = Path(opts.folder or Path(runs[0].root) / "submitit")
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=opts.cluster)
    params: dict[str, Any] = {
        "name": name, "timeout_min": opts.time_min, "nodes": 1, "tasks_per_node": 1,
        "cpus_per_task": opts.cpus_per_task,
        "gpus_per_node": opts.gpus_per_task if opts.cluster == "slurm" else 0,
        "slurm_array_parallelism": opts.array_parallelism,
        # SIGUSR1 (Lightning's requeue signal) instead of submitit's USR2, signal_delay_s before the limit
        "slurm_additional_parameters": {"signal": f"USR1@{opts.signal_delay_s}"},
    }
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(opts, key):
            params[f"slurm_{key}"] = getattr(opts, key)
    if opts.setup:
        params["slurm_setup"] = list(opts.setup)
    executor.update_parameters(**params)
    threads = opts.cpus_per_task if opts.cluster == "slurm" else None
    return executor.map_array(slurm_job, [replace(r, threads=r.threads or threads) for r in runs])


# ------------------------------------------------------------------------------------------ W&B sweeps
def sweep_yaml(suite: str, group: Group, fname: str, protocol: str = "1") -> str:
    """A ``wandb sweep`` file for one config group of a suite: a grid over dataset x seed."""
    spec = SUITES[suite]
    params: dict[str, Any] = {"data.dataset": {"values": list(group.datasets)},
                              "seed_everything": {"values": list(spec.seeds)}}
    for arg in PROTOCOLS[protocol] if spec.uses_protocol else ():
        key, _, value = arg.lstrip("-").partition("=")
        params[key] = {"value": int(value)}
    doc = {
        "program": "idql_pl",
        "method": "grid",
        "metric": {"name": "eval/normalized_score", "goal": "maximize"},
        "parameters": params,
        "command": ["${env}", "python", "-m", "idql_pl", "fit", "--config", f"configs/{group.config}",
                    "${args}"],
    }
    head = (f"# {spec.about} ({len(group.datasets)} x {len(spec.seeds)} runs), the same runs as\n"
            f"# `python -m idql_pl.suite {suite}`"
            f"{' (protocol ' + protocol + ')' if spec.uses_protocol else ''}, for `wandb agent`:\n"
            f"#   wandb sweep configs/sweeps/{fname}  then  wandb agent <entity>/idql_pl/<sweep id>\n"
            "# Generated by `python -m idql_pl.suite --write-sweeps configs/sweeps`"
            " (tests check it is current).\n")
    return head + yaml.safe_dump(doc, sort_keys=False)


def sweep_files() -> dict[str, str]:
    """File name -> content for every suite's sweep files."""
    out: dict[str, str] = {}
    for name, spec in SUITES.items():
        for group, fname in zip(spec.groups, spec.sweep_files):
            out.setdefault(fname, sweep_yaml(name, group, fname))
    return out


# ------------------------------------------------------------------------------------------------ main
def _short(arg: str) -> str:
    """A path under the working directory, shown relative to it."""
    cwd = os.getcwd() + os.sep
    return arg[len(cwd):] if arg.startswith(cwd) else arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m idql_pl.suite", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("suite", nargs="?", choices=list(SUITES), help="which runs")
    p.add_argument("--seeds", default=None, help="e.g. 0-9 or 0,3,5 (default: 0-9; quickstart-seeds: 0-2)")
    p.add_argument("--protocol", default="1", choices=list(PROTOCOLS),
                   help="table1: '1' (1M steps, N 64) or 'A' (configs as they are)")
    p.add_argument("--datasets", default=None, help="comma-separated subset of the suite's datasets")
    p.add_argument("--methods", default=None, help="table5-local: comma-separated subset of idql,iql,bc")
    p.add_argument("--idql-agents", type=int, default=None, metavar="K",
                   help="table5-local: IDQL seeds per run (--model.num_agents K --model.compile true)")
    p.add_argument("--bc-agents", type=int, default=None, metavar="K",
                   help="table5-local: BC seeds per run (--model.num_agents K --model.compile true)")
    p.add_argument("--critic-steps", type=int, default=None, metavar="N",
                   help="table5-local: N critic steps per run (BC: 2N actor steps), 4 evaluations each")
    p.add_argument("--root", default=None, help="run folders go under ROOT (default runs/<suite>)")
    p.add_argument("--config-dir", default=str(CONFIG_DIR), help="where loco.yaml, antmaze.yaml, ... live")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs, their state and commands; launch nothing")
    p.add_argument("--launcher", default="local", choices=["local", "slurm"])
    g = p.add_argument_group("local launcher")
    g.add_argument("--parallel", type=int, default=1, help="runs at a time (threads split between them)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run (default: usable cores // parallel; table5-local: 1)")
    s = p.add_argument_group("slurm launcher (submitit job array)")
    s.add_argument("--partition", default=None)
    s.add_argument("--time", type=int, default=24 * 60, help="minutes per run (default 1440)")
    s.add_argument("--gpus-per-task", type=int, default=1)
    s.add_argument("--cpus-per-task", type=int, default=4)
    s.add_argument("--mem-gb", type=float, default=None)
    s.add_argument("--array-parallelism", type=int, default=64, help="array tasks running at once")
    s.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the limit that SIGUSR1 (requeue) arrives")
    s.add_argument("--account", default=None)
    s.add_argument("--qos", default=None)
    s.add_argument("--constraint", default=None)
    s.add_argument("--setup", action="append", default=[],
                   help="shell line run before each task (e.g. 'module load cuda')")
    s.add_argument("--submitit-folder", default=None, help="submitit logs (default ROOT/submitit)")
    s.add_argument("--submitit-cluster", default="slurm", choices=["slurm", "local", "debug"],
                   help="submitit executor: slurm, or local/debug to run the array on this machine")
    s.add_argument("--wait", action="store_true",
                   help="wait for the array to finish (always on for local/debug)")
    p.add_argument("--write-sweeps", metavar="DIR", default=None,
                   help="write the W&B sweep files of all suites into DIR")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1 :]
    args = build_parser().parse_args(argv)
    try:
        return _main(args, passthrough)
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code


def _main(args: argparse.Namespace, passthrough: list[str]) -> int:
    if args.write_sweeps:
        out = Path(args.write_sweeps)
        out.mkdir(parents=True, exist_ok=True)
        for fname, text in sweep_files().items():
            (out / fname).write_text(text)
            print(f"[suite] wrote {out / fname}")
        if not args.suite:
            return 0
    if not args.suite:
        raise ConfigError(f"name a suite: {', '.join(SUITES)}")
    if args.parallel < 1 or (args.threads is not None and args.threads < 1):
        raise ConfigError("--parallel and --threads must be >= 1")
    extra = [*set_to_args(args.set), *passthrough]
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    agents = {m: k for m, k in (("idql", args.idql_agents), ("bc", args.bc_agents)) if k is not None}
    runs = expand(args.suite, seeds=seeds, root=args.root, protocol=args.protocol, extra=extra,
                  datasets=datasets, config_dir=args.config_dir, methods=methods, agents=agents,
                  critic_steps=args.critic_steps)
    states = [status(r) for r in runs]
    pending = [r for r, (s, _) in zip(runs, states) if s != "done"]
    counts = {k: sum(s == k for s, _ in states) for k in ("done", "resume", "new")}
    print(f"[suite] {args.suite}: {len(runs)} runs under {runs[0].root} ({counts['done']} done,"
          f" {counts['resume']} to resume, {counts['new']} new)", flush=True)
    if args.dry_run:
        for run, (state, ckpt) in zip(runs, states):
            cmd = ["python", "-m", "idql_pl", *map(_short, run.fit_args(str(ckpt) if ckpt else None))]
            print(f"{state:7s} {run.name}: {subprocess.list2cmdline(cmd)}")
        return 0
    if not pending:
        print("[suite] nothing to do: every run has its final evaluation", flush=True)
        return 0
    if args.launcher == "local":
        threads = args.threads or SUITES[args.suite].threads or max(1, cpu_count() // args.parallel)
        pending = [replace(r, threads=threads) for r in pending]
        print(f"[suite] running {len(pending)} locally, {args.parallel} at a time, {threads} thread(s) each",
              flush=True)
        results = launch_local(pending, args.parallel)
        failed = [r for r in results if r["returncode"] != 0]
        print(f"[suite] {len(results) - len(failed)} of {len(results)} runs finished"
              + (f"; failed: {', '.join(r['run'] for r in failed)}" if failed else ""), flush=True)
        return 1 if failed else 0
    opts = SlurmOptions(
        partition=args.partition, time_min=args.time, gpus_per_task=args.gpus_per_task,
        cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, array_parallelism=args.array_parallelism,
        signal_delay_s=args.signal_delay, account=args.account, qos=args.qos, constraint=args.constraint,
        setup=args.setup, cluster=args.submitit_cluster, folder=args.submitit_folder, wait=args.wait,
    )
    jobs = launch_submitit(pending, opts, name=f"idql-{args.suite}")
    print(f"[suite] submitted {len(jobs)} array tasks ({opts.cluster}): job {jobs[0].job_id.split('_')[0]};"
          f" logs in {opts.folder or Path(pending[0].root) / 'submitit'}", flush=True)
    if not (opts.wait or opts.cluster != "slurm"):
        print("[suite] rerun the same command later: finished runs are skipped, interrupted ones resume",
              flush=True)
        return 0
    failed = 0
    for job, run in zip(jobs, pending):
        try:
            job.result()
        except Exception as e:
            failed += 1
            print(f"[suite] {run.name}: FAILED ({' '.join(str(e).split())[:300]})", flush=True)
    print(f"[suite] {len(jobs) - failed} of {len(jobs)} array tasks finished", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    from idql_pl.entrypoint import run_main

    run_main(main)

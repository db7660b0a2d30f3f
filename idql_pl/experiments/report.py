"""``python -m idql_pl.report RUN_DIRS... [--out reports/NAME]``: one table and one figure per suite of runs.

Reads each run folder's ``config.yaml`` (dataset, seed, configuration, ``trainer.max_steps``),
``eval_episodes.csv`` (the evaluations: step, per-episode returns) and ``csv/metrics.csv``
(``eval/normalized_score`` per evaluation; computed from the returns and the reference scores when absent).
Runs are grouped by dataset and configuration (the resolved config without seed, run folder and hardware keys;
configurations are named by the keys in which they differ within a domain, and by their method, IDQL, IQL or
diffusion BC, where the runs hold several). A run of K agents (``--model.num_agents K``) counts as K seeds,
``seed_everything + k``. Writes into ``--out``:

* ``report.md``, ``report.csv``, ``report.json``;
* per dataset: the **final** normalized score (the last evaluation, at ``trainer.max_steps``: the paper's
  protocol) mean ± std over seeds, and the **best** evaluation of each seed for contrast (optimistic: it
  selects on the evaluation episodes); beside D4RL datasets the paper's IDQL-1 / IDQL-A numbers (Table 1) or
  the Table 5 number (maze2d), docs/fidelity.md §7, and our difference to them;
* per domain (family) and configuration: mean, median, interquartile mean and optimality gap (threshold 100)
  of the final scores with stratified-bootstrap 95% confidence intervals (rliable: runs resampled within
  each dataset; rliable's definitions: mean and median of the per-dataset means, IQM and optimality gap over
  all runs of all datasets);
* per dataset with IDQL and IQL runs: every method's final mean ± std and IDQL - IQL with a stratified-
  bootstrap 95% interval (each method's seeds resampled independently), beside the paper's Table 5 IDQL and
  IQL numbers for that maze2d layout (D4RL's, or the local recipe's of the same layout);
* ``curve_<dataset>.png`` per dataset and ``curves.png``: mean normalized score vs critic steps with a 95%
  band across seeds (the t-interval of the mean; diffusion BC's actor steps / 2 beside IDQL), every
  configuration on one axes; ``aggregates.png``: the aggregate intervals;
* the total wall time and the machine, from the runs' ``suite.log`` (``python -m idql_pl.suite`` writes them),
  or ``--wall-time`` / ``--machine``.

Runs that have not reached ``trainer.max_steps`` are listed and left out of the final-score columns
(``--include-unfinished`` keeps their last evaluation).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from idql_pl.errors import ConfigError

# docs/fidelity.md §7: Table 1 (IDQL-1, IDQL-A) and Table 5 (maze2d), D4RL normalized scores.
_TABLE1 = {
    "halfcheetah-medium": (49.7, 51.0), "hopper-medium": (63.1, 65.4), "walker2d-medium": (80.2, 82.5),
    "halfcheetah-medium-replay": (45.1, 45.9), "hopper-medium-replay": (82.4, 92.1),
    "walker2d-medium-replay": (79.8, 85.1),
    "halfcheetah-medium-expert": (94.4, 95.9), "hopper-medium-expert": (105.3, 108.6),
    "walker2d-medium-expert": (111.6, 112.7),
    "antmaze-umaze": (93.8, 94.0), "antmaze-umaze-diverse": (62.0, 80.2), "antmaze-medium-play": (86.6, 84.5),
    "antmaze-medium-diverse": (83.5, 84.8), "antmaze-large-play": (57.0, 63.5),
    "antmaze-large-diverse": (56.4, 67.9),
}
_TABLE5 = {"maze2d-umaze": 57.9, "maze2d-medium": 89.5, "maze2d-large": 90.1}
# the paper's Table 5 per maze: IDQL and IQL on D4RL maze2d-<maze>-v1 (the report's IDQL - IQL comparison)
TABLE5_METHODS: dict[str, dict[str, float]] = {
    "umaze": {"IDQL": 57.9, "IQL": 47.4},
    "medium": {"IDQL": 89.5, "IQL": 34.9},
    "large": {"IDQL": 90.1, "IQL": 58.6},
}
PAPER: dict[str, dict[str, float]] = {
    **{f"{k}-v2": {"IDQL-1": a, "IDQL-A": b} for k, (a, b) in _TABLE1.items()},
    # the antmaze rows also under D4RL's v0 names (the table's numbers do not name a version)
    **{f"{k}-v0": {"IDQL-1": a, "IDQL-A": b} for k, (a, b) in _TABLE1.items() if k.startswith("antmaze")},
    **{f"{k}-v1": {"Table 5": v} for k, v in _TABLE5.items()},
}
PAPER_COLUMNS = ("IDQL-1", "IDQL-A", "Table 5")

# keys that do not change what is being measured: seeds, folders, loggers, hardware, checkpoint cadence
_IGNORED = re.compile(
    r"^(seed_everything|run_name|run_root|ckpt_path|wandb_project|threads|data\.dataset|data\.seed|checkpoint\..*|eval\.num_envs|"
    r"eval\.plot|trainer\.(logger|callbacks|enable_progress_bar|enable_model_summary|log_every_n_steps|accelerator|"
    r"devices|strategy|num_nodes|default_root_dir|plugins|profiler)|.*\.compile|"
    r"model\.num_agents|model\.compile_mode)$"  # K agents in one run are K seeds of one configuration
)


# the method a run trains, from the class of its model
METHODS = {"IDQL": "IDQL", "IQL": "IQL", "DiffusionBehavior": "diffusion BC"}
_MAZE = re.compile(r"(?:^|[/_-])(?:maze2d|pointmaze)[-_](umaze|medium|large)(?:$|[-_.])")


def method_of(cfg: dict[str, Any]) -> str:
    """``IDQL``, ``IQL``, ``diffusion BC`` (a DiffusionBehavior alone) or the model's class name."""
    name = str((cfg.get("model") or {}).get("class_path") or "idql_pl.IDQL").rsplit(".", 1)[-1]
    return METHODS.get(name, name)


def maze_of(dataset: str) -> str | None:
    """``umaze`` / ``medium`` / ``large`` for D4RL maze2d and the local pointmaze recipes (else None)."""
    m = _MAZE.search(dataset.lower())
    return m.group(1) if m else None


def _maze_rank(dataset: str) -> int:
    """Sort key: maze2d layouts as the paper orders them (umaze, medium, large); -1 for other datasets."""
    maze = maze_of(dataset)
    return list(TABLE5_METHODS).index(maze) if maze else -1


def paper_scores(dataset: str) -> dict[str, float]:
    """The paper's numbers for a D4RL dataset name or D4RL file name (``{}`` when it reports none)."""
    from idql_pl.data.registry import get_d4rl_spec

    spec = get_d4rl_spec(dataset)
    return dict(PAPER.get(spec.name if spec else dataset, {}))


# ------------------------------------------------------------------------------------------- reading
@dataclass
class RunRecord:
    path: str
    dataset: str  # resolved name (D4RL file names -> D4RL names)
    family: str
    seed: int
    config_key: str
    config: dict[str, Any]  # flattened, without the ignored keys
    max_steps: int
    steps: list[int]
    scores: list[float]  # normalized score per evaluation (or return, see metric)
    returns: list[float]
    metric: str = "normalized_score"  # or "return" when the dataset has no reference scores
    config_label: str = "default"
    method: str = "IDQL"  # :func:`method_of`
    agent: int = 0  # the agent of a run of K agents (seed = seed_everything + agent)
    actor_steps_per_critic_step: int = 2  # IDQL's actor_updates_per_step (converts BC's actor steps)

    @property
    def finished(self) -> bool:
        return bool(self.steps) and self.steps[-1] >= self.max_steps

    @property
    def final(self) -> float:
        return self.scores[-1]

    @property
    def best(self) -> float:
        return max(self.scores)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'init_args': {'b': 1}}}`` -> ``{'a.b': 1}`` (lists kept as values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = prefix if k == "init_args" else (f"{prefix}.{k}" if prefix else str(k))
        out.update(flatten(v, key))
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _reference_scores(dataset_arg: str, data_cfg: dict[str, Any]) -> tuple[float, float] | None:
    from idql_pl.data.registry import get_d4rl_spec

    given = data_cfg.get("ref_scores")
    if given:
        return float(given[0]), float(given[1])
    spec = get_d4rl_spec(dataset_arg)
    return (spec.ref_min_score, spec.ref_max_score) if spec else None


def read_runs(run_dir: str | Path) -> list[RunRecord]:
    """One run folder -> one record per agent (``[]`` when it has no fit-stage evaluation yet).

    A run of K agents (``--model.num_agents K``, ``eval_episodes.csv`` with an ``agent`` column) holds K
    seeds: agent ``k`` is seed ``seed_everything + k``, scored by ``eval/agent<k>/normalized_score`` (or by
    its episodes).
    """
    from idql_pl.data.registry import get_d4rl_spec, infer_family

    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    data_cfg = cfg.get("data") or {}
    dataset_arg = str(data_cfg.get("dataset", "?"))
    spec = get_d4rl_spec(dataset_arg)
    dataset = spec.name if spec else (Path(dataset_arg).stem if dataset_arg.endswith((".hdf5", ".h5"))
                                      else dataset_arg)
    family = data_cfg.get("family") or (spec.family if spec else infer_family(dataset_arg))
    flat = {k: v for k, v in flatten(cfg).items() if not _IGNORED.match(k)}
    key = hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:10]
    model_args = (cfg.get("model") or {}).get("init_args") or {}
    agents = int(model_args.get("num_agents") or 1)

    episodes: dict[int, dict[int, list[float]]] = {}  # agent -> step -> returns
    for row in _read_csv(run_dir / "eval_episodes.csv"):
        own_n = row.get("model_n", "1") != "0"  # other rows: extra N settings (--eval.num_samples "[...]")
        if row.get("stage", "fit") == "fit" and own_n and _float(row.get("return")) is not None:
            agent = int(row.get("agent") or 0)
            episodes.setdefault(agent, {}).setdefault(int(row["step"]), []).append(float(row["return"]))
    agents = max(agents, max(episodes, default=0) + 1)
    columns = [f"eval/agent{k}/normalized_score" for k in range(agents)] if agents > 1 else [
        "eval/normalized_score"]
    logged: dict[int, dict[int, float]] = {k: {} for k in range(agents)}  # agent -> step -> score
    for row in _read_csv(run_dir / "csv" / "metrics.csv"):
        for k, column in enumerate(columns):
            value = _float(row.get(column))
            if value is not None and row.get("step"):
                logged[k][int(float(row["step"]))] = value  # a step's last row wins (a resumed run relogs)
    ref = _reference_scores(dataset_arg, data_cfg)
    common = {"path": str(run_dir), "dataset": dataset, "family": str(family), "config_key": key,
              "config": flat, "max_steps": int((cfg.get("trainer") or {}).get("max_steps") or 0),
              "method": method_of(cfg),
              "actor_steps_per_critic_step": int(model_args.get("actor_updates_per_step") or 2)}
    seed = int(cfg.get("seed_everything") or 0)
    records = []
    for k in range(agents):
        found = _scores(episodes.get(k, {}), logged[k], ref)
        if found is not None:
            steps, scores, returns, metric = found
            records.append(RunRecord(**common, seed=seed + k, agent=k, steps=steps, scores=scores,
                                     returns=returns, metric=metric))
    return records


def _scores(episodes: dict[int, list[float]], logged: dict[int, float], ref: tuple[float, float] | None
            ) -> tuple[list[int], list[float], list[float], str] | None:
    """One agent's evaluations: steps, scores (the logged normalized scores, else from the returns and the
    reference scores, else the returns), mean returns and the metric's name; None without any evaluation."""
    steps = sorted(set(episodes) | set(logged))
    if not steps:
        return None
    metric = "normalized_score"
    if all(s in logged for s in steps):
        scores = [logged[s] for s in steps]
    elif ref is not None and all(s in episodes for s in steps):
        lo, hi = ref
        scores = [float(np.mean(100.0 * (np.asarray(episodes[s]) - lo) / (hi - lo))) for s in steps]
    else:  # no normalized score anywhere: report returns
        steps = sorted(episodes)
        scores, metric = [float(np.mean(episodes[s])) for s in steps], "return"
        if not steps:
            return None
    returns = [float(np.mean(episodes[s])) if s in episodes else float("nan") for s in steps]
    return steps, scores, returns, metric


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders (those with a ``config.yaml``) among ``paths`` and their subfolders, in sorted order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(c.parent for c in p.glob("*/config.yaml")))
        else:
            raise ConfigError(f"{p} is not a run folder (no config.yaml) nor a folder of run folders")
    return sorted(dict.fromkeys(found))


def label_configs(runs: Sequence[RunRecord]) -> None:
    """Name each configuration by the keys where it differs from the others of its family and method
    ("default" if alone); where the runs hold several methods, the label is the method (``IDQL``,
    ``IQL [critic.tau=0.9]``)."""
    by_group: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in runs:
        by_group.setdefault((r.family, r.method), {})[r.config_key] = r.config
    several = len({r.method for r in runs}) > 1
    labels: dict[tuple[str, str, str], str] = {}
    for (family, method), configs in by_group.items():
        keys = sorted({k for c in configs.values() for k in c})
        differing = [k for k in keys
                     if len({json.dumps(c.get(k), default=str) for c in configs.values()}) > 1]
        for ck, c in configs.items():
            text = ", ".join(f"{k.removeprefix('model.')}={c.get(k)}" for k in differing)
            if several:
                labels[(family, method, ck)] = f"{method} [{text}]" if text else method
            else:
                labels[(family, method, ck)] = text or "default"
    for r in runs:
        r.config_label = labels[(r.family, r.method, r.config_key)]


# --------------------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1; NaN for one value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else float("nan")


def t_band(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the ``level`` t-interval of the mean across seeds (the mean twice for one seed)."""
    from scipy import stats

    a = np.asarray(values, dtype=np.float64)
    m = float(a.mean())
    if a.size < 2:
        return m, m, m
    half = float(stats.t.ppf(0.5 + level / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return m, m - half, m + half


AGGREGATES = ("mean", "median", "iqm", "optimality_gap")


def aggregate_point(scores: np.ndarray, gamma: float = 100.0) -> np.ndarray:
    """[mean, median, IQM, optimality gap] of a (runs x tasks) score matrix (rliable's definitions)."""
    from rliable import metrics

    return np.array([
        metrics.aggregate_mean(scores), metrics.aggregate_median(scores), metrics.aggregate_iqm(scores),
        metrics.aggregate_optimality_gap(scores, gamma),
    ])


def aggregate_with_ci(scores: np.ndarray, reps: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict[str, dict[str, float]]:
    """Point estimates and stratified-bootstrap (percentile) CIs, runs resampled within each task
    (rliable)."""
    from rliable import library as rly

    # rliable's StratifiedBootstrap draws its indices from NumPy's global generator (whatever random_state
    # says): seed that one for the call and put its state back afterwards
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        with warnings.catch_warnings():
            # arch: random_state -> generator (rliable passes random_state)
            warnings.simplefilter("ignore", FutureWarning)
            point, interval = rly.get_interval_estimates(
                {"x": np.asarray(scores, dtype=np.float64)}, aggregate_point, reps=reps,
                confidence_interval_size=level, random_state=np.random.RandomState(seed),
            )
    finally:
        np.random.set_state(saved)
    return {name: {"value": float(point["x"][i]), "ci_low": float(interval["x"][0, i]),
                   "ci_high": float(interval["x"][1, i])}
            for i, name in enumerate(AGGREGATES)}


# ------------------------------------------------------------------------------------------- report
@dataclass
class DatasetRow:
    dataset: str
    family: str
    config: str
    metric: str
    seeds: list[int]
    final_step: int | None
    final_mean: float | None
    final_std: float | None
    best_mean: float
    best_std: float
    return_mean: float | None
    paper: dict[str, float] = field(default_factory=dict)
    diff: dict[str, float] = field(default_factory=dict)
    unfinished: list[int] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    finals: list[float] = field(default_factory=list)  # per seed in ``seeds``, what the aggregates use
    method: str = "IDQL"


def build(runs: Sequence[RunRecord], *, include_unfinished: bool = False, reps: int = 2000,
          seed: int = 0) -> dict[str, Any]:
    """All numbers of the report (what report.json holds)."""
    label_configs(runs)
    groups: dict[tuple[str, str, str], list[RunRecord]] = {}
    for r in sorted(runs, key=lambda r: (r.family, _maze_rank(r.dataset), r.dataset, r.config_label, r.seed)):
        groups.setdefault((r.family, r.dataset, r.config_label), []).append(r)
    rows, curves, notes = [], [], []
    for (family, dataset, label), members in groups.items():
        used = [r for r in members if r.finished or include_unfinished]
        unfinished = [r.seed for r in members if not r.finished]
        seeds = [r.seed for r in members]
        if len(set(seeds)) < len(seeds):
            dup = sorted({x for x in seeds if seeds.count(x) > 1})
            notes.append(f"{dataset} [{label}]: seed(s) {', '.join(map(str, dup))} appear in more than one"
                         " run folder (the same run twice?); each folder counts as one run")
        if unfinished:
            what = "kept (their last evaluation)" if include_unfinished else "left out of the final score"
            notes.append(f"{dataset} [{label}]: seed(s) {', '.join(map(str, unfinished))} not at"
                         f" trainer.max_steps yet, {what}")
        final_mean = final_std = ret = None
        final_step = None
        if used:
            final_mean, final_std = mean_std([r.final for r in used])
            final_step = max(r.steps[-1] for r in used)
            finite = [r.returns[-1] for r in used if math.isfinite(r.returns[-1])]
            ret = float(np.mean(finite)) if finite else None
        best_mean, best_std = mean_std([r.best for r in members])
        metric = members[0].metric
        paper = paper_scores(dataset) if metric == "normalized_score" else {}
        diff = {k: final_mean - v for k, v in paper.items()} if final_mean is not None else {}
        rows.append(DatasetRow(dataset, family, label, metric, [r.seed for r in used], final_step, final_mean,
                               final_std, best_mean, best_std, ret, paper, diff, unfinished,
                               list(dict.fromkeys(r.path for r in members)), [r.final for r in used],
                               members[0].method))
        steps = sorted({s for r in members for s in r.steps})
        mean, lo, hi, n = [], [], [], []
        for s in steps:
            vals = [r.scores[r.steps.index(s)] for r in members if s in r.steps]
            m, a, b = t_band(vals)
            mean.append(m), lo.append(a), hi.append(b), n.append(len(vals))
        bc = members[0].method == METHODS["DiffusionBehavior"]
        curves.append({"dataset": dataset, "family": family, "config": label, "metric": metric,
                       "steps": steps, "mean": mean, "ci_low": lo, "ci_high": hi, "n": n,
                       "method": members[0].method, "step_unit": "actor steps" if bc else "critic steps"})
    _critic_step_axis(curves, runs)
    aggregates = []
    by_domain: dict[tuple[str, str], list[DatasetRow]] = {}
    for row in rows:
        if row.metric == "normalized_score" and row.final_mean is not None:
            by_domain.setdefault((row.family, row.config), []).append(row)
    for (family, label), members in by_domain.items():
        m = min(len(row.seeds) for row in members)
        if any(len(row.seeds) != m for row in members):
            notes.append(f"{family} [{label}]: datasets have different numbers of seeds; the aggregate uses"
                         f" the first {m} seeds of each (rliable needs a runs x tasks matrix)")
        # runs x tasks: row i holds each dataset's i-th run (runs sorted by seed)
        matrix = np.array([[row.finals[i] for row in members] for i in range(m)])
        paper_mean = {k: float(np.mean([row.paper[k] for row in members])) for k in PAPER_COLUMNS
                      if all(k in row.paper for row in members)}
        aggregates.append({"family": family, "config": label, "datasets": [row.dataset for row in members],
                           "seeds_per_dataset": m, **aggregate_with_ci(matrix, reps=reps, seed=seed),
                           "paper_mean": paper_mean})
    return {"rows": [asdict(r) for r in rows], "aggregates": aggregates, "curves": curves, "notes": notes,
            "comparisons": compare_methods(rows, reps=reps, seed=seed),
            "runs": [{**{k: v for k, v in asdict(r).items() if k != "config"}, "finished": r.finished}
                     for r in runs],
            "run_folders": len({r.path for r in runs}),
            "settings": {"bootstrap_reps": reps, "bootstrap_seed": seed, "confidence": 0.95,
                         "include_unfinished": include_unfinished, "std": "sample std over seeds (ddof 1)",
                         "optimality_gap_threshold": 100.0}}


def _critic_step_axis(curves: list[dict[str, Any]], runs: Sequence[RunRecord]) -> None:
    """Give each curve ``x``: its steps on a critic-step axis. Diffusion BC counts actor steps; where a
    dataset also has critic-step curves, its x is actor steps / IDQL's ``actor_updates_per_step`` (that of
    the dataset's IDQL runs, else 2): BC's evaluations line up with IDQL's after equal behavior training."""
    ratio: dict[str, int] = {}
    for r in runs:
        if r.method == "IDQL":
            ratio.setdefault(r.dataset, r.actor_steps_per_critic_step)
    for c in curves:
        mixed = any(o["dataset"] == c["dataset"] and o["step_unit"] == "critic steps" for o in curves)
        per = ratio.get(c["dataset"], 2) if c["step_unit"] == "actor steps" and mixed else 1
        c["x"], c["x_per_step"] = [s / per for s in c["steps"]], 1 / per


def bootstrap_difference(a: Sequence[float], b: Sequence[float], reps: int = 2000, seed: int = 0,
                         level: float = 0.95) -> dict[str, float]:
    """``mean(a) - mean(b)`` and its stratified-bootstrap percentile interval: each group's seeds resampled
    with replacement independently of the other's (the two methods are the strata, as in the stratified
    bootstrap of Agarwal et al. 2021 that rliable computes for the aggregates)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    resampled_x = x[rng.integers(len(x), size=(reps, len(x)))].mean(1)
    diffs = resampled_x - y[rng.integers(len(y), size=(reps, len(y)))].mean(1)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return {"value": float(x.mean() - y.mean()), "ci_low": float(lo), "ci_high": float(hi)}


def compare_methods(rows: Sequence[DatasetRow], reps: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Per dataset holding IDQL and IQL runs (one configuration each): every method's final mean ± std,
    IDQL - IQL with :func:`bootstrap_difference`'s 95% interval and, for a maze2d layout (D4RL's or the local
    recipe's), the paper's Table 5 numbers for that maze and their difference."""
    by_dataset: dict[str, dict[str, list[DatasetRow]]] = {}
    for row in rows:
        if row.metric == "normalized_score" and row.final_mean is not None:
            by_dataset.setdefault(row.dataset, {}).setdefault(row.method, []).append(row)
    out = []
    for dataset, methods in by_dataset.items():
        if not all(len(methods.get(m, [])) == 1 for m in ("IDQL", "IQL")):
            continue
        idql, iql = methods["IDQL"][0], methods["IQL"][0]
        maze = maze_of(dataset)
        paper = dict(TABLE5_METHODS.get(maze, {})) if maze else {}
        if paper:
            paper["IDQL - IQL"] = round(paper["IDQL"] - paper["IQL"], 6)
        out.append({
            "dataset": dataset, "maze": maze,
            "methods": {m: {"mean": rs[0].final_mean, "std": rs[0].final_std, "seeds": rs[0].seeds,
                            "config": rs[0].config} for m, rs in methods.items() if len(rs) == 1},
            "idql_minus_iql": bootstrap_difference(idql.finals, iql.finals, reps=reps, seed=seed),
            "paper": paper,
        })
    return out


def read_compute(dirs: Sequence[Path]) -> dict[str, Any]:
    """Wall time and machines from the run folders' ``suite.log`` (``python -m idql_pl.suite`` writes them):
    the sum of every attempt's seconds (the suite's wall time under ``--parallel 1``), first start and last
    end."""
    from idql_pl.experiments.suite import END_LINE

    seconds, attempts, machines, threads, stamps = 0.0, 0, {}, set(), []
    for d in dirs:
        path = Path(d) / "suite.log"
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            m = END_LINE.match(line)
            if m:
                seconds += float(m["seconds"])
                attempts += 1
                machines[m["machine"]] = None
                threads.add(m["threads"])
                stamps.append(m["time"])
            elif line.startswith("# ") and len(line) > 21 and line[21:22] == " ":
                stamps.append(line[2:21])  # an attempt's start line: '# YYYY-mm-dd HH:MM:SS state: command'
    return {"seconds": seconds, "attempts": attempts, "machines": list(machines), "threads": sorted(threads),
            "first": min(stamps) if stamps else None, "last": max(stamps) if stamps else None}


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return _fmt(mean) if std is None or not math.isfinite(std) else f"{mean:.1f} ± {std:.1f}"


def _paper_text(row: dict[str, Any], what: str) -> str:
    src = row["paper"] if what == "paper" else row["diff"]
    if not src:
        return ""
    sign = "" if what == "paper" else "+"
    return " / ".join(f"{k} {v:{sign}.1f}" for k, v in src.items())


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def write_csv(report: dict[str, Any], path: Path) -> None:
    cols = ["dataset", "family", "config", "metric", "n_seeds", "final_step", "final_mean", "final_std",
            "best_mean", "best_std", "return_mean", *[f"paper_{c}" for c in PAPER_COLUMNS],
            *[f"diff_{c}" for c in PAPER_COLUMNS], "unfinished_seeds"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in report["rows"]:
            w.writerow([r["dataset"], r["family"], r["config"], r["metric"], len(r["seeds"]), r["final_step"],
                        r["final_mean"], r["final_std"], r["best_mean"], r["best_std"], r["return_mean"],
                        *[r["paper"].get(c, "") for c in PAPER_COLUMNS],
                        *[r["diff"].get(c, "") for c in PAPER_COLUMNS], " ".join(map(str, r["unfinished"]))])


def write_markdown(report: dict[str, Any], path: Path, title: str, images: dict[str, str]) -> None:
    s = report["settings"]
    folders = report.get("run_folders", len(report["runs"]))
    count = f"{len(report['runs'])} runs" + (f" ({folders} run folders: some train several seeds)"
                                              if folders != len(report["runs"]) else "")
    lines = [f"# {title}", "",
             f"{count}. **Final** = the last evaluation (at `trainer.max_steps`, the paper's protocol), "
             f"mean ± {s['std']}. **Best** = each seed's best evaluation, for contrast only (optimistic: it"
             " selects on the evaluation episodes). Scores are D4RL normalized scores (0-100) unless the"
             " metric column says `return`. Paper: IDQL-1 / IDQL-A from Table 1 and the Table 5 maze2d"
             " numbers (docs/fidelity.md §7); Δ = our final mean − paper.", "",
             "| dataset | config | seeds | step | final | best evaluation (not the protocol) | paper | Δ |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        metric = "" if r["metric"] == "normalized_score" else " (return)"
        lines.append(f"| {r['dataset']}{metric} | {r['config']} | {len(r['seeds'])} |"
                     f" {r['final_step'] or 'n/a'} | {_pm(r['final_mean'], r['final_std'])} |"
                     f" {_pm(r['best_mean'], r['best_std'])} | {_paper_text(r, 'paper')} |"
                     f" {_paper_text(r, 'diff')} |")
    if report["aggregates"]:
        lines += ["", "## Aggregates over each domain (final scores, stratified-bootstrap"
                  f" {int(s['confidence'] * 100)}% CIs, {s['bootstrap_reps']} resamples, rliable)", "",
                  "| domain | config | datasets x seeds | mean | median | IQM | optimality gap (100) |"
                  " paper mean |",
                  "|---|---|---|---|---|---|---|---|"]
        for a in report["aggregates"]:
            cells = [f"{a[k]['value']:.1f} [{a[k]['ci_low']:.1f}, {a[k]['ci_high']:.1f}]" for k in AGGREGATES]
            paper = " / ".join(f"{k} {v:.1f}" for k, v in a["paper_mean"].items())
            lines.append(f"| {a['family']} | {a['config']} | {len(a['datasets'])} x"
                         f" {a['seeds_per_dataset']} | "
                         + " | ".join(cells) + f" | {paper} |")
    if report.get("comparisons"):
        lines += _comparison_lines(report)
    compute = report.get("compute") or {}
    if compute.get("wall_time") or compute.get("machines"):
        lines += ["", "## Compute", "", f"- wall time: {compute.get('wall_time') or 'n/a'}",
                  f"- machine: {'; '.join(compute.get('machines') or []) or 'n/a'}"]
        if compute.get("threads"):
            lines.append(f"- threads per run: {', '.join(compute['threads'])}")
    if report["notes"]:
        lines += ["", "## Notes", "", *[f"- {n}" for n in report["notes"]]]
    if images:
        lines += ["", "## Learning curves", "",
                  "Mean over seeds vs critic steps; band: 95% t-interval of the mean across "
                  "seeds; dashed/dotted lines: the paper's final numbers.", ""]
        per_dataset = {k: v for k, v in images.items() if v.startswith("curve_")}
        shown = ({k: v for k, v in images.items() if v not in per_dataset.values()}
                 if "curves.png" in images.values() else images)
        lines += [f"![{name}]({file})" for name, file in shown.items()]
        if shown is not images:
            lines += ["", "Per dataset: " + ", ".join(f"[{k}]({v})" for k, v in per_dataset.items())]
    lines.append("")
    path.write_text("\n".join(lines))


def _comparison_lines(report: dict[str, Any]) -> list[str]:
    """The IDQL vs IQL (vs diffusion BC) table: one row per dataset, beside the paper's Table 5."""
    s = report["settings"]
    named = dict.fromkeys(m for c in report["comparisons"] for m in c["methods"])
    extra = [m for m in named if m not in ("IDQL", "IQL")]
    lines = ["", "## IDQL vs IQL" + (f" vs {', '.join(extra)}" if extra else ""), "",
             f"Final scores: mean ± {s['std']}, n seeds. IDQL − IQL: difference of the means with a "
             f"{int(s['confidence'] * 100)}% stratified-bootstrap interval ({s['bootstrap_reps']} resamples, "
             "each method's seeds resampled independently). Paper: the IDQL paper's Table 5 on D4RL maze2d "
             "in the same layout (another dataset and budget than a local recipe: compare the differences).",
             "", "| dataset | " + " | ".join(["IDQL", "IQL", *extra])
             + " | IDQL − IQL [95% CI] | paper IDQL / IQL | paper IDQL − IQL |",
             "|---|" + "---|" * (len(extra) + 5)]
    for c in report["comparisons"]:
        got = c["methods"]
        cells = [f"{_pm(got[m]['mean'], got[m]['std'])} (n={len(got[m]['seeds'])})" if m in got else "n/a"
                 for m in ("IDQL", "IQL", *extra)]
        d, p = c["idql_minus_iql"], c["paper"]
        diff = f"{d['value']:+.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"
        paper = [f"{p['IDQL']:.1f} / {p['IQL']:.1f}", f"{p['IDQL - IQL']:+.1f}"] if p else ["", ""]
        lines.append("| " + " | ".join([c["dataset"], *cells, diff, *paper]) + " |")
    return lines


_PAPER_STYLE = {"IDQL-1": (":", "tab:gray"), "IDQL-A": ("--", "black"), "Table 5": ("--", "black")}


def _plot_paper(ax: Any, dataset: str) -> None:
    for name, value in paper_scores(dataset).items():
        ls, color = _PAPER_STYLE[name]
        ax.axhline(value, ls=ls, lw=0.9, color=color, label=f"paper {name} {value:g}")


def _plot_curve(ax: Any, curve: dict[str, Any]) -> None:
    """One configuration's mean curve and band; diffusion BC on a critic-step axis where it shares one
    (:func:`_critic_step_axis`)."""
    x = np.asarray(curve.get("x", curve["steps"]), dtype=float)
    per = curve.get("x_per_step", 1.0)
    note = f" (actor steps / {1 / per:g})" if per != 1 else ""
    ax.plot(x, curve["mean"], marker="o", ms=3, label=f"ours [{curve['config']}]{note}")
    ax.fill_between(x, curve["ci_low"], curve["ci_high"], alpha=0.25)
    ax.set_title(curve["dataset"], fontsize=9)
    critic_axis = per != 1 or curve.get("step_unit", "critic steps") == "critic steps"
    ax.set_xlabel("critic steps" if critic_axis else "actor steps", fontsize=8)
    ax.set_ylabel("normalized score" if curve["metric"] == "normalized_score" else "return", fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)


def write_plots(report: dict[str, Any], out: Path) -> dict[str, str]:
    """curve_<dataset>.png per dataset, curves.png (all), aggregates.png; returns {title: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images: dict[str, str] = {}
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for c in report["curves"]:
        by_dataset.setdefault(c["dataset"], []).append(c)
    for dataset, curves in by_dataset.items():
        fig, ax = plt.subplots(figsize=(4.5, 3.0), dpi=120)
        for c in curves:
            _plot_curve(ax, c)
        if curves[0]["metric"] == "normalized_score":
            _plot_paper(ax, dataset)
        ax.legend(fontsize=6, loc="lower right")
        fig.tight_layout()
        name = f"curve_{slug(dataset)}.png"
        fig.savefig(out / name)
        plt.close(fig)
        images[dataset] = name
    if len(by_dataset) > 1:
        n = len(by_dataset)
        cols = min(3, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), dpi=110, squeeze=False)
        for ax, (dataset, curves) in zip(axes.flat, by_dataset.items()):
            for c in curves:
                _plot_curve(ax, c)
            if curves[0]["metric"] == "normalized_score":
                _plot_paper(ax, dataset)
        axes.flat[0].legend(fontsize=6, loc="lower right")
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "curves.png")
        plt.close(fig)
        images = {"all datasets": "curves.png", **images}
    if report["aggregates"]:
        aggs = report["aggregates"]
        fig, axes = plt.subplots(1, len(AGGREGATES), figsize=(3.0 * len(AGGREGATES), 1.2 + 0.45 * len(aggs)),
                                 dpi=110, squeeze=False)
        names = [f"{a['family']} [{a['config']}]" for a in aggs]
        for ax, key in zip(axes[0], AGGREGATES):
            for i, a in enumerate(aggs):
                v = a[key]
                ax.errorbar(v["value"], i, xerr=[[v["value"] - v["ci_low"]], [v["ci_high"] - v["value"]]],
                            fmt="o", capsize=3)
            ax.set_yticks(range(len(aggs)), names if key == AGGREGATES[0] else [""] * len(aggs), fontsize=7)
            ax.set_title(key.replace("_", " "), fontsize=9)
            ax.grid(alpha=0.3, axis="x")
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        fig.savefig(out / "aggregates.png")
        plt.close(fig)
        images["aggregates (95% CIs)"] = "aggregates.png"
    return images


def make_report(paths: Sequence[str | Path], out: str | Path, *, title: str | None = None,
                include_unfinished: bool = False, reps: int = 2000, seed: int = 0, plots: bool = True,
                wall_time: str | None = None, machine: str | None = None) -> dict[str, Any]:
    """Read the run folders under ``paths`` and write the report into ``out``; ``wall_time`` and ``machine``
    replace what the runs' ``suite.log`` files say (:func:`read_compute`)."""
    dirs = find_run_dirs(paths)
    runs = [r for d in dirs for r in read_runs(d)]
    if not runs:
        raise ConfigError(f"no run with an evaluation among {', '.join(map(str, paths))}; point at run"
                          " folders (with config.yaml and eval_episodes.csv) or at a folder of them")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = build(runs, include_unfinished=include_unfinished, reps=reps, seed=seed)
    skipped = [str(d) for d in dirs if str(d) not in {r.path for r in runs}]
    if skipped:
        report["notes"].append(f"no evaluation yet (skipped): {', '.join(skipped)}")
    compute = read_compute(dirs)
    if compute["attempts"]:
        compute["wall_time"] = (f"{compute['seconds'] / 3600:.2f} h summed over {compute['attempts']} run "
                                "attempts (the suite's wall time at --parallel 1; from the runs' suite.log), "
                                f"{compute['first']} to {compute['last']}")
    if wall_time:
        compute["wall_time"] = wall_time
    if machine:
        compute["machines"] = [machine]
    report["compute"] = compute
    images = write_plots(report, out) if plots else {}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    write_csv(report, out / "report.csv")
    write_markdown(report, out / "report.md", title or f"Report: {out.name}", images)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m idql_pl.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+",
                   help="run folders, or folders holding run folders (e.g. runs/table1)")
    p.add_argument("--out", default=None, help="output folder (default reports/<name of the first RUN_DIR>)")
    p.add_argument("--title", default=None)
    p.add_argument("--include-unfinished", action="store_true",
                   help="use the last evaluation of runs not at max_steps")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--wall-time", default=None, help="total wall time as text (default: the runs' suite.log)")
    p.add_argument("--machine", default=None, help="the machine, as text (default: from the runs' suite.log)")
    args = p.parse_args(argv)
    out = args.out or str(Path("reports") / Path(args.run_dirs[0]).resolve().name)
    try:
        report = make_report(args.run_dirs, out, title=args.title, include_unfinished=args.include_unfinished,
                             reps=args.reps, seed=args.seed, wall_time=args.wall_time, machine=args.machine)
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    print(Path(out, "report.md").read_text())
    print(f"[report] {len(report['runs'])} runs -> {out}/report.md, report.csv, report.json, *.png")
    return 0


if __name__ == "__main__":
    from idql_pl.entrypoint import run_main

    run_main(main)

"""python -m idql_pl.report on synthetic run folders with known values: every aggregate, the paper lookup,
curves."""

import csv
import json
import math

import numpy as np
import pytest
import yaml
from scipy import stats

from idql_pl.experiments import report
from idql_pl.experiments.report import aggregate_with_ci, make_report, paper_scores

HOPPER = (-20.272305, 3234.3)


def write_run(root, dataset, seed, scores, *, max_steps=None, tau=0.7, metrics=True, episodes=2, ref=HOPPER,
              name=None):
    """A run folder as the CLI writes it; ``scores`` = {step: normalized score}, each step's episodes average
    to it."""
    run = root / (name or f"{report.slug(dataset)}-seed{seed}-tau{tau}")
    (run / "csv").mkdir(parents=True)
    steps = sorted(scores)
    cfg = {"seed_everything": seed, "trainer": {"max_steps": max_steps or steps[-1], "accelerator": "cpu"},
           "model": {"class_path": "idql_pl.IDQL",
                     "init_args": {"critic": {"class_path": "idql_pl.ImplicitCritic",
                                               "init_args": {"tau": tau}}}},
           "data": {"dataset": dataset, "ref_scores": None, "family": None},
           "run_name": run.name, "run_root": str(root)}
    (run / "config.yaml").write_text("# lightning.pytorch==2.6.6\n" + yaml.safe_dump(cfg))
    lo, hi = ref
    rows = ["stage,step,episode,seed,return,length"]
    for s in steps:
        ret = lo + scores[s] / 100 * (hi - lo)
        for e, d in enumerate(np.linspace(-1, 1, episodes)):  # symmetric spread: the mean is exactly `ret`
            rows.append(f"fit,{s},{e},{1_000_000 + e},{ret + 5 * d:.6f},100")
    rows.append(f"validate,{steps[-1]},0,1000000,{lo},1")  # a later `validate` is not part of the curve
    (run / "eval_episodes.csv").write_text("\n".join(rows) + "\n")
    if metrics:
        lines = ["eval/normalized_score,eval/return,step,train/critic/q_loss"]
        lines += [f"{scores[s]},{lo + scores[s] / 100 * (hi - lo)},{s}," for s in steps]
        lines.append(",,3,0.5")  # a training row: no evaluation
        (run / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run


def test_paper_lookup():
    assert paper_scores("hopper-medium-v2") == {"IDQL-1": 63.1, "IDQL-A": 65.4}
    # D4RL file name
    assert paper_scores("/data/hopper_medium_replay-v2.hdf5") == {"IDQL-1": 82.4, "IDQL-A": 92.1}
    assert paper_scores("walker2d-medium-expert-v2") == {"IDQL-1": 111.6, "IDQL-A": 112.7}
    assert paper_scores("antmaze-large-diverse-v2") == {"IDQL-1": 56.4, "IDQL-A": 67.9}
    assert paper_scores("antmaze-medium-play-v0") == {"IDQL-1": 86.6, "IDQL-A": 84.5}
    assert paper_scores("maze2d-large-v1") == {"Table 5": 90.1}
    for none in ("hopper-random-v2", "mujoco/hopper/medium-v0", "local/pointmaze-umaze",
                 "D4RL/antmaze/umaze-v1"):
        assert paper_scores(none) == {}
    v2 = {k for k, v in report.PAPER.items() if k.endswith("-v2")}
    assert len(v2) == 15 and sum("Table 5" in v for v in report.PAPER.values()) == 3
    from idql_pl.experiments.suite import ANTMAZE_DATASETS, LOCO_DATASETS, MAZE2D_DATASETS

    # every suite dataset
    assert all(paper_scores(d) for d in (*LOCO_DATASETS, *ANTMAZE_DATASETS, *MAZE2D_DATASETS))


def test_per_dataset_final_best_and_paper_difference(tmp_path):
    finals = {"hopper-medium-v2": [60.0, 64.0, 71.0], "walker2d-medium-v2": [80.0, 84.0, 79.0]}
    for dataset, values in finals.items():
        for seed, f in enumerate(values):
            write_run(tmp_path, dataset, seed, {100: 10.0 + seed, 200: 90.0 - seed, 300: f})
    rep = make_report([tmp_path], tmp_path / "out", reps=200)
    rows = {r["dataset"]: r for r in rep["rows"]}
    for dataset, values in finals.items():
        r = rows[dataset]
        assert (r["final_mean"] == pytest.approx(np.mean(values))
                and r["final_std"] == pytest.approx(np.std(values, ddof=1)))
        assert r["best_mean"] == pytest.approx(np.mean([max(90.0 - s, f) for s, f in enumerate(values)]))
        assert r["final_step"] == 300 and r["seeds"] == [0, 1, 2] and r["config"] == "default"
        paper = paper_scores(dataset)
        assert (r["paper"] == paper
                and r["diff"] == pytest.approx({k: np.mean(values) - v for k, v in paper.items()}))
        expected_return = HOPPER[0] + np.mean(values) / 100 * (HOPPER[1] - HOPPER[0])
        assert r["return_mean"] == pytest.approx(expected_return, rel=1e-6)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| hopper-medium-v2 | default | 3 | 300 | 65.0 ± 5.6 |" in md and "IDQL-1 63.1 / IDQL-A 65.4" in md
    assert "IDQL-1 +1.9 / IDQL-A -0.4" in md and "best evaluation (not the protocol)" in md
    with open(tmp_path / "out" / "report.csv") as f:
        csv_rows = {r["dataset"]: r for r in csv.DictReader(f)}
    assert float(csv_rows["walker2d-medium-v2"]["paper_IDQL-A"]) == 82.5
    assert float(csv_rows["walker2d-medium-v2"]["diff_IDQL-1"]) == pytest.approx(81.0 - 80.2)
    assert (json.loads((tmp_path / "out" / "report.json").read_text())["rows"][0]["final_mean"]
            == pytest.approx(65.0))
    for png in ("curve_hopper-medium-v2.png", "curve_walker2d-medium-v2.png", "curves.png", "aggregates.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000, png


def test_domain_aggregates_match_their_definitions(tmp_path):
    # seeds x tasks
    matrix = np.array([[60.0, 80.0, 20.0], [64.0, 84.0, 110.0], [71.0, 79.0, 35.0], [66.0, 90.0, 50.0]])
    datasets = ["hopper-medium-v2", "walker2d-medium-v2", "halfcheetah-medium-v2"]
    for j, dataset in enumerate(datasets):
        for seed in range(4):
            write_run(tmp_path, dataset, seed, {500: matrix[seed, j]})
    rep = make_report([tmp_path], tmp_path / "out", reps=500)
    (agg,) = rep["aggregates"]
    assert agg["family"] == "locomotion" and agg["seeds_per_dataset"] == 4 and len(agg["datasets"]) == 3
    flat = matrix.ravel()
    # rliable's definitions: mean of the datasets' means, median of the datasets' means, IQM and gap over all
    # runs
    expected = {"mean": flat.mean(), "median": np.median(matrix.mean(axis=0)),
                "iqm": stats.trim_mean(flat, 0.25), "optimality_gap": 100 - np.minimum(flat, 100).mean()}
    for key, value in expected.items():
        assert agg[key]["value"] == pytest.approx(value), key
        assert agg[key]["ci_low"] <= value <= agg[key]["ci_high"], key
    assert agg["mean"]["ci_high"] - agg["mean"]["ci_low"] > 0
    assert agg["paper_mean"] == pytest.approx({"IDQL-1": np.mean([63.1, 80.2, 49.7]),
                                               "IDQL-A": np.mean([65.4, 82.5, 51.0])})
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"| locomotion | default | 3 x 4 | {flat.mean():.1f} [" in md


def test_bootstrap_interval_covers_the_true_mean_and_is_reproducible():
    rng = np.random.default_rng(0)
    true_means = np.array([40.0, 60.0, 80.0])
    scores = rng.normal(true_means, 10.0, size=(10, 3))  # 10 seeds x 3 tasks; the true aggregate mean is 60
    est = aggregate_with_ci(scores, reps=2000, seed=0)
    assert est["mean"]["ci_low"] < true_means.mean() < est["mean"]["ci_high"]
    assert est["mean"]["ci_high"] - est["mean"]["ci_low"] < 15  # informative, not just wide
    # the stratified bootstrap keeps each task's share: its CI for the mean is narrower than the pooled-sd
    # t-interval
    pooled = stats.t.interval(0.95, scores.size - 1, loc=scores.mean(),
                              scale=scores.std(ddof=1) / math.sqrt(scores.size))
    assert est["mean"]["ci_high"] - est["mean"]["ci_low"] < pooled[1] - pooled[0]
    assert aggregate_with_ci(scores, reps=2000, seed=0) == est


def test_unfinished_runs_are_listed_and_left_out(tmp_path):
    write_run(tmp_path, "hopper-medium-v2", 0, {100: 50.0, 200: 70.0})
    write_run(tmp_path, "hopper-medium-v2", 1, {100: 30.0}, max_steps=200)  # stopped half way
    rep = make_report([tmp_path], tmp_path / "out", reps=100)
    (row,) = rep["rows"]
    assert row["seeds"] == [0] and row["unfinished"] == [1] and row["final_mean"] == 70.0
    assert row["best_mean"] == pytest.approx((70.0 + 30.0) / 2)  # best evaluation: every run so far
    assert any("seed(s) 1 not at trainer.max_steps" in n for n in rep["notes"])
    rep = make_report([tmp_path], tmp_path / "out2", reps=100, include_unfinished=True)
    assert rep["rows"][0]["final_mean"] == pytest.approx(50.0)


def test_configurations_are_grouped_and_named(tmp_path):
    for tau, base in ((0.7, 60.0), (0.9, 40.0)):
        for seed in range(2):
            write_run(tmp_path, "hopper-medium-v2", seed, {100: base + seed}, tau=tau)
    rep = make_report([tmp_path], tmp_path / "out", reps=100)
    rows = {r["config"]: r for r in rep["rows"]}
    assert set(rows) == {"critic.tau=0.7", "critic.tau=0.9"}
    assert rows["critic.tau=0.9"]["final_mean"] == pytest.approx(40.5)
    assert {a["config"] for a in rep["aggregates"]} == set(rows)


def test_learning_curve_mean_and_band(tmp_path):
    curves = [{100: 10.0, 200: 40.0}, {100: 20.0, 200: 50.0}, {100: 30.0, 200: 90.0}]
    for seed, c in enumerate(curves):
        write_run(tmp_path, "maze2d-umaze-v1", seed, c, ref=(23.85, 161.86))
    rep = make_report([tmp_path], tmp_path / "out", reps=100)
    (curve,) = rep["curves"]
    assert curve["steps"] == [100, 200] and curve["n"] == [3, 3]
    for i, step in enumerate((100, 200)):
        vals = np.array([c[step] for c in curves])
        half = stats.t.ppf(0.975, 2) * vals.std(ddof=1) / math.sqrt(3)
        assert curve["mean"][i] == pytest.approx(vals.mean())
        assert ((curve["ci_low"][i], curve["ci_high"][i])
                == pytest.approx((vals.mean() - half, vals.mean() + half)))
    assert rep["rows"][0]["paper"] == {"Table 5": 57.9} and rep["aggregates"][0]["family"] == "maze2d"


def test_normalized_score_from_returns_when_metrics_are_missing(tmp_path):
    write_run(tmp_path, "hopper-medium-v2", 0, {100: 20.0, 200: 55.0}, metrics=False)
    rep = make_report([tmp_path], tmp_path / "out", reps=100, plots=False)
    assert (rep["rows"][0]["final_mean"] == pytest.approx(55.0, abs=1e-6)
            and rep["rows"][0]["metric"] == "normalized_score")
    # no reference scores anywhere
    write_run(tmp_path / "own", "/data/own.hdf5", 0, {100: 20.0}, metrics=False)
    rep = make_report([tmp_path / "own"], tmp_path / "out2", reps=100, plots=False)
    assert rep["rows"][0]["metric"] == "return" and rep["rows"][0]["paper"] == {} and rep["aggregates"] == []


def test_cli(tmp_path, capsys):
    write_run(tmp_path / "runs", "hopper-medium-v2", 0, {100: 20.0})
    (tmp_path / "runs" / "submitit").mkdir()  # not a run folder: ignored
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--reps", "100"]) == 0
    assert "| hopper-medium-v2 | default | 1 | 100 | 20.0 |" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty"), "--out", str(tmp_path / "rep2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run with an evaluation") and err.count("\n") == 1


# ------------------------------------------------------------------------- table5-local: methods, K agents
MODELS = {"idql": "idql_pl.IDQL", "iql": "idql_pl.IQL", "bc": "idql_pl.DiffusionBehavior"}
MAZE_U = "local/pointmaze-umaze"


def write_method_run(root, method, dataset, seed, scores, *, agents=1, max_steps=None, log_seconds=None):
    """A run folder of the table5-local suite: ``scores`` = {step: [score of agent 0, agent 1, ...]} (one
    value per agent); ``agents`` > 1 writes what ``--model.num_agents K`` writes (an ``agent`` column and
    ``eval/agent<k>/normalized_score``); ``log_seconds`` adds the suite.log lines of one attempt."""
    tail = f"seeds{seed}-{seed + agents - 1}" if agents > 1 else f"seed{seed}"
    run = root / f"{method}-{report.slug(dataset)}-{tail}"
    (run / "csv").mkdir(parents=True)
    steps = sorted(scores)
    init = {"num_agents": agents} if agents > 1 else {}
    if method == "idql":
        init["actor_updates_per_step"] = 2
    cfg = {"seed_everything": seed, "trainer": {"max_steps": max_steps or steps[-1]},
           "model": {"class_path": MODELS[method], "init_args": init},
           "data": {"dataset": dataset, "ref_scores": None, "family": None},
           "run_name": run.name, "run_root": str(root)}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = ["stage,step,agent,episode,seed,return,length"]
    for s in steps:
        for k in range(agents):
            rows += [f"fit,{s},{k},{e},{1_000_000 + e},{scores[s][k] + d:.6f},600"
                     for e, d in enumerate((-1, 1))]
    (run / "eval_episodes.csv").write_text("\n".join(rows) + "\n")
    per_agent = [f"eval/agent{k}/normalized_score" for k in range(agents)] if agents > 1 else []
    lines = [",".join(["eval/normalized_score", *per_agent, "step"])]
    lines += [",".join(map(str, [np.mean(scores[s]), *(scores[s] if agents > 1 else []), s])) for s in steps]
    (run / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    if log_seconds is not None:
        (run / "suite.log").write_text(
            f"\n# 2026-01-02 03:04:05 new: python -m idql_pl fit --run_name {run.name}\nlog text\n"
            f"# 2026-01-02 04:00:00 end: exit 0 after {log_seconds:.1f} s on box (AMD EPYC, 2 usable cores), "
            "1 thread(s)\n")
    return run


def test_a_run_of_k_agents_is_k_seeds(tmp_path):
    """``--model.num_agents 3`` (agent k = seed_everything + k): three seeds, each scored by its own agent."""
    scores = {100: [10.0, 20.0, 60.0], 200: [30.0, 50.0, 70.0]}
    run = write_method_run(tmp_path, "idql", "local/pointmaze-umaze", 4, scores, agents=3)
    records = report.read_runs(run)
    assert [(r.seed, r.agent, r.scores) for r in records] == [
        (4, 0, [10.0, 30.0]), (5, 1, [20.0, 50.0]), (6, 2, [60.0, 70.0])]
    assert {r.method for r in records} == {"IDQL"} and all(r.returns == r.scores for r in records)
    (tmp_path / "other").mkdir()  # without the logged per-agent scores: each agent's own episodes (returns)
    (run / "csv" / "metrics.csv").unlink()
    assert [r.final for r in report.read_runs(run)] == [30.0, 50.0, 70.0]
    rep = make_report([tmp_path], tmp_path / "out", reps=100, plots=False)
    (row,) = rep["rows"]
    assert row["seeds"] == [4, 5, 6] and row["final_mean"] == pytest.approx(50.0)
    assert row["runs"] == [str(run)]
    assert rep["run_folders"] == 1 and len(rep["runs"]) == 3


def test_table5_local_report_compares_methods_per_maze(tmp_path):
    finals = {"local/pointmaze-umaze": ([60.0, 70.0, 80.0], [50.0, 52.0, 54.0], [20.0, 30.0, 40.0]),
              "local/pointmaze-medium": ([40.0, 45.0, 50.0], [40.0, 45.0, 50.0], [10.0, 10.0, 10.0]),
              "local/pointmaze-large": ([90.0, 90.0, 90.0], [30.0, 30.0, 30.0], [5.0, 6.0, 7.0])}
    for dataset, (idql, iql, bc) in finals.items():
        write_method_run(tmp_path, "idql", dataset, 0, {50: [0.0] * 3, 100: idql}, agents=3, log_seconds=3600)
        bc_runs = [(0, bc, 3, 5400)] if dataset == MAZE_U else [(s, [bc[s]], 1, 1800) for s in range(3)]
        for seed, scores, agents, seconds in bc_runs:  # umaze: BC's three seeds as one run of 3 agents
            write_method_run(tmp_path, "bc", dataset, seed, {100: [2.0] * agents, 200: scores}, agents=agents,
                             log_seconds=seconds)
        for seed in range(3):
            write_method_run(tmp_path, "iql", dataset, seed, {50: [1.0], 100: [iql[seed]]}, log_seconds=900)
    rep = make_report([tmp_path], tmp_path / "out", reps=500)
    rows = {(r["dataset"], r["config"]): r for r in rep["rows"]}
    assert {c for _, c in rows} == {"IDQL", "IQL", "diffusion BC"} and len(rows) == 9
    comparisons = {c["dataset"]: c for c in rep["comparisons"]}
    assert list(comparisons) == list(finals)  # every maze, in the order of the rows
    for dataset, (idql, iql, bc) in finals.items():
        for label, values in (("IDQL", idql), ("IQL", iql), ("diffusion BC", bc)):
            r = rows[(dataset, label)]
            assert r["seeds"] == [0, 1, 2] and r["final_mean"] == pytest.approx(np.mean(values))
            assert r["final_std"] == pytest.approx(np.std(values, ddof=1))
        c = comparisons[dataset]
        d = c["idql_minus_iql"]
        assert d["value"] == pytest.approx(np.mean(idql) - np.mean(iql))
        # resampled means of each method's seeds lie between its smallest and largest seed
        lowest, highest = min(idql) - max(iql) - 1e-9, max(idql) - min(iql) + 1e-9
        assert lowest <= d["ci_low"] <= d["value"] <= d["ci_high"] <= highest
        assert c["methods"]["diffusion BC"]["mean"] == pytest.approx(np.mean(bc))
    large = comparisons["local/pointmaze-large"]["idql_minus_iql"]
    assert large == {"value": 60.0, "ci_low": 60.0, "ci_high": 60.0}  # no spread in either method
    umaze = comparisons["local/pointmaze-umaze"]["idql_minus_iql"]
    assert umaze["ci_low"] < umaze["value"] < umaze["ci_high"]
    paper = comparisons["local/pointmaze-medium"]["paper"]
    assert paper == pytest.approx({"IDQL": 89.5, "IQL": 34.9, "IDQL - IQL": 54.6})
    assert comparisons["local/pointmaze-umaze"]["paper"]["IDQL - IQL"] == pytest.approx(10.5)
    assert comparisons["local/pointmaze-large"]["paper"]["IDQL - IQL"] == pytest.approx(31.5)
    # one axes per maze: BC's actor steps on the critic-step axis (/ IDQL's 2 actor updates per critic step)
    curves = {(c["dataset"], c["config"]): c for c in rep["curves"]}
    assert curves[("local/pointmaze-medium", "diffusion BC")]["x"] == [50.0, 100.0]
    assert curves[("local/pointmaze-medium", "IQL")]["x"] == [50, 100]
    compute = rep["compute"]
    assert compute["seconds"] == pytest.approx(3 * (3600 + 3 * 900 + 3 * 1800)) and compute["attempts"] == 19
    assert compute["machines"] == ["box (AMD EPYC, 2 usable cores)"] and compute["threads"] == ["1"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## IDQL vs IQL vs diffusion BC" in md and "27 runs (19 run folders" in md
    assert "| local/pointmaze-medium | 45.0 ± 5.0 (n=3) | 45.0 ± 5.0 (n=3) | 10.0 ± 0.0 (n=3) | +0.0 [" \
        in md
    assert "| 89.5 / 34.9 | +54.6 |" in md and "- wall time: 9.75 h summed over 19 run attempts" in md
    assert "- machine: box (AMD EPYC, 2 usable cores)" in md
    for png in ("curve_local-pointmaze-umaze.png", "curve_local-pointmaze-large.png", "curves.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000, png
    rep = make_report([tmp_path], tmp_path / "out2", reps=100, plots=False, wall_time="7 h", machine="laptop")
    assert rep["compute"]["wall_time"] == "7 h" and rep["compute"]["machines"] == ["laptop"]


def test_bootstrap_difference_interval():
    rng = np.random.default_rng(1)
    a, b = rng.normal(60.0, 5.0, 10), rng.normal(40.0, 5.0, 10)
    d = report.bootstrap_difference(a, b, reps=4000, seed=0)
    assert d["value"] == pytest.approx(a.mean() - b.mean()) and d["ci_low"] < 20.0 < d["ci_high"]
    # near the normal-theory width 2 * 1.96 * sqrt(s_a^2 / 10 + s_b^2 / 10) (the bootstrap's is a bit smaller)
    width = 2 * 1.96 * math.sqrt(a.var(ddof=1) / 10 + b.var(ddof=1) / 10)
    assert 0.7 * width < d["ci_high"] - d["ci_low"] < 1.1 * width
    assert report.bootstrap_difference(a, b, reps=4000, seed=0) == d

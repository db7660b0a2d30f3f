"""``make gpu-check``'s script without a GPU: its plan and time limits, the missing-package logic, the wheel
install (pip and the no-pip fallback), a step killed at its limit, and the one JSON assembled from fake steps.

Tooling tests (``-m tooling`` selects them, ``-m "not tooling"`` leaves them out); each takes seconds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from idql_pl.experiments import gpu_check as gc

REPO = Path(__file__).resolve().parents[2]


def _argv(steps: list[gc.Step], name: str) -> list[str]:
    return next(s.argv for s in steps if s.name == name)


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_plan_fits_in_eight_minutes_and_runs_what_the_gpu_needs(tmp_path: Path, capsys) -> None:
    steps = gc.plan(tmp_path, "python", [tmp_path / "gymnasium-1.4.0-py3-none-any.whl"], have_pip=True)
    assert [s.name for s in steps] == [
        "install",
        "machine",
        "cuda_tests",
        "functional_step_tests",
        "fit",
        "resume",
        "benchmark",
    ]
    assert all(s.limit_s > 0 for s in steps) and sum(s.limit_s for s in steps) <= gc.TOTAL_LIMIT_S == 480

    install = _argv(steps, "install")
    assert install[:3] == ["python", "-m", "pip"] and {"--no-index", "--no-deps"} <= set(install)
    assert _flag(install, "--target") == str(tmp_path / "site") and install[-1].endswith(".whl")
    cuda = _argv(steps, "cuda_tests")
    assert (cuda[-1] == "tests/integration/test_cuda.py" and "no:cacheprovider" in cuda
            and "--junitxml" in cuda)

    fit, resume = _argv(steps, "fit"), _argv(steps, "resume")
    assert (
        _flag(fit, "--config") == "configs/quickstart.yaml"
        and _flag(fit, "--data.dataset") == "local/pointmaze-umaze"
    )
    assert _flag(fit, "--trainer.precision") == "bf16-mixed" and _flag(fit, "--model.compile") == "true"
    assert (
        _flag(fit, "--model.compile_mode") == "reduce-overhead"
        and _flag(fit, "--trainer.accelerator") == "gpu"
    )
    assert not any("max_time" in a for a in fit)  # steps, so that evaluations and checkpoints happen
    max_steps, every = int(_flag(fit, "--trainer.max_steps")), int(_flag(fit, "--eval.every_n_steps"))
    assert every <= max_steps and int(_flag(fit, "--checkpoint.every_n_train_steps")) <= max_steps
    assert _flag(resume, "--ckpt_path") == "last" and int(_flag(resume, "--trainer.max_steps")) > max_steps
    assert resume.count("--trainer.max_steps") == 1 and _flag(resume, "--run_name") == _flag(
        fit, "--run_name"
    )

    bench = _argv(steps, "benchmark")
    assert _flag(bench, "--agents") == "1,10" and _flag(bench, "--device") == "cuda"
    assert _flag(bench, "--compile") == "joint" and _flag(bench, "--json") == str(tmp_path / "benchmark.json")

    assert gc.main(["--plan", "--work", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    total = re.fullmatch(r"total (\d+) s", lines[-1])
    assert total and int(total.group(1)) <= 480
    limits = [int(m.group(1)) for line in lines if (m := re.match(r"\s*(\d+) s  (\w+):", line))]
    assert len(limits) == len(steps) and sum(limits) == int(total.group(1))


def test_missing_wheels_are_the_absent_and_the_too_old() -> None:
    have = {"gymnasium": "1.4.0", "typing-extensions": "4.10.0", "jsonargparse": "4.30.0"}
    missing = {w.dist for w in gc.missing_wheels(version_of=have.get)}
    assert "gymnasium" not in missing and "jsonargparse" not in missing  # present: kept, whatever the version
    assert "typing-extensions" in missing  # older than gymnasium needs: replaced from the wheel
    assert {"mujoco", "mujoco-core", "minari", "gymnasium-robotics"} <= missing
    have["typing-extensions"] = "4.12.2"
    assert "typing-extensions" not in {w.dist for w in gc.missing_wheels(version_of=have.get)}
    assert not {w.dist for w in gc.WHEELS} & {"wandb", "rliable", "submitit", "torch", "lightning"}


def test_wheel_files_are_found_by_pinned_version(tmp_path: Path) -> None:
    names = [
        "mujoco_core-4.0.1-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
        "Typing_Extensions-4.16.0-py3-none-any.whl",
        "gymnasium-1.3.0-py3-none-any.whl",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    needed = [w for w in gc.WHEELS if w.dist in ("mujoco-core", "typing-extensions", "gymnasium")]
    found, absent = gc.find_wheel_files(needed, tmp_path)
    assert sorted(f.name for f in found) == sorted(names[:2])
    assert absent == ["gymnasium==1.4.0"]  # only another version there
    assert gc.find_wheel_files(needed, tmp_path / "none") == ([], [f"{w.dist}=={w.version}" for w in needed])


def test_makefile_downloads_exactly_the_check_s_wheels() -> None:
    makefile = (REPO / "Makefile").read_text()
    listed = re.search(r"^GPU_WHEELS := (.*?)\n(?!\t)", makefile, re.S | re.M).group(1)
    assert set(listed.replace("\\", " ").split()) == {f"{w.dist}=={w.version}" for w in gc.WHEELS}
    recipe = makefile[makefile.index("gpu-wheels:") :]
    assert "--no-deps" in recipe and "--only-binary=:all:" in recipe and "GPU_PY ?= 3.12" in makefile
    assert "gpu-check-plan:" in makefile and "--plan" in makefile
    ignored = (REPO / ".gitignore").read_text().split()
    assert "/wheels/" in ignored and "/.gpu_check/" in ignored and "/gpu_check/" in ignored


def _fake_wheel(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_wheels_install_without_pip_by_unzipping(tmp_path: Path) -> None:
    a = _fake_wheel(
        tmp_path / "a-1.0-py3-none-any.whl",
        {
            "pkg/__init__.py": "X = 1\n",
            "a-1.0.dist-info/METADATA": "",
            "a-1.0.data/purelib/extra_mod.py": "Y = 2\n",
            "a-1.0.data/scripts/tool": "#!/bin/sh\n",
        },
    )
    b = _fake_wheel(tmp_path / "b-1.0-py3-none-any.whl", {"pkg/core.py": "Z = 3\n"})  # same package, merged
    argv = gc.install_argv([a, b], tmp_path / "site", sys.executable, have_pip=False)
    assert argv[1:4] == ["-m", "idql_pl.gpu_check", "--_unzip"]
    assert subprocess.run(argv, cwd=REPO, capture_output=True).returncode == 0
    site = tmp_path / "site"
    assert sorted(p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()) == [
        "a-1.0.dist-info/METADATA",
        "extra_mod.py",
        "pkg/__init__.py",
        "pkg/core.py",
    ]
    bad = _fake_wheel(tmp_path / "c-1.0-py3-none-any.whl", {"../escape.py": ""})
    with pytest.raises(ValueError, match="outside"):
        gc.unzip_wheels(tmp_path / "site2", [bad])


def test_a_step_past_its_limit_is_killed_with_its_children(tmp_path: Path, monkeypatch) -> None:
    """The step ignores SIGTERM and starts a child: at the limit the whole process group is killed."""
    monkeypatch.setattr(gc, "KILL_GRACE_S", 1)
    pid_file = tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("started", flush=True)
        time.sleep(120)
    """)
    res = gc.run_step([sys.executable, "-c", code], 10, os.environ, tmp_path / "step.log")  # ample to start
    assert res["returncode"] == 124 and res["timed_out"]
    assert "started" in res["output_tail"] and "killed at its limit of 10 s" in res["output_tail"]
    status = Path(f"/proc/{int(pid_file.read_text())}/status")

    def gone() -> bool:
        try:
            return "zombie" in status.read_text()
        except FileNotFoundError:
            return True

    for _ in range(200):  # SIGKILL lands asynchronously: the child may still be on its way out
        if gone():
            break
        time.sleep(0.05)
    assert gone()


COPY = ("import shutil, sys; a = sys.argv[1:]; "
        "shutil.copytree(*a) if a[0].endswith('/') else shutil.copy(*a)")
JUNIT = """<testsuites><testsuite>
<testcase classname="tests.test_cuda" name="test_a"/><testcase classname="tests.test_cuda" name="test_b"/>
<testcase classname="tests.test_cuda" name="test_c"><skipped message="needs a CUDA GPU"/></testcase>
<testcase classname="tests.test_cuda" name="test_d"><failure message="boom"/></testcase>
</testsuite></testsuites>"""
METRICS = ("step,perf/critic_steps_per_s,eval/normalized_score,eval/return,eval/num_episodes,"
           "eval/episode_length,perf/eval_env_steps_per_s\n"
           "100,50.0,,,,,\n200,400.0,,,,,\n300,420.0,,,,,\n300,,12.5,40.0,10.0,300.0,1500.0\n")


def _copy(src: Path, dst: Path) -> list[str]:
    """A fake step: copy what a real step would write (a folder when ``src`` ends with ``/``)."""
    return [sys.executable, "-c", COPY, str(src) + ("/" if src.is_dir() else ""), str(dst)]


def test_fake_steps_make_one_json_with_every_figure(tmp_path: Path, monkeypatch) -> None:
    """Fake commands under the real step names: the JSON holds each step's command, exit code, seconds and
    output tail, the test counts, the fit's figures read from its run folder, and the benchmark's; a skipped
    CUDA test on a machine with CUDA, and a step killed at its limit, fail the check while the rest still
    runs."""
    monkeypatch.setattr(gc, "KILL_GRACE_S", 1)
    work, out, fake = tmp_path / "work", tmp_path / "out", tmp_path / "fake"
    (fake / "run" / "csv").mkdir(parents=True)
    (fake / "run" / "last.ckpt").write_text("")
    (fake / "run" / "csv" / "metrics.csv").write_text(METRICS)
    (fake / "cuda_tests.xml").write_text(JUNIT)
    figures = {"joint_step_compiled_K1": {"value": 300.0, "reference": 100.0, "ratio": 3.0, "note": ""},
               "joint_step_compiled_K10": {"value": 40.0, "reference": 20.0, "ratio": 2.0, "note": ""}}
    (fake / "benchmark.json").write_text(json.dumps({"figures": figures, "machine": {"gpu": "Fake GPU"}}))
    probe = {"gpu": "Fake GPU", "torch": "2.11.0", "torch_cuda": "13.0", "cuda_available": True,
             "import_errors": {}}
    machine = [sys.executable, "-c", f"print('probing'); print({json.dumps(json.dumps(probe))})"]
    sleeper = [sys.executable, "-c", "import time; print('compiling...', flush=True); time.sleep(60)"]
    steps = [gc.Step("machine", 30, machine, "probe"),
             gc.Step("cuda_tests", 30, _copy(fake / "cuda_tests.xml", work / "cuda_tests.xml"), "junit"),
             gc.Step("fit", 30, _copy(fake / "run", work / "runs" / "quickstart"), "fit"),
             gc.Step("resume", 2, sleeper, "hangs", needs=("fit",)),
             gc.Step("benchmark", 30, _copy(fake / "benchmark.json", work / "benchmark.json"), "bench")]
    sizes = gc.FitSizes(max_steps=300, resume_max_steps=600)
    assert gc.run_check(out, tmp_path / "no-wheels", work, sizes=sizes, steps=steps) == 1

    path = out / "gpu_check.json"
    report = json.loads(path.read_text())
    assert path.stat().st_size < 16 * 2**20 and sorted(p.name for p in out.iterdir()) == ["gpu_check.json"]
    assert report["machine"]["gpu"] == "Fake GPU" and report["machine"]["torch"] == "2.11.0"
    for name, entry in report["steps"].items():
        assert {"command", "limit_s", "returncode", "seconds", "output_tail"} <= set(entry), name
    assert "probing" in report["steps"]["machine"]["output_tail"]
    assert report["steps"]["resume"]["returncode"] == 124 and report["steps"]["resume"]["timed_out"]
    assert report["cuda_tests"] == {"passed": 2, "failed": 1, "errors": 0, "skipped": 1, "total": 4,
                                    "skipped_reasons": {"tests.test_cuda::test_c": "needs a CUDA GPU"}}
    fitted = report["fit"]
    assert fitted["critic_steps_per_s_fit"] == {"logged": [50.0, 400.0, 420.0], "median_after_first": 410.0}
    assert fitted["final_score"] == 12.5 and fitted["final_step"] == 300
    assert fitted["eval_episodes_per_s"] == 5.0  # 1500 env steps/s over 300-step episodes
    summary = report["benchmark"]["summary"]["f32"]
    assert summary["K1"]["compiled_steps_per_s"] == 300.0 and summary["K1"]["eager_steps_per_s"] == 100.0
    assert summary["K10"]["compiled_agent_steps_per_s"] == 400.0
    assert summary["K10"]["eager_agent_steps_per_s"] == 200.0
    assert report["benchmark"]["report"]["machine"]["gpu"] == "Fake GPU"  # the benchmark's own JSON, merged
    failures = report["failures"]
    assert "cuda_tests: 1 failed, 0 errors" in failures
    assert "cuda_tests: 1 skipped on a machine with CUDA" in failures
    assert "resume: exit 124 (killed at its time limit)" in failures
    assert not any(f.startswith(("machine", "fit", "benchmark")) for f in failures), failures
    assert report["ok"] is False
    assert {"missing_before", "installed_from_wheels", "no_wheel"} <= set(report["packages"])


def test_a_skipped_cuda_test_fails_only_where_cuda_is_available(tmp_path: Path) -> None:
    (tmp_path / "cuda_tests.xml").write_text(
        '<testsuite><testcase classname="tests.test_cuda" name="a"/>'
        '<testcase classname="tests.test_cuda" name="b"><skipped message="needs a CUDA GPU"/></testcase>'
        "</testsuite>"
    )
    step = gc.Step("cuda_tests", 1, [], "", result={"returncode": 0})
    with_cuda = gc.evaluate_step(step, {"machine": {"cuda_available": True}}, tmp_path, gc.FitSizes())
    assert with_cuda == ["cuda_tests: 1 skipped on a machine with CUDA"]
    assert gc.evaluate_step(step, {"machine": {"cuda_available": False}}, tmp_path, gc.FitSizes()) == []


def test_the_check_starts_without_torch_or_the_simulators() -> None:
    """``python -m idql_pl.gpu_check`` runs before the wheels are installed: importing it (and the package)
    loads only the standard library."""
    code = (
        "import sys, idql_pl.experiments.gpu_check; "
        "print([m for m in ('torch', 'lightning', 'numpy', 'gymnasium', 'jsonargparse') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"

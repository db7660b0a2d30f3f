"""``python -m idql_pl export``: policy files that act with torch alone (pt2, TorchScript) in a process that
never imports idql_pl, with the actions of ``IDQL.act`` given the same noise; one agent as a checkpoint; bad
inputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, run_cli
from tests.unit.test_policy import reference_actions

ACT_WITH_TORCH_ALONE = textwrap.dedent("""
    import json, sys
    import torch
    files, obs_path, out_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    obs = torch.load(obs_path)
    results = {}
    for name, path in files.items():
        policy = torch.export.load(path).module() if path.endswith(".pt2") else torch.jit.load(path)
        torch.manual_seed(7)
        results[name] = policy(obs)
        results[name + "/one"] = policy(obs[:1])  # any batch size
    assert not any(m == "idql_pl" or m.startswith("idql_pl.") for m in sys.modules), "idql_pl was imported"
    torch.save(results, out_path)
""")


@pytest.fixture(scope="module")
def two_agent_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    args = ["--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
            "--run_root", root]
    assert run_cli("fit", *args, "--model.num_agents", "2", "--eval.at_end", "false",
                   "--run_name", "two") == 0
    return root / "two"


def test_exported_policies_act_with_torch_alone_as_idql_act(two_agent_run, tmp_path):
    """Agent 1 of a K = 2 checkpoint (pt2 argmax, TorchScript implicit) and the same agent exported first as a
    K = 1 checkpoint (pt2 implicit, TorchScript argmax, with --config): a fresh Python that never imports
    idql_pl loads each file, acts on a batch (and on one state), and its actions equal ``IDQL.act``'s after
    the same seed, bit for bit."""
    from idql_pl.training.export import load_model

    ckpt, config = two_agent_run / "last.ckpt", two_agent_run / "config.yaml"
    single = tmp_path / "agent1.ckpt"
    assert run_cli("export", "--ckpt_path", ckpt, "--agent", "1", "--out", single) == 0  # --format from .ckpt
    exports = {  # name: (checkpoint, format, extraction, N, more arguments)
        "k2_argmax": (ckpt, "pt2", "argmax", None, ["--agent", "1"]),
        "k2_implicit": (ckpt, "torchscript", "implicit", None, ["--agent", "1"]),
        "k1_implicit": (single, "pt2", "implicit", 6, ["--config", config]),
        "k1_argmax": (single, "torchscript", "argmax", None, ["--config", config]),
    }
    files = {}
    for name, (source, fmt, extraction, n, extra) in exports.items():
        out = tmp_path / f"{name}.{'pt2' if fmt == 'pt2' else 'pt'}"
        extra = [*extra, *(["--num_samples", str(n)] if n else [])]
        assert run_cli("export", "--ckpt_path", source, "--format", fmt, "--extraction", extraction,
                       "--out", out, *extra) == 0
        files[name] = str(out)
    obs = torch.randn(6, 4)
    torch.save(obs, tmp_path / "obs.pt")
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", ACT_WITH_TORCH_ALONE, json.dumps(files),
                           str(tmp_path / "obs.pt"), str(tmp_path / "actions.pt")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    acted = torch.load(tmp_path / "actions.pt")

    two, _ = load_model(ckpt)
    one, _ = load_model(single, config)
    assert one.num_agents == 1 and two.num_agents == 2
    for name, (_, _, extraction, n, _) in exports.items():
        model, agent = (two, 1) if name.startswith("k2") else (one, 0)
        actions = acted[name]
        assert actions.shape == (6, 2) and actions.dtype == torch.float32 and actions.abs().max() <= 1.0
        assert acted[name + "/one"].shape == (1, 2)
        assert torch.equal(actions, reference_actions(model, obs, agent, 7, extraction, n)), name

    extra = {"idql_policy.json": ""}  # the file describes the policy
    torch.export.load(files["k1_implicit"], extra_files=extra)
    info = json.loads(extra["idql_policy.json"])
    assert (info["num_samples"], info["extraction"], info["agent"], info["T"]) == (6, "implicit", 0, 5)
    assert (info["obs_dim"], info["action_dim"]) == (4, 2)


def test_bad_exports_are_one_line_errors(two_agent_run, tmp_path, capsys):
    """Unknown format, an agent out of range or missing, a critic-only or behavior-only checkpoint (each says
    what the policy needs), a checkpoint without its config: exit 2 with one ``error:`` line."""
    ckpt = two_agent_run / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    halves = {}
    for half in ("critic", "behavior"):
        path = tmp_path / f"{half}.ckpt"
        torch.save({"state_dict": {k.split(".", 1)[1]: v for k, v in state["state_dict"].items()
                                   if k.startswith(half + ".")}}, path)
        halves[half] = path
    lonely = tmp_path / "alone" / "last.ckpt"
    lonely.parent.mkdir()
    shutil.copy(ckpt, lonely)
    cases = [
        (["--ckpt_path", ckpt, "--agent", "0", "--format", "onnx", "--out", tmp_path / "p.onnx"],
         "unknown --format"),
        (["--ckpt_path", ckpt, "--agent", "0", "--out", tmp_path / "p.bin"], "cannot tell the format"),
        (["--ckpt_path", ckpt, "--agent", "2", "--out", tmp_path / "p.pt2"], "--agent must lie in 0..1"),
        (["--ckpt_path", ckpt, "--out", tmp_path / "p.pt2"], "holds 2 agents: choose one with --agent"),
        (["--ckpt_path", halves["critic"], "--out", tmp_path / "p.pt2"],
         "critic only.*needs the diffusion behavior"),
        (["--ckpt_path", halves["behavior"], "--out", tmp_path / "p.pt"],
         "behavior model only.*needs the critic"),
        (["--ckpt_path", lonely, "--agent", "0", "--out", tmp_path / "p.pt2"],
         "no config.yaml beside.*--config"),
        (["--ckpt_path", ckpt, "--agent", "0", "--extraction", "softmax", "--out", tmp_path / "p.pt2"],
         "unknown --extraction"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert run_cli("export", *args) == 2, message
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert re.search(message, err), (message, err)
    assert not list(tmp_path.glob("p.*"))

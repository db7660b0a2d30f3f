"""The K = 1 reference: what single-agent training computes, recorded once from the code before agents existed.

``PYTHONPATH=<checkout> python tests/k1_reference.py --write``, run on the pre-agent checkout (commit
c8cb010 of main), wrote ``tests/data/k1_reference.json``; ``tests/test_agents.py`` recomputes :func:`record`
with the current code at ``num_agents = 1`` and requires every number to be bit-identical: the same
initialization, batches, losses, parameters, optimizer states, sampled actions and evaluation episodes. Floats
are stored as ``float.hex`` and tensors as the SHA-256 of their float32 bytes (shapes may gain a leading agent
dimension of 1; the bytes may not change).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import lightning as L
import torch

REFERENCE = Path(__file__).resolve().parent / "data" / "k1_reference.json"


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().float().numpy().tobytes()).hexdigest()[:32]


def state_hashes(state: dict) -> dict[str, str]:
    return {k: tensor_hash(v) for k, v in state.items() if isinstance(v, torch.Tensor)}


def optimizer_hashes(opts) -> list[dict[str, str]]:
    out = []
    for opt in opts:
        sd = opt.state_dict() if hasattr(opt, "state_dict") else opt
        out.append({f"{i}.{name}": tensor_hash(v) for i, st in sorted(sd["state"].items())
                    for name, v in sorted(st.items()) if isinstance(v, torch.Tensor) and v.dim() > 0})
    return out


def record_bare_loop(steps: int = 3) -> dict:
    """Algorithm 1 in a bare loop (no Trainer) on random transitions: 2 behavior updates + 1 critic update
    per iteration, then sampled actions from the trained model."""
    from idql_pl import IDQL, DiffusionBehavior, ImplicitCritic
    from idql_pl.data.buffer import TransitionBuffer
    from tests.helpers import random_transitions

    S, A = 5, 3
    L.seed_everything(0, verbose=False)
    model = IDQL(S, A, critic=partial(ImplicitCritic, hidden_dims=[32, 32], batch_size=48),
                 behavior=partial(DiffusionBehavior, hidden_dim=32, ff_dim=64, num_blocks=2, batch_size=40),
                 num_samples=6)
    init = state_hashes(model.state_dict())
    buf = TransitionBuffer(random_transitions(300, seed=1, obs_dim=S, action_dim=A, terminal_prob=0.1), seed=3)
    actor_opt, sched = model.behavior.make_optimizer(10)
    v_opt, q_opt = model.critic.configure_optimizers()
    losses = []
    model.train()
    for _ in range(steps):
        for _ in range(2):
            out = model.behavior.update(buf.sample(40), actor_opt, sched)
            losses.append(float(out["loss"]).hex())
        out = model.critic.update(buf.sample(48), v_opt, q_opt)
        losses.extend(float(out[k]).hex() for k in ("q_loss", "v_loss", "q_mean", "v_mean", "abs_u_mean"))
    model.eval()
    states = torch.randn(4, S, generator=torch.Generator().manual_seed(5))
    acts = {mode: tensor_hash(model.act(states, extraction=mode, generator=torch.Generator().manual_seed(7),
                                        precision="32"))
            for mode in ("argmax", "implicit")}
    return {"init": init, "losses": losses, "state": state_hashes(model.state_dict()),
            "optimizers": optimizer_hashes([actor_opt, v_opt, q_opt]), "actions": acts}


def record_fit(root: Path) -> dict:
    """A tiny ``fit`` of the quickstart config through the CLI with two evaluations: the evaluation episodes
    (``eval_episodes.csv``), the logged training losses and the final checkpoint's weights."""
    import csv

    from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, load_state, run_cli

    code = run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                   "--eval.every_n_steps", "3", "--run_root", root, "--run_name", "k1")
    assert code == 0, code
    run = root / "k1"
    with open(run / "eval_episodes.csv") as f:
        episodes = [[r["stage"], r["step"], r["episode"], r["return"], r["length"]] for r in csv.DictReader(f)]
    metrics = sorted(run.rglob("metrics.csv"))
    with open(metrics[0]) as f:
        rows = list(csv.DictReader(f))
    logged = [[r["step"], k, r[k]] for r in rows for k in sorted(r) if k.startswith("train/") and r[k]]
    ckpt = load_state(run / "last.ckpt")
    return {"episodes": episodes, "logged": logged, "state": state_hashes(ckpt["state_dict"]),
            "optimizers": optimizer_hashes(ckpt["optimizer_states"]),
            "shapes": {k: list(v.shape) for k, v in ckpt["state_dict"].items()}}


def record() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return {"bare_loop": record_bare_loop(), "fit": record_fit(Path(tmp))}


if __name__ == "__main__":
    import os

    data_root = tempfile.mkdtemp()
    for key in ("D4RL_DATASET_DIR", "MINARI_DATASETS_PATH", "IDQL_DATA_DIR"):
        os.environ[key] = str(Path(data_root) / key.lower())
    torch.set_num_threads(1)
    import idql_pl

    result = record()
    result["recorded_with"] = str(Path(idql_pl.__file__).resolve().parent)
    text = json.dumps(result, indent=1, sort_keys=True)
    if "--write" in sys.argv:
        REFERENCE.write_text(text + "\n")
    print(text[:2000])

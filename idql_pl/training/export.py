"""``python -m idql_pl export``: a trained agent as one file that acts with torch alone, or as a checkpoint.

- ``--format pt2``: a ``torch.export`` program (``torch.export.load(FILE).module()``), batch size dynamic;
- ``--format torchscript``: a ``torch.jit.script`` module (``torch.jit.load(FILE)``);
- ``--format ckpt``: one agent as an ordinary single-agent Lightning checkpoint (:func:`export_agent`).

The policy files hold :class:`~idql_pl.algorithm.policy.StandalonePolicy` (paper Alg. 2 with the Eq. 5
sampler) and a JSON description (``idql_policy.json``, an extra file of both formats). Noise comes from
torch's global generator: ``torch.manual_seed(s)`` before a call reproduces it. The model's sizes come from
the run's ``config.yaml`` beside the checkpoint (or ``--config``), its weights and ``num_samples`` /
``extraction`` from the checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from idql_pl.errors import CheckpointError, ConfigError

FORMATS = ("pt2", "torchscript", "ckpt")
SUFFIXES = {".pt2": "pt2", ".pt": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript",
            ".jit": "torchscript", ".ckpt": "ckpt"}
METADATA_FILE = "idql_policy.json"


def checkpoint_kind(state_dict: dict[str, Any]) -> str:
    """``"joint"`` (a diffusion behavior and a critic: IDQL, OnlineIDQL), ``"behavior"``, ``"critic"``, or
    ``"other"`` (e.g. IQL), from the checkpoint's parameter names."""
    keys = list(state_dict)
    behavior = any(k.startswith("behavior.ema_net.") for k in keys)
    critic = any(k.startswith("critic.q_target_net.") for k in keys)
    if behavior and critic:
        return "joint"
    if any(k.startswith("ema_net.") for k in keys) and not critic:
        return "behavior"
    if any(k.startswith("q_target_net.") for k in keys) and not behavior:
        return "critic"
    return "other"


def require_policy(path: str | os.PathLike, state_dict: dict[str, Any]) -> None:
    """A one-line error unless the checkpoint holds both halves a policy needs (Alg. 2)."""
    kind = checkpoint_kind(state_dict)
    if kind == "critic":
        raise CheckpointError(
            f"{path} holds a critic only (ImplicitCritic: Q and V): a policy also needs the diffusion"
            " behavior model that proposes its candidate actions; export a joint IDQL checkpoint (to reuse"
            f" this critic, train one with --model.critic_ckpt {path} --model.freeze_critic true)")
    if kind == "behavior":
        raise CheckpointError(
            f"{path} holds a behavior model only (DiffusionBehavior): a policy also needs the critic whose"
            " target Q-values choose among its candidate actions; export a joint IDQL checkpoint (to reuse"
            f" this behavior model, train one with --model.behavior_ckpt {path}"
            " --model.freeze_behavior true)")
    if kind != "joint":
        raise CheckpointError(
            f"{path} is not an IDQL checkpoint (no diffusion behavior model with a critic; e.g. IQL): only"
            " IDQL and OnlineIDQL checkpoints can be exported as a policy file;"
            " --format ckpt copies any one agent")


def model_config(ckpt_path: str | os.PathLike,
                 config: str | os.PathLike | None) -> tuple[dict[str, Any], Path]:
    """The ``model`` section (``class_path``, ``init_args``) of ``config`` or of the run's ``config.yaml``."""
    path = Path(config) if config else Path(ckpt_path).resolve().parent / "config.yaml"
    if not path.is_file():
        where = f"--config {path} does not exist" if config else f"no config.yaml beside {ckpt_path}"
        raise ConfigError(f"{where}: the checkpoint stores the weights but not every model size (T, the"
                          " schedule, the activation...); pass --config with the run's config.yaml or the"
                          " config it was trained with")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {path} ({' '.join(str(err).split())[:160]}): pass a readable YAML"
                          " config") from None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if isinstance(model, str):
        model = {"class_path": model}
    if not isinstance(model, dict) or "class_path" not in model:
        raise ConfigError(f"{path} has no model.class_path:"
                          " pass the config the run was trained with (--config)")
    return copy.deepcopy(model), path


def load_model(ckpt_path: str | os.PathLike,
               config: str | os.PathLike | None = None) -> tuple[Any, dict[str, Any]]:
    """The trained model of ``ckpt_path`` (joint behavior and critic), built from its config, on the CPU in
    eval mode; returns (model, checkpoint)."""
    import lightning as L
    from jsonargparse import ArgumentParser

    from idql_pl.training.checkpointing import safe_load

    ckpt = safe_load(ckpt_path)
    require_policy(ckpt_path, ckpt["state_dict"])
    model_cfg, cfg_path = model_config(ckpt_path, config)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    hparams.update(ckpt.get("idql_dims") or {})
    for key in ("behavior_ckpt", "critic_ckpt", "pretrained"):  # the weights are in this checkpoint
        if key in hparams:
            hparams[key] = None
    init = dict(model_cfg.get("init_args") or {})
    exported = ckpt.get("idql_exported_agent")
    if exported is not None:  # one agent of a K-agent run: that agent's per-agent hyperparameters
        for half in ("critic", "behavior"):
            sub = init.get(half)
            if isinstance(sub, dict) and isinstance(sub.get("init_args"), dict):
                args = sub["init_args"]
                for name, value in list(args.items()):
                    if isinstance(value, list) and len(value) == int(exported["num_agents"]) \
                            and name != "hidden_dims":
                        args[name] = value[int(exported["agent"])]
    init.update({k: v for k, v in hparams.items() if not k.startswith("_")})
    model_cfg["init_args"] = init
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model", fail_untyped=False, required=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = parser.parse_object({"model": model_cfg})
            # (jsonargparse < 4.49)
            instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
            model = instantiate(parsed).model
    except Exception as err:
        if isinstance(err, CheckpointError | ConfigError):
            raise
        first = " ".join(str(err).split())[:200]
        raise ConfigError(f"cannot build the model of {ckpt_path} from {cfg_path} ({first}): pass --config"
                          " with the config the run was trained with") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        first = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{ckpt_path} does not fit the model of {cfg_path} ({first}): pass --config"
                              " with the config the run was trained with") from None
    return model.cpu().eval(), ckpt


def build_policy(ckpt_path: str | os.PathLike, agent: int | None = None, num_samples: int | None = None,
                 extraction: str | None = None,
                 config: str | os.PathLike | None = None) -> tuple[Any, dict[str, Any]]:
    """The :class:`~idql_pl.algorithm.policy.StandalonePolicy` of agent ``agent`` (default 0 for a one-agent
    run) and its description (for ``idql_policy.json``)."""
    from idql_pl.algorithm.policy import StandalonePolicy

    model, ckpt = load_model(ckpt_path, config)
    agents = int(getattr(model, "num_agents", 1))
    agent = check_agent(ckpt_path, agent, agents)
    policy = StandalonePolicy.from_model(model, agent, num_samples, extraction).eval()
    info = {
        "obs_dim": policy.obs_dim, "action_dim": policy.action_dim, "num_samples": policy.num_samples,
        "extraction": policy.extraction, "T": policy.T, "clip": policy.clip, "value_loss": policy.value_loss,
        "loss_param": float(f"{policy.loss_param.item():.6g}"), "agent": agent, "num_agents": agents,
        "model": type(model).__name__, "source": str(ckpt_path),
        "global_step": int(ckpt.get("global_step", 0)),
        "dataset": (ckpt.get("datamodule_hyper_parameters") or {}).get("dataset"),
        "input": f"float32 observations [batch, {policy.obs_dim}]",
        "output": f"actions [batch, {policy.action_dim}] in [-{policy.clip:g}, {policy.clip:g}]",
        "noise": "torch's global generator: torch.manual_seed(s) before a call reproduces its actions",
    }
    return policy, info


def check_agent(path: str | os.PathLike, agent: int | None, agents: int) -> int:
    """``agent``, or 0 for a one-agent checkpoint; a one-line error when it is missing or out of range."""
    if agent is None:
        if agents == 1:
            return 0
        raise ConfigError(f"{path} holds {agents} agents: choose one with --agent 0..{agents - 1}")
    if not 0 <= agent < agents:
        raise CheckpointError(f"{path} holds {agents} agent(s):"
                              f" --agent must lie in 0..{agents - 1} (got {agent})")
    return agent


def save_policy(policy: Any, fmt: str, out: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write ``policy`` as a ``torch.export`` program (``pt2``, dynamic batch) or a TorchScript module, with
    ``info`` as the extra file ``idql_policy.json``; written beside ``out`` and renamed into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = {METADATA_FILE: json.dumps(info, indent=1)}
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")  # (torch.export.save wants .pt2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice; export's notes on the trace
            if fmt == "pt2":
                example = (torch.zeros(2, policy.obs_dim),)
                batch = torch.export.Dim("batch", min=1)
                program = torch.export.export(policy, example, dynamic_shapes=({0: batch},))
                torch.export.save(program, tmp, extra_files=extra)
            else:
                torch.jit.save(torch.jit.script(policy), str(tmp), _extra_files=extra)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def format_of(fmt: str | None, out: str) -> str:
    """``--format``, or the one ``--out``'s suffix names (.pt2, .pt/.ts, .ckpt)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ConfigError(f"unknown --format {fmt!r}: use one of {', '.join(FORMATS)}")
        return fmt
    found = SUFFIXES.get(Path(out).suffix.lower())
    if found is None:
        raise ConfigError(f"cannot tell the format from --out {out}: pass --format {'|'.join(FORMATS)} (or"
                          " name the file .pt2, .pt or .ckpt)")
    return found


def export_command(argv: list[str]) -> None:
    """``python -m idql_pl export --ckpt_path RUN/last.ckpt --out policy.pt2``: one agent as a file that acts
    with torch alone (``pt2``: ``torch.export.load(FILE).module()``; ``torchscript``:
    ``torch.jit.load(FILE)``), mapping float32 observations ``[B, obs_dim]`` to actions ``[B, action_dim]``
    (noise from torch's global generator: ``torch.manual_seed`` reproduces it); or (``--format ckpt``) one
    agent of a many-agent run as an ordinary single-agent checkpoint (validate it with
    ``--model.num_agents 1``)."""
    parser = argparse.ArgumentParser(prog="python -m idql_pl export", description=export_command.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint of an IDQL run")
    parser.add_argument("--out", required=True, help="the file to write (.pt2, .pt, .ckpt)")
    parser.add_argument("--format", default=None,
                        help="pt2, torchscript or ckpt (default: from --out's suffix)")
    parser.add_argument("--agent", type=int, default=None,
                        help="the agent to export, 0 .. K-1 (default 0 when K = 1)")
    parser.add_argument("--num_samples", type=int, default=None,
                        help="candidates per state N (default: the model's)")
    parser.add_argument("--extraction", default=None, help="argmax or implicit (default: the model's)")
    parser.add_argument("--config", default=None,
                        help="the run's config (default: config.yaml beside the checkpoint)")
    ns = parser.parse_args(argv)
    fmt = format_of(ns.format, ns.out)
    if ns.extraction is not None and ns.extraction not in ("argmax", "implicit"):
        raise ConfigError(f"unknown --extraction {ns.extraction!r}: use argmax or implicit")
    if ns.num_samples is not None and ns.num_samples < 1:
        raise ConfigError(f"--num_samples must be >= 1 (got {ns.num_samples}); the paper uses 32-128")
    start = time.perf_counter()
    if fmt == "ckpt":
        from idql_pl.training.checkpointing import export_agent, safe_load

        hparams = safe_load(ns.ckpt_path).get("hyper_parameters") or {}
        agent = check_agent(ns.ckpt_path, ns.agent, int(hparams.get("num_agents", 1)))
        overrides = {k: v for k, v in (("num_samples", ns.num_samples), ("extraction", ns.extraction))
                     if v is not None}
        export_agent(ns.ckpt_path, agent, ns.out, overrides)
        print(f"[idql_pl] wrote agent {agent} of {ns.ckpt_path} to {ns.out}"
              f" ({time.perf_counter() - start:.1f} s)")
        return
    policy, info = build_policy(ns.ckpt_path, ns.agent, ns.num_samples, ns.extraction, ns.config)
    save_policy(policy, fmt, ns.out, info)
    load = "torch.export.load(FILE).module()" if fmt == "pt2" else "torch.jit.load(FILE)"
    print(f"[idql_pl] wrote agent {info['agent']} of {ns.ckpt_path} to {ns.out} as {fmt} in"
          f" {time.perf_counter() - start:.1f} s: N {info['num_samples']}, {info['extraction']}, T"
          f" {info['T']}; load it with {load}: float32 [batch, {info['obs_dim']}] ->"
          f" [batch, {info['action_dim']}]")

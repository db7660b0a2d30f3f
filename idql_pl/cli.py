"""``python -m idql_pl {fit,validate,test}``: LightningCLI with the data's dimensions linked into the model.

Each run lives in ``checkpoints/<run_name>/`` (config.yaml, last.ckpt, periodic checkpoints, CSV and W&B logs,
eval_curve.png). ``--ckpt_path last`` resumes that folder's ``last.ckpt`` and its W&B run id.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_info

from idql_pl.callbacks.evaluation import PolicyEvaluation
from idql_pl.checkpointing import AtomicCheckpointIO, safe_load
from idql_pl.data import OfflineDataModule
from idql_pl.errors import CheckpointError, IDQLError
from idql_pl.module import dims_mismatch

RUN_ID_FILE = "wandb_run_id.txt"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", Path(text).stem if text.endswith(".hdf5") else text).strip("-").lower()


class RunConfigSaver(SaveConfigCallback):
    """Write the resolved config to the run folder (each run has its own, so runs never clash)."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.is_global_zero:
            # fit owns config.yaml; validate/test of the same run write theirs beside it, never over it
            name = self.config_filename if stage == "fit" else f"config_{stage}.yaml"
            path = Path(trainer.default_root_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)


class IDQLCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=None,
            datamodule_class=OfflineDataModule,
            subclass_mode_model=True,
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            trainer_defaults={
                "max_steps": 1_000,
                "log_every_n_steps": 100,
                "num_sanity_val_steps": 0,
                "check_val_every_n_epoch": None,
                "val_check_interval": 10_000,
                "limit_val_batches": 1,
                "enable_model_summary": False,
            },
            auto_configure_optimizers=False,
            parser_kwargs={"exit_on_error": False},
            args=args,
            run=run,
        )

    # ---------------------------------------------------------------------------------------- parser
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None, help="run folder under --run_root (default: model-dataset-seedN)")
        parser.add_argument("--run_root", type=str, default="checkpoints", help="where run folders live")
        parser.add_argument("--wandb_project", type=str, default="idql_pl", help="W&B project (offline when no API key)")
        parser.add_lightning_class_args(PolicyEvaluation, "eval")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "model": {"class_path": "idql_pl.IDQL"},
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 0,
                "checkpoint.every_n_train_steps": 10_000,
            }
        )
        for dim in ("obs_dim", "action_dim"):
            parser.link_arguments("data", f"model.init_args.{dim}", compute_fn=lambda d, dim=dim: getattr(d, dim), apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Lightning reads a checkpoint's hyperparameters into the config before anything else: refuse a missing,
        corrupt or unsafe file there with our one-line error instead of a traceback."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt not in ("last", "best", "hpc"):
            safe_load(ckpt)
        super()._parse_ckpt_path()

    # ------------------------------------------------------------------------------------ run folder
    def _sub(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def _resolve_run_dir(self) -> Path:
        cfg = self._sub()
        root = Path(cfg.run_root)
        if cfg.run_name:
            name = cfg.run_name
        else:
            model = cfg.model.class_path.rsplit(".", 1)[-1].lower()
            name = f"{model}-{_slug(cfg.data.dataset)}-seed{cfg.seed_everything}"
        ckpt = cfg.get("ckpt_path")
        run_dir = root / name
        if self.subcommand == "fit" and ckpt is None:
            # A fresh fit never writes into a folder that already holds checkpoints: pick the next free suffix.
            base, i = run_dir, 1
            while any(run_dir.glob("*.ckpt")):
                run_dir = Path(f"{base}-{i}")
                i += 1
        elif ckpt == "last":
            if not (run_dir / "last.ckpt").is_file():
                raise CheckpointError(
                    f"--ckpt_path last: no {run_dir / 'last.ckpt'} to resume; pass the --run_name of the run to"
                    " continue (see checkpoints/), or drop --ckpt_path to start a new run"
                )
        elif ckpt is not None:
            run_dir = Path(ckpt).resolve().parent
        return run_dir

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        cfg = self._sub()
        run_dir = self._resolve_run_dir()
        self.run_dir = run_dir
        ckpt_cb = self._get(self.config_init, "checkpoint")
        if ckpt_cb is not None and ckpt_cb.dirpath is None:
            ckpt_cb.dirpath = str(run_dir)
        kwargs.setdefault("default_root_dir", str(run_dir))
        if cfg.trainer.get("logger") is None:
            kwargs["logger"] = self._default_loggers(run_dir, cfg)
        if cfg.trainer.get("strategy") == "ddp":
            # a training step makes several backward passes over disjoint parameter sets (V, Q, score net)
            kwargs["strategy"] = "ddp_find_unused_parameters_true"
        plugins = cfg.trainer.get("plugins") or []
        kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def _default_loggers(self, run_dir: Path, cfg: Any) -> list[Logger]:
        csv_name = "csv" if self.subcommand == "fit" else f"csv_{self.subcommand}"
        loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name=csv_name, version="")]
        mode = os.environ.get("WANDB_MODE", "")
        if mode == "disabled" or self.subcommand != "fit":
            return loggers
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:
            print("[idql_pl] wandb not installed: logging to CSV only", file=sys.stderr)
            return loggers
        offline = mode == "offline" or not (os.environ.get("WANDB_API_KEY") or _wandb_has_key())
        if offline:
            print(f"[idql_pl] W&B: no API key found, logging offline to {run_dir}/wandb (upload later with `wandb sync`)", file=sys.stderr)
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
        loggers.append(
            # mode is passed on to wandb.init: Lightning's offline=True alone sets WANDB_MODE=dryrun, which wandb
            # >= 0.2x no longer reads as offline and then asks for the missing API key
            WandbLogger(project=cfg.wandb_project, name=run_dir.name, id=run_id, resume="allow", save_dir=str(run_dir),
                        offline=offline, **({"mode": "offline"} if offline else {}))
        )
        return loggers

    # ------------------------------------------------------------------------------------- subcommands
    def before_fit(self) -> None:
        self._resolve_ckpt_path()
        rank_zero_info(self.datamodule.summary())
        rank_zero_info(f"[idql_pl] run folder: {self.run_dir}")

    def after_fit(self) -> None:
        _finish_wandb()

    def after_validate(self) -> None:
        _finish_wandb()

    def before_validate(self) -> None:
        self._resolve_ckpt_path()

    def before_test(self) -> None:
        self._resolve_ckpt_path()

    def _resolve_ckpt_path(self) -> None:
        """``last`` means this run folder's last.ckpt; any path is checked (exists, loads safely) up front."""
        sub = self.config_init[self.subcommand]
        if sub.get("ckpt_path") == "last":
            sub["ckpt_path"] = str(self.run_dir / "last.ckpt")
        if sub.get("ckpt_path"):
            error = dims_mismatch(safe_load(sub["ckpt_path"]).get("idql_dims"), self.datamodule.obs_dim,
                                  self.datamodule.action_dim, sub["ckpt_path"], self.datamodule.info.name)
            if error:
                raise CheckpointError(error)


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def user_error_message(err: BaseException) -> str | None:
    """One line for a user error (ours, or a config jsonargparse rejected); None for a bug."""
    chain = _chain(err)
    for e in chain:
        if isinstance(e, IDQLError):
            return str(e)
    if not any(isinstance(e, ArgumentError) for e in chain):
        return None
    keys: list[str] = []
    for e in chain:
        match = re.match(r'\s*Parser key "([^"]+)"', str(e))
        if match and match.group(1) not in keys:
            keys.append(match.group(1))
    root = next((ln.strip() for ln in str(chain[-1]).splitlines() if ln.strip()), type(chain[-1]).__name__)
    where = f" at {'.'.join(keys)}" if keys else ""
    return (f"invalid configuration{where}: {root}; list the accepted keys with `python -m idql_pl fit --help`"
            " or `--print_config`")


# Third-party notices that say nothing actionable to an IDQL user.
QUIET = (
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*no pre-optimization state was saved.*",  # our checkpoints hold the post-step state by design
    r".*litlogger.*",
    r".*reward functions were updated in v1.2.1.*",  # gymnasium-robotics' Adroit notice
)


def main(args: list[str] | None = None) -> int:
    """Entry point: user errors print one ``error:`` line and exit 2 instead of a traceback."""
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    try:
        IDQLCLI(args=args)
    except KeyboardInterrupt:
        print("interrupted: resume with --ckpt_path last", file=sys.stderr)
        return 130
    except Exception as err:
        message = user_error_message(err)
        if message is None:
            raise
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return IDQLError.exit_code
    return 0


def _finish_wandb() -> None:
    """Close the W&B run (Lightning leaves it open), so the next command in this process starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _wandb_has_key() -> bool:
    try:
        import wandb

        return bool(wandb.api.api_key)
    except Exception:
        return False


__all__ = ["IDQLCLI", "main"]

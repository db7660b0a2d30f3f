"""``python -m idql_pl {fit,validate,test}``: LightningCLI with the data's dimensions linked into the model.

Each run lives in ``checkpoints/<run_name>/`` (config.yaml, last.ckpt, periodic checkpoints, CSV and W&B logs,
eval_curve.png). ``--ckpt_path last`` resumes that folder's ``last.ckpt`` and its W&B run id.
"""

from __future__ import annotations

import csv
import os
import re
import secrets
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from idql_pl import runtime
from idql_pl.data import OfflineDataModule
from idql_pl.errors import CheckpointError, ConfigError, IDQLError
from idql_pl.models.base import dims_mismatch
from idql_pl.runtime.callbacks import ReuseLargeBlocks, ShareCpus
from idql_pl.training import run_folder
from idql_pl.training.checkpointing import AtomicCheckpointIO, safe_load
from idql_pl.training.evaluation import PolicyEvaluation
from idql_pl.training.precision import precision_error, slow_bf16_note
from idql_pl.training.progress import StepProgressBar
from idql_pl.training.stop import GracefulStop, Stopped
from idql_pl.training.stop import controller as stop_controller

RUN_ID_FILE = "wandb_run_id.txt"
RUN_DIR_ENV = "IDQL_PL_RUN_DIR"  # rank 0's claimed run folder, for the DDP ranks it launches
NAMED_CKPTS = ("last", "best", "hpc")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-",
                  Path(text).stem if text.endswith(".hdf5") else text).strip("-").lower()


class RunConfigSaver(SaveConfigCallback):
    """Write the resolved config to the run folder (each run has its own, so runs never clash)."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.is_global_zero:
            # fit owns config.yaml; validate/test of the same run write theirs beside it, never over it
            # the stage comes as a TrainerFn, whose str() is "TrainerFn.VALIDATING": name files by its value
            name = self.config_filename if stage == "fit" else f"config_{TrainerFn(stage).value}.yaml"
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
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="run folder under --run_root (default: model-dataset-seedN)")
        parser.add_argument("--run_root", type=str, default="checkpoints", help="where run folders live")
        parser.add_argument("--wandb_project", type=str, default="idql_pl",
                            help="W&B project (offline when no API key)")
        parser.add_argument("--tensorboard", type=bool, default=False,
                            help="also log to TensorBoard in <run folder>/tensorboard (needs tensorboard)")
        parser.add_argument("--threads", type=int | None, default=None,
                            help="intra-op CPU threads (default: OMP_NUM_THREADS if set, else the CPUs this"
                                 " process may use, from its affinity mask,"
                                 " fewer while other processes use them)")
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
            parser.link_arguments("data", f"model.init_args.{dim}",
                                  compute_fn=lambda d, dim=dim: getattr(d, dim), apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check up front what would otherwise fail late or not at all: a YAML syntax error names
        its file, line and column; ``validate``/``test`` need a checkpoint; a ``--ckpt_path`` must be a safe,
        readable checkpoint file (Lightning reads its hyperparameters right after this, with torch.load)."""
        try:
            super().parse_arguments(parser, args)
        except Exception as err:
            located = yaml_syntax_error(err, sys.argv[1:] if args is None else args)
            if located is None:
                raise
            raise located from None
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        self.threads, self.thread_source = runtime.apply_threads(cfg.get("threads"))
        ckpt = cfg.get("ckpt_path")
        if sub in ("validate", "test") and not ckpt:
            raise ConfigError(
                f"{sub} needs a trained model: pass --ckpt_path checkpoints/<run>/last.ckpt (or --ckpt_path"
                f" last with the run's --run_name); without one it would evaluate an untrained policy"
            )
        if ckpt and ckpt not in NAMED_CKPTS:
            safe_load(ckpt)
        if sub == "fit":
            check_fit_trainer(cfg.trainer)

    # ------------------------------------------------------------------------------------ run folder
    def _sub(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def _run_name(self, cfg: Any) -> str:
        if cfg.run_name:
            return cfg.run_name
        model = cfg.model.class_path.rsplit(".", 1)[-1].lower()
        variant = (cfg.model.get("init_args") or {}).get("variant")  # OnlineIDQL: max / imp
        model += f"-{variant}" if variant else ""
        return f"{model}-{_slug(cfg.data.dataset)}-seed{cfg.seed_everything}"

    def _resolve_run_dir(self) -> Path:
        cfg = self._sub()
        root = Path(cfg.run_root)
        run_dir = root / self._run_name(cfg)
        ckpt = cfg.get("ckpt_path")
        first_rank = rank_zero_only.rank == 0
        if self.subcommand == "fit" and ckpt is None:
            # A fresh fit never writes into a folder that holds checkpoints or that another live fit claimed:
            # rank 0 claims the first free suffix; the DDP ranks it launches inherit its choice.
            if first_rank:
                slurm = run_folder.slurm_job_id() if SLURMEnvironment.detect() else None
                run_dir = run_folder.claim_fresh(run_dir, slurm_job=slurm)
                os.environ[RUN_DIR_ENV] = str(run_dir)
            elif os.environ.get(RUN_DIR_ENV):
                run_dir = Path(os.environ[RUN_DIR_ENV])
            else:  # ranks started by another launcher (torchrun, srun): the same scan, without claiming
                base, i = run_dir, 1
                while any(run_dir.glob("*.ckpt")):
                    run_dir = Path(f"{base}-{i}")
                    i += 1
        elif ckpt == "last":
            if not (run_dir / "last.ckpt").is_file():
                raise CheckpointError(
                    f"--ckpt_path last: no {run_dir / 'last.ckpt'} to resume; pass the --run_name of the run"
                    " to continue (see checkpoints/), or drop --ckpt_path to start a new run"
                )
        elif ckpt is not None and ckpt not in NAMED_CKPTS:
            run_dir = Path(ckpt).resolve().parent
        if self.subcommand == "fit" and ckpt is not None and first_rank:
            run_folder.claim_existing(run_dir)  # two resumes of one run at once would overwrite each other
        self.resume_hint = _resume_hint(run_dir, root, self._run_name(cfg))
        return run_dir

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        cfg = self._sub()
        run_dir = self._resolve_run_dir()
        self.run_dir = run_dir
        sub_init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        ckpt_cb = sub_init.get("checkpoint")
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
        callbacks = sub_init.get("trainer", {}).get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        ours: list[Any] = [GracefulStop(resume_hint=self.resume_hint), ReuseLargeBlocks()]
        if self.thread_source == "CPU affinity" and runtime.enabled("threads"):
            ours.append(ShareCpus(self.threads))
        if cfg.trainer.get("enable_progress_bar") is not False \
                and not any(isinstance(c, ProgressBar) for c in callbacks):
            ours.append(StepProgressBar())
        kwargs["callbacks"] = [*ours, *callbacks]
        return super().instantiate_trainer(**kwargs)

    def _default_loggers(self, run_dir: Path, cfg: Any) -> list[Logger]:
        """CSV always; TensorBoard with ``--tensorboard true`` (``<run>/tensorboard``); W&B for ``fit`` is
        added in :meth:`before_fit` (see :meth:`_add_wandb`)."""
        suffix = "" if self.subcommand == "fit" else f"_{self.subcommand}"
        self._wandb_wanted = self.subcommand == "fit" and os.environ.get("WANDB_MODE", "") != "disabled"
        loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name=f"csv{suffix}", version="")]
        if cfg.get("tensorboard"):
            from lightning.pytorch.loggers import TensorBoardLogger

            try:
                board = TensorBoardLogger(save_dir=str(run_dir), name=f"tensorboard{suffix}", version="")
            except ModuleNotFoundError:
                raise ConfigError("--tensorboard true needs TensorBoard: pip install tensorboard (or pip"
                                  " install 'idql_pl[tensorboard]'), or drop the flag") from None
            loggers.append(board)
        return loggers

    def _add_wandb(self) -> None:
        """Start the W&B run ourselves (rank 0) and hand it to ``WandbLogger(experiment=...)``: Lightning's
        own ``wandb.init`` call passes ``anonymous=None``, which wandb >= 0.2x answers with a deprecation
        warning on every run, and sets ``WANDB_MODE=dryrun`` offline, which wandb no longer reads as
        offline."""
        if not getattr(self, "_wandb_wanted", False):
            return
        try:
            import wandb
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:
            print("[idql_pl] wandb not installed: logging to CSV only", file=sys.stderr)
            return
        cfg, run_dir = self._sub(), self.run_dir
        mode = os.environ.get("WANDB_MODE", "")
        offline = mode == "offline" or not (os.environ.get("WANDB_API_KEY") or _wandb_has_key())
        experiment = None
        if rank_zero_only.rank == 0:
            if offline:
                print(f"[idql_pl] W&B: no API key found, logging offline to {run_dir}/wandb (upload later"
                      " with `wandb sync`)", file=sys.stderr)
            id_file = run_dir / RUN_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
            experiment = wandb.run or wandb.init(project=cfg.wandb_project, name=run_dir.name, id=run_id,
                                                 resume="allow", dir=str(run_dir),
                                                 **({"mode": "offline"} if offline else {}))
            # the x-axis WandbLogger defines when it starts the run itself
            experiment.define_metric("trainer/global_step")
            experiment.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        logger = WandbLogger(project=cfg.wandb_project, name=run_dir.name, save_dir=str(run_dir),
                             experiment=experiment)
        self.trainer.loggers = [*self.trainer.loggers, logger]

    # ------------------------------------------------------------------------------------- subcommands
    def before_fit(self) -> None:
        self._resolve_ckpt_path()
        self._note_slow_bf16()
        rank_zero_info(self.datamodule.summary())
        rank_zero_info(f"[idql_pl] run folder: {self.run_dir}")
        source = self.thread_source
        wait = runtime.wait_policy_text()
        hint = "" if source == "--threads" else "; --threads N to change"
        if source == "CPU affinity" and runtime.enabled("threads"):
            hint += "; fewer while other processes use the cores"
        rank_zero_info(f"[idql_pl] {self.threads} CPU thread{'s' if self.threads != 1 else ''}"
                       f" (from {source}{hint}), OpenMP wait policy {wait}")
        self._add_wandb()

    def after_fit(self) -> None:
        _finish_wandb()

    def after_validate(self) -> None:
        _finish_wandb()

    def before_validate(self) -> None:
        self._resolve_ckpt_path()
        self._note_slow_bf16()

    def _note_slow_bf16(self) -> None:
        """One line at start when this run computes in bf16 on a CPU without native bf16."""
        if self.trainer.strategy.root_device.type != "cpu":
            return
        asked = ([f"--trainer.precision {self.trainer.precision}"]
                 if str(self.trainer.precision).startswith("bf16") else [])
        asked += [f"--eval.precision {cb.precision}" for cb in self.trainer.callbacks
                  if isinstance(cb, PolicyEvaluation) and cb.precision == "bf16"]
        note = slow_bf16_note(" and ".join(asked)) if asked else None
        if note:
            rank_zero_info(note)

    def before_test(self) -> None:
        self._resolve_ckpt_path()

    def _resolve_ckpt_path(self) -> None:
        """``last`` means this run folder's last.ckpt; any path is checked (exists, loads safely) up front."""
        sub = self.config_init[self.subcommand]
        if sub.get("ckpt_path") == "last":
            sub["ckpt_path"] = str(self.run_dir / "last.ckpt")
        if sub.get("ckpt_path"):
            ckpt = safe_load(sub["ckpt_path"])
            error = dims_mismatch(ckpt.get("idql_dims"), self.datamodule.obs_dim,
                                  self.datamodule.action_dim, sub["ckpt_path"], self.datamodule.info.name)
            if error:
                raise CheckpointError(error)
            if self.subcommand == "fit":
                self._keep_metrics_history(int(ckpt.get("global_step", 0)))

    def _keep_metrics_history(self, resumed_step: int) -> None:
        """A resumed fit keeps ``csv/metrics.csv``'s rows up to the checkpoint's step (Lightning's CSVLogger
        would delete the file when the resumed run starts logging): they are logged again through the logger,
        then the resumed run's rows follow. Rows after that step are dropped (the resumed run redoes those
        steps)."""
        logger = next((lg for lg in self.trainer.loggers if isinstance(lg, CSVLogger)), None)
        path = self.run_dir / "csv" / "metrics.csv"
        if logger is None or not path.is_file() or rank_zero_only.rank != 0:
            return
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = 0
        for row in rows:
            step = int(float(row.pop("step", "") or -1))
            values = {k: float(v) for k, v in row.items() if k and v not in ("", None)}
            if 0 <= step <= resumed_step and values:
                logger.log_metrics(values, step=step)
                kept += 1
        logger.save()
        rank_zero_info(f"[idql_pl] kept {kept} rows of {path} up to step {resumed_step}")


def check_fit_trainer(trainer: Any) -> None:
    """Refuse up front, in one line, a step count or a precision that ``fit`` cannot run."""
    max_steps = trainer.get("max_steps")
    if max_steps is None or int(max_steps) < 1:
        raise ConfigError("--trainer.max_steps must be a positive number of training steps (got"
                          f" {max_steps}): it sets the length of the run and of its LR schedule (IDQL counts"
                          " critic steps; the paper trains 1000000)")
    error = precision_error(trainer.get("precision") or "32-true")
    if error:
        raise ConfigError(error)


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
    return (f"invalid configuration{where}: {root}; list the accepted keys with"
            " `python -m idql_pl fit --help` or `--print_config`")


def _resume_hint(run_dir: Path, root: Path, name: str) -> str:
    """What to add to the same command to continue this run (``last`` means
    ``<run_root>/<run_name>/last.ckpt``)."""
    if run_dir == root / name:
        return "--ckpt_path last"
    if run_dir.parent == root:
        return f"--run_name {run_dir.name} --ckpt_path last"
    return f"--ckpt_path {run_dir / 'last.ckpt'}"


BUNDLED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # idql_pl/configs, shipped with the package


def with_bundled_configs(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config`` path that does not exist here but names a config shipped with the
    package (``configs/loco.yaml``, or ``loco.yaml``) replaced by that config's path, so the README's commands
    also run from outside the repository, after ``pip install``."""
    def resolve(path: str) -> str:
        relative = Path(path)
        if relative.exists() or relative.is_absolute():
            return path
        parts = relative.parts[1:] if relative.parts[:1] == ("configs",) else relative.parts
        bundled = BUNDLED_CONFIGS.joinpath(*parts) if parts else None
        return str(bundled) if bundled is not None and bundled.is_file() else path

    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve(arg.split("=", 1)[1])
    return out


def _config_files(args: Any) -> list[str]:
    if not isinstance(args, list | tuple):
        return []
    args = [str(a) for a in args]
    files = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    return files + [a.split("=", 1)[1] for a in args if a.startswith("--config=")]


def yaml_syntax_error(err: BaseException, args: Any) -> ConfigError | None:
    """A YAML syntax error behind a parse failure, located: the --config file, line and column."""
    marked = next((e for e in _chain(err) if isinstance(e, yaml.MarkedYAMLError)), None)
    if marked is None:
        return None
    for name in _config_files(args):
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        try:
            yaml.safe_load(text)
        except yaml.MarkedYAMLError as bad:
            return ConfigError(f"YAML syntax error in {name}, {_where(bad)}: fix the file (a bracket, quote"
                               " or indentation) and run again")
    return ConfigError(f"YAML syntax error in a command-line value ({_where(marked, with_line=False)}): quote"
                       " it like --key '[1, 2]' or --key \"a: b\"")


def _where(err: yaml.MarkedYAMLError, with_line: bool = True) -> str:
    mark = err.problem_mark or err.context_mark
    problem = " ".join(str(err.problem or err.context or "invalid YAML").split())
    if err.context and err.problem:
        opened = err.context_mark
        since = f" (from line {opened.line + 1}, column {opened.column + 1})" if opened and with_line else ""
        problem = f"{err.context}{since}: {problem}"
    if mark is None:
        return problem
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    return f"{where}: {problem}" if with_line else f"{problem} at column {mark.column + 1}"


def main(args: list[str] | None = None) -> int:
    """Entry point: user errors print one ``error:`` line and exit 2 instead of a traceback; SIGTERM/SIGINT
    during training save last.ckpt and exit 143/130 (see idql_pl/training/stop.py)."""
    runtime.drop_notices()
    stop_controller.phase, stop_controller.requested = "setup", None
    stop_controller.install()
    stopped = False
    try:
        argv = with_bundled_configs(sys.argv[1:] if args is None else [str(a) for a in args])
        if argv[:1] == ["export"]:
            from idql_pl.training.export import export_command

            export_command(argv[1:])
            return 0
        if args is None:
            sys.argv[1:] = argv  # LightningCLI reads the command line itself
        IDQLCLI(args=None if args is None else argv)
    except Stopped as stop:
        stopped = True
        stop_controller.phase = "done"  # further signals while finishing up are only recorded
        if rank_zero_only.rank == 0:
            print(stop.message(), file=sys.stderr, flush=True)
        _finish_wandb(stop.exit_code)
        return stop.exit_code
    except KeyboardInterrupt:
        print("interrupted: resume with --ckpt_path last", file=sys.stderr)
        return 130
    except Exception as err:
        message = user_error_message(err)
        if message is None:
            raise
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        _finish_wandb(IDQLError.exit_code)
        return IDQLError.exit_code
    finally:
        if args is None and stopped:
            # a stopped command-line process ignores repeats until it exits (SIG_IGN, unlike a Python handler,
            # survives interpreter shutdown: no KeyboardInterrupt in atexit hooks, no death by the signal)
            stop_controller.ignore_from_now_on()
        else:  # finished, or called as a library (tests): the caller's handlers back
            stop_controller.restore()
            stop_controller.phase = "setup"
        run_folder.release_all()
    return 0


def _finish_wandb(exit_code: int = 0) -> None:
    """Close the W&B run (Lightning leaves it open), so the next command in this process starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def _wandb_has_key() -> bool:
    """Whether W&B has credentials (a `wandb login` or netrc entry), without prompting or a network call
    (``wandb.api.api_key`` does the same but prints a deprecation warning in wandb >= 0.2x)."""
    try:
        import wandb

        return bool(wandb.login(prompt=False, verify=False))
    except Exception:
        return False


__all__ = ["IDQLCLI", "main"]

"""DDP faults on CPU (gloo): evaluation with fewer episodes than ranks, a non-finite loss seen by one rank
only, the stop request's reductions and a signal to one rank, and each rank's share of the CPUs.

The default tests run the function in question in 2-3 forked gloo processes (tests/gloo_ranks.py, seconds);
the ``slow`` ones run the same situation end to end through ``python -m idql_pl`` with ``--trainer.strategy
ddp`` (a minute or more each on 2 CPU cores).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn

from idql_pl import runtime as threads
from idql_pl.errors import NonFiniteLossError
from idql_pl.models.base import IDQLModule
from idql_pl.runtime.callbacks import ShareCpus
from idql_pl.training.evaluation import PolicyEvaluation, gather_episodes
from idql_pl.training.stop import GracefulStop, StopController, Stopped
from tests.gloo_ranks import run_ranks
from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, load_state, read_csv, run_cli

CPU = torch.device("cpu")


def _errors(outcomes: dict) -> dict[int, tuple[str, str]]:
    """The ranks that raised, hung or died: (error, message) by rank."""
    return {rank: (o.error, o.message) for rank, o in outcomes.items() if o.error is not None}


def _ddp_strategy(world: int) -> DDPStrategy:
    """Lightning's DDP strategy outside a Trainer: its collectives run on the process group of run_ranks."""
    return DDPStrategy(parallel_devices=[CPU] * world)


# ------------------------------------------------------------------ 4. evaluation, num_episodes < world size
def _episode_return(seed: int) -> float:
    """The fake environment's return for an episode seeded ``seed``: (1 + seed % 3) steps of 1 + seed % 5."""
    return float((1 + seed % 3) * (1 + seed % 5))


class _SeededEnv:
    """A vector env whose episode ``seed`` lasts ``1 + seed % 3`` steps with reward ``1 + seed % 5`` each."""

    def __init__(self, num_envs: int) -> None:
        self.num_envs = num_envs
        self.single_action_space = SimpleNamespace(shape=(1,))
        self._seeds, self._t = np.zeros(num_envs, dtype=np.int64), np.zeros(num_envs, dtype=np.int64)

    def reset(self, seed: list[int]) -> tuple[np.ndarray, dict]:
        self._seeds, self._t = np.asarray(seed, dtype=np.int64), np.zeros(self.num_envs, dtype=np.int64)
        return self._seeds[:, None].astype(np.float32), {}

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        self._t += 1
        reward = (1 + self._seeds % 5).astype(np.float64)
        done = self._t >= 1 + self._seeds % 3
        return self._seeds[:, None].astype(np.float32), reward, done, np.zeros_like(done), {}

    def close(self) -> None:
        pass


class _Data:
    info = SimpleNamespace(ref_min_score=0.0, ref_max_score=10.0)

    def make_vector_env(self, num_envs: int, render_envs: int = 0) -> _SeededEnv:
        assert render_envs == 0  # these evaluations film nothing
        return _SeededEnv(num_envs)

    def normalized_score(self, returns: np.ndarray) -> np.ndarray:
        return 100.0 * (returns - 0.0) / 10.0


class _Policy(torch.nn.Module):
    """Stands for IDQL: ``act`` gives every state a zero action."""

    device = CPU

    def __init__(self) -> None:
        super().__init__()
        self.logged: dict[str, float] = {}

    def act(self, states: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.zeros(*states.shape[:2], 1)

    def log_dict(self, metrics: dict[str, float], **kwargs) -> None:
        self.logged.update(metrics)


def _validate_on_rank(rank: int, world: int, root: str, num_episodes: int) -> dict[str, float]:
    trainer = SimpleNamespace(global_rank=rank, world_size=world, global_step=0, datamodule=_Data(),
                              strategy=_ddp_strategy(world), is_global_zero=rank == 0, default_root_dir=root,
                              loggers=[], state=SimpleNamespace(fn=TrainerFn.VALIDATING),
                              sanity_checking=False)
    module = _Policy()
    callback = PolicyEvaluation(num_episodes=num_episodes, num_envs=2, plot=False, seed=100)
    callback.on_validation_epoch_end(trainer, module)
    return module.logged


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("world", "num_episodes"), [(3, 2), (2, 1)])
def test_ddp_evaluation_with_fewer_episodes_than_ranks(tmp_path, world, num_episodes):
    """Fault 4: a rank with no episode to run took part in the gather with an empty array, whose placeholder
    had another shape and dtype than the other ranks' (gloo aborted on the mismatch, NCCL hung). Every rank
    now sends the same padded shape, and the logged mean covers exactly ``num_episodes``, each once."""
    outcomes = run_ranks(_validate_on_rank, world, tmp_path, str(tmp_path), num_episodes, timeout=60,
                         collective_timeout_s=20)
    assert not _errors(outcomes), _errors(outcomes)
    returns = [_episode_return(100 + i) for i in range(num_episodes)]
    for outcome in outcomes.values():  # every rank logs the same metrics over all episodes
        logged = outcome.value
        assert logged["eval/num_episodes"] == num_episodes
        assert logged["eval/return"] == pytest.approx(np.mean(returns), abs=1e-12)
        assert logged["eval/normalized_score"] == pytest.approx(10.0 * np.mean(returns), abs=1e-9)
        lengths = [1 + (100 + i) % 3 for i in range(num_episodes)]
        assert logged["eval/episode_length"] == pytest.approx(np.mean(lengths))
    rows = read_csv(tmp_path / "eval_episodes.csv")  # rank 0 writes every rank's episodes
    assert [int(r["episode"]) for r in rows] == list(range(num_episodes))
    assert [float(r["return"]) for r in rows] == pytest.approx(returns)


def test_gather_episodes_alone_keeps_valid_rows_in_episode_order():
    """One process: the strategy's all_gather returns the tensor itself; padding rows are dropped."""
    strategy = SimpleNamespace(all_gather=lambda t: t)
    episodes, returns, lengths = gather_episodes(strategy, np.array([3, 1]),
                                                 np.array([[30.0, 10.0], [31.0, 11.0]]),
                                                 np.array([[3, 1], [4, 2]]), share=4, device=CPU)
    assert episodes.tolist() == [1, 3]
    assert returns.tolist() == [[10.0, 30.0], [11.0, 31.0]] and lengths.tolist() == [[1.0, 3.0], [2.0, 4.0]]


# --------------------------------------------------------------- 6a. a non-finite loss on one rank only
def _track_and_check(rank: int, world: int, bad: dict[int, tuple[str, int]]) -> list[str | None]:
    """Six steps of ``track_losses`` (no logging step), the check after step 2 and after step 6; rank ``r`` in
    ``bad`` sees a NaN in metric ``name`` from global step ``step`` on. Returns each check's error or None."""
    module = IDQLModule()
    module.trainer = SimpleNamespace(global_step=0, log_every_n_steps=1000)
    name, first = bad.get(rank, ("", 10**9))
    checks: list[str | None] = []
    for global_step in range(6):
        module.trainer.global_step = global_step
        metrics = {k: torch.tensor(1.0) for k in ("train/critic/v_loss", "train/critic/q_loss")}
        if global_step >= first:
            metrics[name] = torch.tensor(float("nan"))
        module.track_losses(metrics)
        if global_step in (1, 5):
            try:
                module.raise_if_nonfinite()
                checks.append(None)
            except NonFiniteLossError as err:
                checks.append(str(err))
    return checks


@pytest.mark.timeout(120)
def test_ddp_nonfinite_loss_on_one_rank_stops_every_rank_with_one_message(tmp_path):
    """Fault 6a: only the rank that saw the NaN raised, the others went on into their next collective (NCCL
    hangs, gloo errors). Now every rank raises the same error, naming the bad losses of all ranks and the
    first bad step over all of them, at the same check; a check before any NaN passes on every rank."""
    bad = {1: ("train/critic/q_loss", 4), 2: ("train/critic/v_loss", 2)}  # steps 5 and 3 (counted from 1)
    outcomes = run_ranks(_track_and_check, 3, tmp_path, bad, timeout=60, collective_timeout_s=20)
    assert not _errors(outcomes), _errors(outcomes)
    checks = [outcomes[r].value for r in range(3)]
    assert all(c[0] is None for c in checks), checks  # after step 2: finite everywhere
    messages = {c[1] for c in checks}
    assert len(messages) == 1 and None not in messages, checks  # every rank, the same one line
    (message,) = messages
    assert message.startswith("non-finite train/critic/v_loss, train/critic/q_loss at step 3:"), message
    assert "\n" not in message


def test_nonfinite_check_alone_names_the_loss_and_step():
    module = IDQLModule()
    module.trainer = SimpleNamespace(global_step=0, log_every_n_steps=1000)
    for step, value in enumerate([1.0, float("inf"), 1.0]):
        module.trainer.global_step = step
        module.track_losses({"train/behavior/loss": torch.tensor(value)})
    with pytest.raises(NonFiniteLossError, match=r"^non-finite train/behavior/loss at step 2: "):
        module.raise_if_nonfinite()


# ------------------------------------------------------------------------------ 6b. the stop request
class _CountingStrategy:
    root_device = CPU

    def __init__(self) -> None:
        self.reductions = 0

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        self.reductions += 1
        return tensor


def _run_steps(stop: GracefulStop, trainer: SimpleNamespace, steps: int) -> None:
    stop.on_train_start(trainer, None)
    try:
        for step in range(1, steps + 1):
            trainer.global_step = step
            stop.on_train_batch_end(trainer, None)
    finally:
        stop.stop.restore()


def test_ddp_stop_request_is_reduced_every_n_steps_not_every_step():
    """Fault 6b: the request was reduced (a tensor, an all-reduce and an ``int()``: host syncs) every step on
    every rank. Now only at multiples of ``check_every_n_steps`` and at ``max_steps``; a single process makes
    no reduction at all."""
    ddp = SimpleNamespace(world_size=2, global_step=0, max_steps=205, strategy=_CountingStrategy())
    _run_steps(GracefulStop(StopController()), ddp, 205)
    assert ddp.strategy.reductions == 5  # the default: steps 50, 100, 150, 200 and max_steps = 205

    ddp = SimpleNamespace(world_size=2, global_step=0, max_steps=205, strategy=_CountingStrategy())
    _run_steps(GracefulStop(StopController(), check_every_n_steps=10), ddp, 205)
    assert ddp.strategy.reductions == 21  # steps 10, 20, ..., 200 and 205

    alone = SimpleNamespace(world_size=1, global_step=0, max_steps=205, strategy=_CountingStrategy())
    _run_steps(GracefulStop(StopController()), alone, 205)
    assert alone.strategy.reductions == 0


def _signal_one_rank(rank: int, world: int, root: str, signalled: int, at_step: int) -> tuple[int, bool, str]:
    """Steps of a fake DDP run; rank ``signalled`` gets a real SIGTERM after step ``at_step``."""
    saved: list[int] = []
    trainer = SimpleNamespace(world_size=world, global_step=0, max_steps=1000, strategy=_ddp_strategy(world),
                              checkpoint_callback=None, default_root_dir=root,
                              save_checkpoint=lambda path, weights_only: saved.append(trainer.global_step))
    stop = GracefulStop(StopController(), check_every_n_steps=5)
    stop.on_train_start(trainer, None)
    try:
        for step in range(1, 31):
            trainer.global_step = step
            if rank == signalled and step == at_step:
                os.kill(os.getpid(), signal.SIGTERM)
            stop.on_train_batch_end(trainer, None)
    except Stopped as stopped:
        return stopped.step, stopped.saved and saved == [stopped.step], stopped.message()
    finally:
        stop.stop.restore()
    return -1, False, "not stopped"


@pytest.mark.timeout(120)
def test_ddp_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """A SIGTERM to rank 1 after step 7: both ranks stop after the next reduction (step 10), both take part in
    the save, with the same one line."""
    outcomes = run_ranks(_signal_one_rank, 2, tmp_path, str(tmp_path), 1, 7, timeout=60,
                         collective_timeout_s=20)
    assert not _errors(outcomes), _errors(outcomes)
    assert outcomes[0].value == outcomes[1].value
    step, saved, line = outcomes[0].value
    assert step == 10 and saved, outcomes[0].value
    assert line == "stopped by SIGTERM at step 10; last.ckpt saved; resume with --ckpt_path last"


# ------------------------------------------------------------------------------- 6c. CPU threads under DDP
class _Threads:
    """torch's intra-op thread count, recorded instead of changed."""

    def __init__(self, n: int) -> None:
        self.n, self.history = n, [n]

    def get(self) -> int:
        return self.n

    def set(self, n: int) -> None:
        self.n = n
        self.history.append(n)


def test_ddp_ranks_share_the_cpus_and_never_grow_beyond_their_share(monkeypatch, caplog):
    """Fault 6c: ShareCpus let a DDP rank grow to every CPU of the machine (and gave them all back at the end
    of fit), on top of the other ranks' share. Now each of the 2 ranks on an 8-CPU machine takes at most 4
    threads; the other rank's CPU time is not taken for another process's load; a foreign load of 2 cores
    costs each rank 1 thread."""
    fake = _Threads(8)  # the CLI set the affinity count
    monkeypatch.setattr(torch, "get_num_threads", fake.get)
    monkeypatch.setattr(torch, "set_num_threads", fake.set)
    # (other processes' cores, this rank's cores) per check: this rank busy and the other one waiting; both
    # busy; both at 3 cores beside a foreign load of 2; this rank nearly idle; nothing running
    loads = iter([(0.0, 4.0), (4.0, 4.0), (5.0, 3.0), (0.0, 1.0), (0.0, 0.0)])

    def others(self):
        value, self.own = next(loads)
        return value

    monkeypatch.setattr(threads.CpuShare, "others", others)
    clock = iter(range(0, 1000, 3))
    monkeypatch.setattr("idql_pl.runtime.callbacks.time.monotonic", lambda: float(next(clock)))
    trainer = SimpleNamespace(world_size=2, num_devices=2, global_step=7)
    cb = ShareCpus(max_threads=8, interval_s=2.0)
    cb.on_train_start(trainer, None)
    assert fake.n == 4 and cb.limit == 4  # capped at the start: 8 CPUs / 2 ranks on this machine
    seen = []
    for _ in range(5):
        cb.on_train_batch_end(trainer, None)
        seen.append(fake.n)
    assert seen == [4, 4, 3, 4, 4], seen
    assert max(fake.history[1:]) == 4
    cb.on_train_end(trainer, None)
    assert fake.n == 4  # after fit: this rank's share, not every CPU
    assert "DDP: 4 CPU threads per process (8 CPUs / 2 processes on this machine" in caplog.text


def test_cpu_share_reports_this_process_cores(monkeypatch):
    samples = iter([(0.0, 100.0, 10.0), (2.0, 106.0, 13.0)])
    monkeypatch.setattr(threads.CpuShare, "_sample", staticmethod(lambda: next(samples)))
    share = threads.CpuShare()
    assert share.others() == pytest.approx(1.5) and share.own == pytest.approx(1.5)  # (6 - 3) / 2 and 3 / 2


def test_one_process_keeps_every_cpu(monkeypatch):
    fake = _Threads(8)
    monkeypatch.setattr(torch, "get_num_threads", fake.get)
    monkeypatch.setattr(torch, "set_num_threads", fake.set)
    cb = ShareCpus(max_threads=8)
    cb.on_train_start(SimpleNamespace(world_size=1, num_devices=1, global_step=0), None)
    cb.on_train_end(SimpleNamespace(world_size=1, num_devices=1, global_step=0), None)
    assert fake.history == [8]  # never touched: the CLI set every CPU


# --------------------------------------------------------------------------------- end to end (slow)
DDP2 = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.enable_progress_bar", "false"]
ROOT = Path(__file__).resolve().parents[2]
# this checkout's idql_pl in the subprocesses too (whatever an editable install elsewhere points at)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_validate_with_one_episode(tmp_path):
    """Fault 4 end to end: ``validate`` on 2 ranks with 1 episode (rank 1 runs none)."""
    assert run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                   "--run_root", tmp_path, "--run_name", "r") == 0
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "idql_pl", "validate", "--config", str(CONFIGS / "quickstart.yaml"),
           *SMALL_MAZE, *TINY_IDQL, *DDP2, "--eval.num_episodes", "1", "--eval.num_envs", "2",
           "--ckpt_path", str(run / "last.ckpt")]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("DDP validate with fewer episodes than ranks hung")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_csv(run / "eval_episodes.csv") if r["stage"] == "validate"]
    assert [int(r["episode"]) for r in rows] == [0]
    metrics = [m for m in read_csv(run / "csv_validate" / "metrics.csv") if m.get("eval/return")]
    assert len(metrics) == 1 and float(metrics[0]["eval/num_episodes"]) == 1
    assert float(metrics[0]["eval/return"]) == pytest.approx(float(rows[0]["return"]), rel=1e-6, abs=1e-9)


NAN_ON_RANK_1 = """
import os, sys
import torch
from idql_pl.data.buffer import Batch, TransitionBuffer

original, seen = TransitionBuffer.sample, {"critic": 0}

def poisoned(self, batch_size, num_agents=None):
    batch = original(self, batch_size, num_agents)
    if batch_size == 32 and os.environ.get("LOCAL_RANK", "0") == "1":  # the critic's batch on rank 1 only
        seen["critic"] += 1
        if seen["critic"] >= 6:
            batch = Batch(batch.observations, batch.actions, batch.rewards.clone().fill_(float("nan")),
                          batch.next_observations, batch.masks)
    return batch

TransitionBuffer.sample = poisoned
from idql_pl.training.cli import main
sys.exit(main())
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_fit_with_a_nan_on_rank_one_stops_with_one_line(tmp_path):
    """Fault 6a end to end: rank 1's critic batches hold NaN rewards from step 6, a logging step, where rank
    0's losses are still finite (the NaN reaches its weights through DDP's gradient all-reduce, after its
    losses are computed). Before, rank 1 alone raised and rank 0 failed in its next collective; now both ranks
    stop there with the same non-finite error, and last.ckpt (step 4) is finite."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    cmd = [sys.executable, str(script), "fit", "--config", str(CONFIGS / "quickstart.yaml"), *SMALL_MAZE,
           *TINY_IDQL, *TINY_TRAINER, *DDP2, "--trainer.max_steps", "10", "--trainer.log_every_n_steps", "3",
           "--checkpoint.every_n_train_steps", "2", "--run_root", str(tmp_path), "--run_name", "nan"]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("DDP fit with a NaN on one rank hung")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines and len(set(lines)) == 1, proc.stderr[-3000:]  # the same line from every rank printing one
    assert "non-finite train/critic/q_loss" in lines[0] and "at step 6:" in lines[0], lines[0]
    last = load_state(tmp_path / "nan" / "last.ckpt")
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_process_sigterm_to_rank_one_stops_every_rank_at_a_check_step(tmp_path):
    """Fault 6b end to end: a SIGTERM to rank 1 (not the launcher) stops both ranks at the next multiple of
    50 steps; rank 0 writes last.ckpt there and prints the one line."""
    steps = 300
    cmd = [sys.executable, "-m", "idql_pl", "fit", "--config", str(CONFIGS / "quickstart.yaml"), *SMALL_MAZE,
           *TINY_IDQL, *TINY_TRAINER, *DDP2, "--trainer.max_steps", str(steps),
           "--trainer.log_every_n_steps", "20", "--trainer.val_check_interval", "1000",
           "--checkpoint.every_n_train_steps", "25", "--eval.at_end", "false",
           "--run_root", str(tmp_path), "--run_name", "ddp"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "ddp" / "last.ckpt"
    try:
        deadline = time.time() + 400
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert last.exists() and proc.poll() is None, "the run ended or never checkpointed before the signal"
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        rank1 = [int(c) for c in children if b"LOCAL_RANK=1\0" in Path(f"/proc/{c}/environ").read_bytes()]
        assert len(rank1) == 1, children  # rank 1, started by Lightning's launcher
        os.kill(rank1[0], signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("stopped by")]
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGTERM at critic step "), err[-3000:]
    step = int(lines[0].split("critic step ")[1].split(";")[0])
    assert step % 50 == 0 or step == steps, step
    assert load_state(last)["global_step"] == step

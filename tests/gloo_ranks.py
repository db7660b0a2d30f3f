"""Run a function in ``world`` CPU processes joined in a ``gloo`` process group, without a Trainer: the
fast, unit-level way to test a collective (a second, where a DDP ``fit`` through the CLI takes a minute).

The processes are forked from the test process (no re-import of torch and Lightning, as Lightning's own
``ddp_fork`` on CPU) and meet through a file store in the test's temp folder (no port to collide on). A rank
that neither returns nor raises within ``timeout`` seconds (a hang, e.g. a collective the other ranks never
join) is killed and reported as ``Hung``, so a test asserts instead of hanging the suite; one that dies
without a word (e.g. gloo aborting the process on a collective mismatch) is reported as ``Died`` with its
exit code.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist


@dataclass
class Outcome:
    """What one rank's function did: returned ``value``, or raised ``error`` (type name) and ``message``."""

    value: Any = None
    error: str | None = None
    message: str = ""


def _rank_main(fn: Callable[..., Any], rank: int, world: int, store: str, collective_timeout_s: float,
               args: tuple[Any, ...], results: Any) -> None:
    outcome = Outcome()
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=collective_timeout_s))
        outcome.value = fn(rank, world, *args)
    except BaseException as err:  # noqa: BLE001 - every outcome goes back to the test, a Stopped included
        outcome = Outcome(error=type(err).__name__, message=str(err) or traceback.format_exc(limit=3))
    results.put((rank, outcome))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, tmp_path: Path, *args: Any, timeout: float = 60.0,
              collective_timeout_s: float = 30.0) -> dict[int, Outcome]:
    """``fn(rank, world, *args)`` in ``world`` forked processes of one gloo group; each rank's
    :class:`Outcome` by rank (error ``Hung``: killed after ``timeout`` s; ``Died``: ended with no outcome)."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    store = tmp_path / f"gloo-store-{time.monotonic_ns()}"
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(fn, rank, world, str(store), collective_timeout_s, args, results))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    outcomes: dict[int, Outcome] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world and time.monotonic() < deadline:
            try:
                rank, outcome = results.get(timeout=0.2)
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break
                continue
            outcomes[rank] = outcome
    finally:
        for rank, proc in enumerate(procs):
            proc.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
                outcomes.setdefault(rank, Outcome(error="Hung", message=f"no outcome within {timeout:.0f} s"))
            outcomes.setdefault(rank, Outcome(error="Died", message=f"exit code {proc.exitcode}"))
    return outcomes

"""A progress bar that counts what ``trainer.max_steps`` counts here (critic steps for IDQL), with the rate,
the time left and the latest ``eval/normalized_score``; nothing about epochs (there is one endless epoch) or
``v_num``.

On a terminal it is a tqdm bar on stderr. Anywhere else (a CI log, a cluster job's output file) it prints one
plain line every ``every_n_steps`` steps instead of carriage-return redraws, written once the step's callbacks
have run, so a line at an evaluation step shows that evaluation's score::

    [idql_pl] critic step 5,000/25,000 (20%) | 96.1 steps/s | elapsed 0:00:52 | ETA 0:03:28 | eval/normalized_score 13.6
"""  # noqa: E501 (one sample output line, which cannot be split)

from __future__ import annotations

import contextlib
import logging
import sys
import time
from datetime import timedelta
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

from idql_pl.training.stop import step_label

SCORE = "eval/normalized_score"


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=max(0, round(seconds))))


class StepProgressBar(ProgressBar):
    """Training progress in steps of ``max_steps``.

    Args:
        every_n_steps: steps between two lines when the output is not a terminal (default: the trainer's
            ``log_every_n_steps``).
        interactive: force the tqdm bar (True) or the plain lines (False); default: whether the stream is a
            TTY.
        stream: where to write (default: ``sys.stderr``).
    """

    def __init__(self, every_n_steps: int | None = None, interactive: bool | None = None,
                 stream: TextIO | None = None) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self.interactive = interactive
        self.stream = stream
        self._enabled = True
        self._bar: Any = None
        self._redirect: Any = None
        self._start: tuple[int, float] | None = None
        self.label = "step"
        self._shown_score: float | None = None
        self._last_line_step = -1
        self._pending_step: int | None = None  # a due line, printed once every callback has run its step

    # --------------------------------------------------------------------------------- ProgressBar API
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.write(kwargs.get("sep", " ").join(map(str, args)), file=self._out())
        else:
            print(*args, file=self._out(), **kwargs)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The latest ``eval/normalized_score`` and anything logged with ``prog_bar=True``; no ``v_num``."""
        items: dict[str, Any] = {}
        score = latest_score(trainer)
        if score is not None:
            items[SCORE] = score
        for key, value in trainer.progress_bar_metrics.items():
            items.setdefault(key, value)
        return items

    # ---------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled:
            return
        self.label = step_label(pl_module)
        self._start = (trainer.global_step, time.perf_counter())
        self._last_line_step = trainer.global_step
        if self.every_n_steps is None:
            self.every_n_steps = max(1, int(trainer.log_every_n_steps or 1))
        if self._is_interactive():
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            self._bar = tqdm(total=total, initial=trainer.global_step, desc=self.label, unit=" steps",
                             file=self._out(), dynamic_ncols=True, smoothing=0.05, leave=True,
                             bar_format="{desc} {n_fmt}/{total_fmt} {bar}"
                                        " [{elapsed}<{remaining}, {rate_fmt}]{postfix}")
            # Lightning's and our info lines (evaluation results) print above the bar, not through it
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger("lightning.pytorch")])
            self._redirect.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self._enabled or self._start is None:
            return
        step = trainer.global_step
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            score = latest_score(trainer)
            if score is not None and score != self._shown_score:
                self._shown_score = score
                self._bar.set_postfix_str(f"{SCORE} {score:.1f}", refresh=False)
        elif step - self._last_line_step >= self.every_n_steps:
            # printed at the next step's start (or at the end), so an evaluation at this step is in it
            self._pending_step = step
            self._last_line_step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._flush_line(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._finish(trainer, final_line=False)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()

    # ---------------------------------------------------------------------------------------- helpers
    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def _is_interactive(self) -> bool:
        if self.interactive is not None:
            return self.interactive
        try:
            return self._out().isatty()
        except (AttributeError, ValueError):
            return False

    def format_line(self, step: int, total: int | None, elapsed: float, done: int,
                    score: float | None) -> str:
        """One progress line (the non-interactive form)."""
        parts = [f"[idql_pl] {self.label} {step:,}"
                 + (f"/{total:,} ({100 * step / total:.0f}%)" if total else "")]
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        parts.append(f"{rate:.1f} steps/s" if rate else "- steps/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if total and rate:
            parts.append(f"ETA {_clock((total - step) / rate)}")
        if score is not None:
            parts.append(f"{SCORE} {score:.1f}")
        return " | ".join(parts)

    def _line(self, trainer: L.Trainer, step: int) -> None:
        assert self._start is not None
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        elapsed = time.perf_counter() - self._start[1]
        text = self.format_line(step, total, elapsed, step - self._start[0], latest_score(trainer))
        self._last_line_step = step
        with contextlib.suppress(OSError, ValueError):
            print(text, file=self._out(), flush=True)

    def _flush_line(self, trainer: L.Trainer) -> None:
        if self._pending_step is not None and self._start is not None:
            self._line(trainer, self._pending_step)
        self._pending_step = None

    def _finish(self, trainer: L.Trainer, final_line: bool = True) -> None:
        if self._enabled and self._start is not None and self._bar is None and final_line:
            if self._pending_step is None and trainer.global_step != self._last_line_step:
                self._pending_step = trainer.global_step
            self._flush_line(trainer)
        self._pending_step = None
        self._close()
        self._start = None

    def _close(self) -> None:
        if self._redirect is not None:
            with contextlib.suppress(Exception):
                self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self._bar is not None:
            with contextlib.suppress(Exception):
                self._bar.close()
            self._bar = None


def latest_score(trainer: L.Trainer) -> float | None:
    """The latest ``eval/normalized_score``: the evaluation callback's history, else the trainer's metrics."""
    for cb in trainer.callbacks:
        history = getattr(cb, "history", None)
        if isinstance(history, list) and history:
            return float(history[-1][1])
    for metrics in (trainer.callback_metrics, trainer.logged_metrics):
        value = metrics.get(SCORE)
        if value is not None:
            return float(value)
    return None


__all__ = ["StepProgressBar", "latest_score"]

"""How each ``python -m idql_pl...`` command ends: with its ``main``'s exit code, and quietly when the reader
of its output goes away first (``python -m idql_pl.suite table5-local --dry-run | head -3``)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

#: The exit code of a process that wrote to a closed pipe, as a shell reports one killed by SIGPIPE.
CLOSED_PIPE_EXIT = 128 + signal.SIGPIPE


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """``sys.exit(main())``, except that a closed stdout ends the command with exit 141 and no traceback."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # what is still buffered for stdout would fail again at exit: send it nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = CLOSED_PIPE_EXIT
    sys.exit(code)


__all__ = ["CLOSED_PIPE_EXIT", "run_main"]

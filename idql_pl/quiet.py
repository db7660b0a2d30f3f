"""A quiet start: third-party notices that tell an IDQL user nothing they can act on are dropped, each matched
by its own text and kind (warning category, logger, or notification table), never by a blanket filter. Every
other warning, ours included, still prints.

What is dropped, and why it is not actionable here:
- torch's ``isinstance(treespec, LeafSpec)`` FutureWarning, raised inside Lightning's own code;
- Lightning's "manual optimization and every_n_train_steps, but no pre-optimization state" UserWarning: our
  checkpoints hold the post-step state by design (resume equals the uninterrupted run);
- Lightning's "Tip: ... litlogger" advertisement and its "``Trainer(limit_val_batches=1)`` was configured"
  note (that setting is this project's default: validation losses come from one fixed batch);
- gymnasium-robotics' Adroit reward-function notice, printed on import for environments this project never
  uses (it comes from the ``farama_notifications`` table, so it is removed from that table before the import).
"""

from __future__ import annotations

import logging
import sys
import warnings

# (message regex, matched from the start of the message, and the warning category)
WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization state",
     UserWarning),
)

# logger name -> message prefixes dropped from that logger's records
LOG_RECORDS: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.utilities.rank_zero": (
        "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
        "`Trainer(limit_val_batches=1)` was configured so 1 batch will be used",
    ),
}

# farama_notifications: (package, text fragment) of notices to drop
NOTIFICATIONS: tuple[tuple[str, str], ...] = (
    ("gymnasium_robotics", "environment's reward functions were updated in v1.2.1"),
)


class _DropRecords(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not message.lstrip().startswith(self.prefixes)


_installed_filters: list[tuple[logging.Logger, logging.Filter]] = []


def install() -> None:
    """Install the filters above (idempotent for the logging part)."""
    for pattern, category in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, prefixes in LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(lg is logger for lg, _ in _installed_filters):
            flt = _DropRecords(prefixes)
            logger.addFilter(flt)
            _installed_filters.append((logger, flt))
    _drop_notifications()


def uninstall_log_filters() -> None:
    """Remove the logging filters (tests)."""
    while _installed_filters:
        logger, flt = _installed_filters.pop()
        logger.removeFilter(flt)


def _drop_notifications() -> None:
    if "gymnasium_robotics" in sys.modules:  # already imported: its notice is printed, nothing to do
        return
    try:
        from farama_notifications import notifications
    except Exception:
        return
    for package, fragment in NOTIFICATIONS:
        table = notifications.get(package)
        if isinstance(table, dict):
            for version in [v for v, text in table.items() if isinstance(text, str) and fragment in text]:
                del table[version]


__all__ = ["LOG_RECORDS", "NOTIFICATIONS", "WARNINGS", "install", "uninstall_log_filters"]

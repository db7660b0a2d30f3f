"""User-facing errors: one line that names what is wrong and how to fix it (the CLI prints it, exit 2)."""


class IDQLError(Exception):
    """A problem with the user's input (dataset, config, checkpoint, environment), not a bug."""

    exit_code = 2


class DatasetError(IDQLError):
    """The dataset is missing, unreachable, malformed or inconsistent."""


class ConfigError(IDQLError):
    """A hyperparameter or option is out of range or inconsistent."""


class CheckpointError(IDQLError):
    """A checkpoint is missing, unreadable, unsafe or from another environment."""


class EvalEnvError(IDQLError):
    """The evaluation environment cannot be created."""


class NonFiniteLossError(IDQLError):
    """A training loss became NaN/inf; the last finite state was checkpointed."""

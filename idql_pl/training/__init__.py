"""The Lightning layer around the models: the CLI, the evaluation callback, checkpoints, graceful stops,
progress, precision checks, RNG state and run folders."""

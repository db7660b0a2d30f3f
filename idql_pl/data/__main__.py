"""``python -m idql_pl.data NAME [--dataset-size N] [--eval-env ID --ref-scores MIN MAX ...]``: load
(download/generate) a dataset and print its summary."""

from __future__ import annotations

import argparse
import sys
import time

from idql_pl.errors import IDQLError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idql_pl.data", description=__doc__)
    parser.add_argument("dataset", help="D4RL name, .hdf5 path, Minari id, or a local recipe: "
                        "local/pointmaze-{umaze,medium,large} | local/bandit")
    parser.add_argument("--dataset-size", type=int, default=None, help="size of a local recipe")
    parser.add_argument("--reward-transform", default="auto",
                        choices=["auto", "none", "locomotion", "antmaze"])
    parser.add_argument("--eval-env", default=None, help="evaluation env id (or a D4RL name for its env)")
    parser.add_argument("--ref-scores", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="reference returns")
    parser.add_argument("--family", default=None, help="locomotion | antmaze | maze2d | bandit | other")
    parser.add_argument("--max-episode-steps", type=int, default=None, help="evaluation episode limit")
    args = parser.parse_args(argv)
    from idql_pl.data import OfflineDataModule

    t0 = time.perf_counter()
    try:
        dm = OfflineDataModule(
            args.dataset, reward_transform=args.reward_transform, dataset_size=args.dataset_size,
            eval_env=args.eval_env, ref_scores=args.ref_scores, family=args.family,
            max_episode_steps=args.max_episode_steps,
        )
    except IDQLError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(dm.summary())
    print(f"loaded in        {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    from idql_pl.entrypoint import run_main

    run_main(main)

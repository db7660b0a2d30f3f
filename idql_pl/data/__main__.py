"""``python -m idql_pl.data NAME [--dataset-size N]``: load (download/generate) a dataset and print its summary."""

from __future__ import annotations

import argparse
import sys
import time

from idql_pl.errors import IDQLError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idql_pl.data", description=__doc__)
    parser.add_argument("dataset", help="D4RL name, .hdf5 path, Minari id, or local/pointmaze-umaze | local/bandit")
    parser.add_argument("--dataset-size", type=int, default=None, help="size of a local recipe")
    parser.add_argument("--reward-transform", default="auto", choices=["auto", "none", "locomotion", "antmaze"])
    args = parser.parse_args(argv)
    from idql_pl.data import OfflineDataModule

    t0 = time.perf_counter()
    try:
        dm = OfflineDataModule(args.dataset, reward_transform=args.reward_transform, dataset_size=args.dataset_size)
    except IDQLError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(dm.summary())
    print(f"loaded in        {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

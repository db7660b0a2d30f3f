"""``python -m idql_pl.benchmark_concurrency``: the command line of
:mod:`idql_pl.experiments.benchmark_concurrency`."""

import sys

if __name__ == "__main__":
    from idql_pl.experiments.benchmark_concurrency import main

    sys.exit(main())

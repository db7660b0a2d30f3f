"""``python -m idql_pl.suite``: the command line of :mod:`idql_pl.experiments.suite`."""

import sys

if __name__ == "__main__":
    from idql_pl.experiments.suite import main

    sys.exit(main())

"""``python -m idql_pl.report``: the command line of :mod:`idql_pl.experiments.report`."""

import sys

if __name__ == "__main__":
    from idql_pl.experiments.report import main

    sys.exit(main())

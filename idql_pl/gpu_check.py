"""``python -m idql_pl.gpu_check``: the command line of :mod:`idql_pl.experiments.gpu_check`."""

import sys

if __name__ == "__main__":
    from idql_pl.experiments.gpu_check import main

    sys.exit(main())

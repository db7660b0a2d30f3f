"""``python -m idql_pl fit --config configs/quickstart.yaml``"""

import sys

from idql_pl.cli import main

if __name__ == "__main__":
    sys.exit(main())

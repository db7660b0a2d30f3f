"""idql_pl: IDQL (Implicit Diffusion Q-Learning, Hansen-Estruch et al. 2023) in PyTorch Lightning."""

import sys as _sys

if _sys.argv[:1] == ["-m"]:  # `python -m idql_pl...`: before torch starts OpenMP (see idql_pl/threads.py)
    from idql_pl.threads import passive_openmp_wait as _passive_openmp_wait

    _passive_openmp_wait()

from idql_pl.behavior import DiffusionBehavior  # noqa: E402
from idql_pl.critic import ImplicitCritic  # noqa: E402
from idql_pl.data import OfflineDataModule  # noqa: E402
from idql_pl.idql import IDQL  # noqa: E402
from idql_pl.iql import IQL  # noqa: E402
from idql_pl.online import OnlineIDQL  # noqa: E402

__all__ = ["IDQL", "IQL", "DiffusionBehavior", "ImplicitCritic", "OfflineDataModule", "OnlineIDQL"]
__version__ = "0.1.0"

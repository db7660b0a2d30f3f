"""idql_pl: IDQL (Implicit Diffusion Q-Learning, Hansen-Estruch et al. 2023) in PyTorch Lightning.

The public classes are imported on first use (PEP 562 ``__getattr__``): ``import idql_pl`` alone loads
neither torch nor the simulators, so a tool module (``python -m idql_pl.gpu_check``) runs on a machine that
lacks them.
"""

from __future__ import annotations

import importlib as _importlib
import sys as _sys
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

if _sys.argv[:1] == ["-m"]:  # `python -m idql_pl...`: before torch starts OpenMP (see idql_pl/threads.py)
    from idql_pl.threads import passive_openmp_wait as _passive_openmp_wait

    _passive_openmp_wait()

if _TYPE_CHECKING:
    from idql_pl.behavior import DiffusionBehavior
    from idql_pl.critic import ImplicitCritic
    from idql_pl.data import OfflineDataModule
    from idql_pl.idql import IDQL
    from idql_pl.iql import IQL
    from idql_pl.online import OnlineIDQL

# public name -> the module that defines it
_EXPORTS = {
    "IDQL": "idql_pl.idql",
    "IQL": "idql_pl.iql",
    "DiffusionBehavior": "idql_pl.behavior",
    "ImplicitCritic": "idql_pl.critic",
    "OfflineDataModule": "idql_pl.data",
    "OnlineIDQL": "idql_pl.online",
}
__all__ = ["IDQL", "IQL", "DiffusionBehavior", "ImplicitCritic", "OfflineDataModule", "OnlineIDQL"]
__version__ = "0.1.0"


def __getattr__(name: str) -> _Any:
    """``idql_pl.IDQL`` and the other public classes, imported from their module on first access."""
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'idql_pl' has no attribute {name!r}")


def __dir__() -> list[str]:
    public = (k for k in globals() if k.startswith("__") or not k.startswith("_"))
    return sorted({*public, *_EXPORTS} - {"annotations"})

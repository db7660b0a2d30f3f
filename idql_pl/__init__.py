"""idql_pl: IDQL (Implicit Diffusion Q-Learning, Hansen-Estruch et al. 2023) in PyTorch Lightning.

The public classes are imported on first use (PEP 562 ``__getattr__``): ``import idql_pl`` alone loads
neither torch nor the simulators, so a tool module (``python -m idql_pl.gpu_check``) runs on a machine that
lacks them.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

if _TYPE_CHECKING:
    from idql_pl.data import OfflineDataModule
    from idql_pl.models.behavior import DiffusionBehavior
    from idql_pl.models.critic import ImplicitCritic
    from idql_pl.models.idql import IDQL
    from idql_pl.models.iql import IQL
    from idql_pl.models.online import OnlineIDQL

# public name -> the module that defines it
_EXPORTS = {
    "IDQL": "idql_pl.models.idql",
    "IQL": "idql_pl.models.iql",
    "DiffusionBehavior": "idql_pl.models.behavior",
    "ImplicitCritic": "idql_pl.models.critic",
    "OfflineDataModule": "idql_pl.data",
    "OnlineIDQL": "idql_pl.models.online",
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

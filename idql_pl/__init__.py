"""idql_pl: IDQL (Implicit Diffusion Q-Learning, Hansen-Estruch et al. 2023) in PyTorch Lightning."""

from idql_pl.behavior import DiffusionBehavior
from idql_pl.critic import ImplicitCritic
from idql_pl.data import OfflineDataModule
from idql_pl.idql import IDQL
from idql_pl.iql import IQL

__all__ = ["IDQL", "IQL", "DiffusionBehavior", "ImplicitCritic", "OfflineDataModule"]
__version__ = "0.1.0"

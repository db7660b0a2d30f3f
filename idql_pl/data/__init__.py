"""Offline data: D4RL hdf5 files, Minari datasets and local recipes behind one ``OfflineDataModule``.

Importing this package registers the evaluation env ids ``idql_pl/PointMaze2d-UMaze-v0``,
``idql_pl/Bandit2D-v0``, ``idql_pl/Maze2dD4RL-v0`` and ``idql_pl/AntMazeD4RL-v0`` with gymnasium.
"""

from idql_pl.data import d4rl as _d4rl  # noqa: F401  (registers env ids)
from idql_pl.data import local as _local  # noqa: F401  (registers env ids)
from idql_pl.data.buffer import Batch, BufferStream, TransitionBuffer
from idql_pl.data.datamodule import OfflineDataModule, OfflineDataset, load_dataset
from idql_pl.data.preprocess import DatasetInfo, RewardTransform, make_reward_transform

__all__ = [
    "Batch",
    "BufferStream",
    "DatasetInfo",
    "OfflineDataModule",
    "OfflineDataset",
    "RewardTransform",
    "TransitionBuffer",
    "load_dataset",
    "make_reward_transform",
]

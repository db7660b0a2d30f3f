"""Offline data: D4RL hdf5 files, Minari datasets and local recipes behind one ``OfflineDataModule``.

The evaluation envs (and their gymnasium ids) are defined in :mod:`idql_pl.envs`.
"""

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

"""Dataset plumbing shared by every loader: the split container, stratified split, normalisation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its inputs.

    Attributes
    ----------
    name: dataset name in the registry.
    input_shape: shape of one input sample, e.g. ``(1, 8, 8)``.
    num_classes: number of classes of the integer label (0 when there is none).
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int


@dataclass
class DatasetSplit:
    """A train/test pair of ``TensorDataset(x, y)`` plus what describes them."""

    train: TensorDataset
    test: TensorDataset
    info: DataInfo


def stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, split_seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed, seeded, class-stratified split (the same test set for every training seed)."""
    return train_test_split(x, y, test_size=test_fraction, random_state=split_seed, stratify=y)


def normalise_by_train(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel standardisation with statistics from the training split only (no test leakage).

    Arrays are ``[N, C, ...]``; mean and std are taken over every axis but the channel axis.
    """
    axes = (0,) + tuple(range(2, x_train.ndim))
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True)
    std = np.where(std < 1e-8, 1.0, std)
    return (x_train - mean) / std, (x_test - mean) / std


def to_split(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    test_fraction: float,
    split_seed: int,
    normalise: bool = True,
) -> DatasetSplit:
    """Split, normalise and wrap arrays ``x [N, C, H, W]`` (float) and ``y [N]`` (int) as tensors."""
    x_train, x_test, y_train, y_test = stratified_split(x, y, test_fraction, split_seed)
    if normalise:
        x_train, x_test = normalise_by_train(x_train, x_test)
    train = TensorDataset(torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(y_train, dtype=torch.long))
    test = TensorDataset(torch.as_tensor(x_test, dtype=torch.float32), torch.as_tensor(y_test, dtype=torch.long))
    return DatasetSplit(train, test, DataInfo(name, tuple(x.shape[1:]), num_classes))

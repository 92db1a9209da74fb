"""Dataset plumbing shared by every loader: the split container (with natural clients), stratified split,
normalisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
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


@dataclass(frozen=True)
class NaturalClients:
    """The clients a data set comes with (LEAF users, a client-id column), as CSR-style index groups.

    Client ``k`` holds ``train_order[train_offsets[k]:train_offsets[k + 1]]`` of the train split and
    likewise of the test split (its own held-out data, as LEAF splits each user). Looking one client
    up costs O(its size); nothing of size "number of clients" is built per round.
    """

    names: tuple[str, ...]
    """Client names as the data call them (LEAF user ids, column values), in client-index order."""
    train_order: np.ndarray
    train_offsets: np.ndarray
    test_order: np.ndarray
    test_offsets: np.ndarray

    @property
    def num_clients(self) -> int:
        return len(self.names)

    def train_indices(self, client: int) -> np.ndarray:
        return self.train_order[self.train_offsets[client]:self.train_offsets[client + 1]]

    def test_indices(self, client: int) -> np.ndarray:
        return self.test_order[self.test_offsets[client]:self.test_offsets[client + 1]]

    @classmethod
    def from_ids(cls, train_ids: np.ndarray, test_ids: np.ndarray, names: tuple[str, ...]) -> NaturalClients:
        """Group samples by integer client id (``0 <= id < len(names)``), keeping each client's samples in
        their original order."""
        def group(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            ids = np.asarray(ids, dtype=np.int64)
            order = np.argsort(ids, kind="stable")
            offsets = np.zeros(len(names) + 1, dtype=np.int64)
            np.cumsum(np.bincount(ids, minlength=len(names)), out=offsets[1:])
            return order, offsets

        train_order, train_offsets = group(train_ids)
        test_order, test_offsets = group(test_ids)
        return cls(tuple(names), train_order, train_offsets, test_order, test_offsets)


@dataclass(frozen=True)
class ClientShard:
    """One client's data: training rows ``train_idx`` of ``train`` and held-out rows ``held_idx`` of
    ``held`` (its own test samples). Index populations point into the global split; generated ones
    (Synthetic(alpha, beta)) hold the client's own tensors, rows ``0..n-1``."""

    train: TensorDataset
    train_idx: np.ndarray
    held: TensorDataset
    held_idx: np.ndarray


class Population(Protocol):
    """Clients whose data are made or looked up only when a client is sampled, in O(its own size),
    from (seed, client id): a million registered clients cost nothing until they train."""

    @property
    def num_clients(self) -> int: ...

    def client(self, k: int) -> ClientShard: ...


@dataclass
class DatasetSplit:
    """A train/test pair of ``TensorDataset(x, y)`` plus what describes them."""

    train: TensorDataset
    test: TensorDataset
    info: DataInfo
    clients: NaturalClients | None = None
    """The data's own clients, for ``federated.partition = "natural"`` (None: no natural clients)."""
    population: Population | None = None
    """Clients generated on demand (``federated.partition = "natural"``; e.g. Synthetic(alpha, beta)); then
    ``train`` / ``test`` are the central view (all clients' data at small N, a seeded sample of clients
    at large N)."""
    table: Any = None
    """The train split's source table (a Hugging Face ``Dataset`` whose rows are the train samples in
    order), for Flower Datasets partitioners that split by one of its columns; None for array data."""


def stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, split_seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed, seeded, class-stratified split (the same test set for every training seed)."""
    from sklearn.model_selection import train_test_split  # here: importing scikit-learn takes ~1 s

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

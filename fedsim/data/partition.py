"""Splitting a training set across federated clients.

Each partitioner maps labels (or just a sample count) to one index array per client. They are
pure functions of their arguments and the seed, and every sample lands in exactly one client.

* ``iid``: a seeded permutation cut into near-equal parts;
* ``dirichlet``: per class, client shares drawn from ``Dir(alpha)`` (Hsu et al., 2019), with
  the NIID-Bench balancing rule (a client already holding ``N / K`` samples gets no more) and
  redraws until every client has ``min_size`` samples; small ``alpha`` = strong label skew;
* ``shards``: every client holds exactly ``k`` classes (classes dealt round-robin after a seeded
  shuffle, each class's samples split between its holders);
* ``quantity_skew``: iid labels, client sizes from ``Dir(alpha)`` (at least ``min_size`` each).

:func:`lazy_partition` gives the same partitions as a :class:`LazyPartition` (one grouped index array
plus offsets) for populations of up to millions of clients: a client's indices are read when it is
sampled, in O(its size).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim.errors import FedsimError

Partition = list[np.ndarray]

__all__ = [
    "held_out_count",
    "LAZY_PARTITIONERS",
    "PARTITIONERS",
    "LazyPartition",
    "Partition",
    "lazy_partition",
    "partition",
    "iid",
    "dirichlet",
    "shards",
    "quantity_skew",
    "label_counts",
    "label_skew",
    "split_holdout",
    "partition_labels",
]


def partition_labels(targets: torch.Tensor) -> np.ndarray:
    """What label-based partitioners split on: integer class targets as they are; zeros for targets
    that are not one class per sample (regression, multi-target), where only ``iid`` and
    ``quantity_skew`` are meaningful."""
    if targets.ndim == 1 and not targets.is_floating_point():
        return targets.numpy()
    return np.zeros(len(targets), dtype=np.int64)


def _rng(seed: int, *keys: int | str) -> np.random.Generator:
    # SeedSequence mixes the keys so (seed, "dirichlet") and (seed, "iid") are unrelated streams.
    return np.random.default_rng(np.random.SeedSequence([seed, *[_key(k) for k in keys]]))


def _key(k: int | str) -> int:
    return k if isinstance(k, int) else int.from_bytes(k.encode()[:8].ljust(8, b"\0"), "little")


def _check(num_clients: int, n: int, min_size: int = 1) -> None:
    if num_clients < 1:
        raise FedsimError(f"federated.num_clients must be >= 1, got {num_clients}")
    if n < num_clients * min_size:
        raise FedsimError(f"cannot give {num_clients} clients {min_size} sample(s) each from {n} samples")


def iid(labels: np.ndarray, num_clients: int, seed: int, **_: Any) -> Partition:
    """A seeded permutation cut into ``num_clients`` parts whose sizes differ by at most one."""
    n = len(labels)
    _check(num_clients, n)
    order = _rng(seed, "iid").permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]


def dirichlet(
    labels: np.ndarray, num_clients: int, seed: int, alpha: float = 1.0, min_size: int = 10, max_tries: int = 1000,
    **_: Any,
) -> Partition:
    """Label skew: the share of class ``c`` each client gets is drawn from ``Dir(alpha * 1)``.

    Parameters
    ----------
    alpha: concentration; 100 is close to iid, 0.1 leaves most clients with one or two classes.
    min_size: redraw (with the next draws of the same seeded stream) until every client has at
        least this many samples (capped at ``N // (2K)`` for small data sets).
    """
    if alpha <= 0:
        raise FedsimError(f"federated.alpha must be > 0 for the dirichlet partition, got {alpha}")
    labels = np.asarray(labels)
    n = len(labels)
    _check(num_clients, n)
    min_size = max(1, min(min_size, n // (2 * num_clients)))
    rng = _rng(seed, "dirichlet")
    classes = np.unique(labels)
    by_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = by_class[c]
            shares = rng.dirichlet(np.full(num_clients, alpha))
            # NIID-Bench balancing: clients already at the mean size take no more of any class.
            full = np.array([len(p) >= n / num_clients for p in parts])
            shares = np.where(full, 0.0, shares)
            shares = shares / shares.sum() if shares.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise FedsimError(f"dirichlet partition: no draw in {max_tries} gave every one of {num_clients} clients "
                      f"{min_size} samples (alpha={alpha}, {n} samples); raise alpha or lower num_clients")


def shards(labels: np.ndarray, num_clients: int, seed: int, shards_per_client: int = 2, **_: Any) -> Partition:
    """Pathological non-iid: client ``i`` holds exactly ``shards_per_client`` classes.

    Classes are shuffled, then dealt round-robin (client ``i`` gets classes ``i*k .. i*k+k-1``
    modulo ``C``), so each class has ``K*k/C`` holders (within one) that split its samples.
    """
    labels = np.asarray(labels)
    n = len(labels)
    _check(num_clients, n)
    classes = np.unique(labels)
    k = shards_per_client
    if not 1 <= k <= len(classes):
        raise FedsimError(f"federated.shards_per_client must be in 1..{len(classes)} (classes), got {k}")
    rng = _rng(seed, "shards")
    order = classes[rng.permutation(len(classes))]
    holders: dict[Any, list[int]] = {c: [] for c in classes}
    for client in range(num_clients):
        for j in range(k):
            holders[order[(client * k + j) % len(classes)]].append(client)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        owners = holders[c]
        if not owners:  # fewer class slots than classes: the class goes to the smallest clients
            owners = [int(np.argmin([len(p) for p in parts]))]
        for owner, chunk in zip(owners, np.array_split(idx, len(owners)), strict=True):
            parts[owner].extend(chunk.tolist())
    if min(len(p) for p in parts) == 0:
        raise FedsimError(f"shards partition left a client empty ({num_clients} clients, {n} samples)")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def quantity_skew(
    labels: np.ndarray, num_clients: int, seed: int, alpha: float = 1.0, min_size: int = 10, **_: Any
) -> Partition:
    """Iid labels, skewed sizes: ``min_size`` each, the rest shared by ``Dir(alpha)`` proportions.

    Cut points into one seeded permutation already scale to any population: the eager form is the
    lazy one listed (:func:`lazy_partition`)."""
    return _lazy_quantity_skew(labels, num_clients, seed, alpha=alpha, min_size=min_size).to_list()


PARTITIONERS: dict[str, Callable[..., Partition]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "shards": shards,
    "quantity_skew": quantity_skew,
}


def partition(
    labels: Sequence[int] | np.ndarray, num_clients: int, method: str = "iid", *, seed: int = 0, alpha: float = 1.0,
    shards_per_client: int = 2, min_size: int = 10,
) -> Partition:
    """Indices of each client's samples (sorted, disjoint, covering ``range(len(labels))``).

    Parameters
    ----------
    labels: integer class of every training sample (only its length matters for iid and
        quantity skew).
    method: a key of :data:`PARTITIONERS`.
    seed: the same seed gives the same partition on every machine.
    """
    if method not in PARTITIONERS:
        raise FedsimError(f"unknown partition '{method}'; known: {', '.join(PARTITIONERS)}")
    return PARTITIONERS[method](np.asarray(labels), num_clients, seed, alpha=alpha,
                                shards_per_client=shards_per_client, min_size=min_size)


# --- lazy partitions -------------------------------------------------------------------------------
# The same partitions as above in a compact form for very large populations (10^6 clients): one
# ``order`` array of sample ids grouped by client plus ``num_clients + 1`` offsets, built with numpy
# only (no Python object per client). A client's indices are read when it is sampled, in O(its size).


@dataclass(frozen=True, eq=False)
class LazyPartition:
    """Every client's sample indices, resolved on demand from one grouped array.

    Client ``k`` owns ``order[offsets[k]:offsets[k + 1]]``; when ``grouped_sorted`` is false the
    group is sorted when it is read (iid and quantity skew keep the seeded permutation as it is).
    ``indices(k)`` is exactly what the eager partitioner of the same arguments returns for ``k``.
    """

    num_clients: int
    order: np.ndarray
    """int64 sample ids, grouped by client."""
    offsets: np.ndarray
    """int64, ``num_clients + 1`` entries, from 0 to ``len(order)``."""
    grouped_sorted: bool = True
    """Whether each client's group in ``order`` is already in increasing order."""

    def __post_init__(self) -> None:
        for name in ("order", "offsets"):
            array = np.ascontiguousarray(getattr(self, name), dtype=np.int64)
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        if len(self.offsets) != self.num_clients + 1:
            raise FedsimError(f"LazyPartition: {len(self.offsets)} offsets for {self.num_clients} clients")

    def __len__(self) -> int:
        return self.num_clients

    def indices(self, k: int) -> np.ndarray:
        """Client ``k``'s sample indices: a new sorted int64 array, in O(its size)."""
        k = operator.index(k)
        if not 0 <= k < self.num_clients:
            raise IndexError(f"client {k} out of range for a partition of {self.num_clients} clients")
        part = self.order[self.offsets[k]:self.offsets[k + 1]]
        return part.copy() if self.grouped_sorted else np.sort(part)

    def sizes(self) -> np.ndarray:
        """Every client's number of samples, one int64 array."""
        return np.diff(self.offsets)

    def to_list(self) -> Partition:
        """The eager form: one sorted index array per client (O(population) Python objects)."""
        return [self.indices(k) for k in range(self.num_clients)]


def _offsets(sizes: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return offsets


def _grouped(owner: np.ndarray, num_clients: int) -> LazyPartition:
    """CSR form of a client-per-sample array: sample ids grouped by client, increasing in each group."""
    order = np.argsort(owner, kind="stable")
    return LazyPartition(num_clients, order, _offsets(np.bincount(owner, minlength=num_clients)))


def _classes(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The distinct labels and, for each, its sample ids in increasing order (``flatnonzero(labels == c)``)."""
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    by_label = np.argsort(inverse.reshape(-1), kind="stable")
    return classes, np.split(by_label, np.cumsum(counts)[:-1])


def _lazy_iid(labels: np.ndarray, num_clients: int, seed: int, **_: Any) -> LazyPartition:
    n = len(labels)
    _check(num_clients, n)
    order = _rng(seed, "iid").permutation(n)
    each, extra = divmod(n, num_clients)  # np.array_split: the first ``extra`` parts get one more
    sizes = np.full(num_clients, each, dtype=np.int64)
    sizes[:extra] += 1
    return LazyPartition(num_clients, order, _offsets(sizes), grouped_sorted=False)


def _lazy_dirichlet(
    labels: np.ndarray, num_clients: int, seed: int, alpha: float = 1.0, min_size: int = 10, max_tries: int = 1000,
    **_: Any,
) -> LazyPartition:
    if alpha <= 0:
        raise FedsimError(f"federated.alpha must be > 0 for the dirichlet partition, got {alpha}")
    n = len(labels)
    _check(num_clients, n)
    min_size = max(1, min(min_size, n // (2 * num_clients)))
    rng = _rng(seed, "dirichlet")
    _, groups = _classes(labels)
    by_class = [rng.permutation(group) for group in groups]
    clients = np.arange(num_clients, dtype=np.int64)
    owner = np.empty(n, dtype=np.int64)
    for _ in range(max_tries):
        counts = np.zeros(num_clients, dtype=np.int64)
        for idx in by_class:
            shares = rng.dirichlet(np.full(num_clients, alpha))
            shares = np.where(counts >= n / num_clients, 0.0, shares)  # NIID-Bench balancing, as dirichlet()
            total = shares.sum()
            shares = shares / total if total > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
            chunk = np.diff(np.concatenate(([0], cuts, [len(idx)])))
            counts += chunk
            owner[idx] = np.repeat(clients, chunk)
        if counts.min() >= min_size:
            return _grouped(owner, num_clients)
    raise FedsimError(f"dirichlet partition: no draw in {max_tries} gave every one of {num_clients} clients "
                      f"{min_size} samples (alpha={alpha}, {n} samples); raise alpha or lower num_clients")


def _lazy_shards(labels: np.ndarray, num_clients: int, seed: int, shards_per_client: int = 2,
                 **_: Any) -> LazyPartition:
    n = len(labels)
    _check(num_clients, n)
    classes, groups = _classes(labels)
    num_classes, k = len(classes), shards_per_client
    if not 1 <= k <= num_classes:
        raise FedsimError(f"federated.shards_per_client must be in 1..{num_classes} (classes), got {k}")
    rng = _rng(seed, "shards")
    position = np.argsort(rng.permutation(num_classes))  # where each class sits in the shuffled deal
    slots = num_clients * k  # slot s goes to client s // k and holds the class at position s % C
    counts = np.zeros(num_clients, dtype=np.int64)
    owner = np.empty(n, dtype=np.int64)
    for c, group in enumerate(groups):
        idx = rng.permutation(group)
        p = int(position[c])
        holders = (p + num_classes * np.arange(max(0, -(-(slots - p) // num_classes)), dtype=np.int64)) // k
        if len(holders) == 0:  # fewer class slots than classes: the class goes to the smallest client
            holders = np.array([counts.argmin()], dtype=np.int64)
        each, extra = divmod(len(idx), len(holders))
        chunk = np.full(len(holders), each, dtype=np.int64)
        chunk[:extra] += 1
        counts[holders] += chunk
        owner[idx] = np.repeat(holders, chunk)
    if counts.min() == 0:
        raise FedsimError(f"shards partition left a client empty ({num_clients} clients, {n} samples)")
    return _grouped(owner, num_clients)


def _lazy_quantity_skew(
    labels: np.ndarray, num_clients: int, seed: int, alpha: float = 1.0, min_size: int = 10, **_: Any
) -> LazyPartition:
    if alpha <= 0:
        raise FedsimError(f"federated.alpha must be > 0 for the quantity_skew partition, got {alpha}")
    n = len(labels)
    _check(num_clients, n)
    min_size = max(1, min(min_size, n // (2 * num_clients)))
    rng = _rng(seed, "quantity_skew")
    shares = rng.dirichlet(np.full(num_clients, alpha))
    sizes = rng.multinomial(n - min_size * num_clients, shares) + min_size
    order = rng.permutation(n)
    return LazyPartition(num_clients, order, _offsets(sizes), grouped_sorted=False)


LAZY_PARTITIONERS: dict[str, Callable[..., LazyPartition]] = {
    "iid": _lazy_iid,
    "dirichlet": _lazy_dirichlet,
    "shards": _lazy_shards,
    "quantity_skew": _lazy_quantity_skew,
}


def lazy_partition(
    labels: Sequence[int] | np.ndarray, num_clients: int, method: str = "iid", *, seed: int = 0, alpha: float = 1.0,
    shards_per_client: int = 2, min_size: int = 10,
) -> LazyPartition:
    """:func:`partition` in the compact form: ``lazy_partition(...).indices(k) == partition(...)[k]``.

    Same arguments, same seeded draws and same errors; the build is numpy over samples and clients
    (dirichlet costs O(clients * classes) per draw, as the eager one) and a client's indices are read
    in O(its size), so populations of 10^6 clients fit.
    """
    if method not in LAZY_PARTITIONERS:
        raise FedsimError(f"unknown partition '{method}'; known: {', '.join(PARTITIONERS)}")
    return LAZY_PARTITIONERS[method](np.asarray(labels), num_clients, seed, alpha=alpha,
                                     shards_per_client=shards_per_client, min_size=min_size)


def label_counts(labels: Sequence[int] | np.ndarray, parts: Partition, num_classes: int | None = None) -> np.ndarray:
    """``[clients, classes]`` matrix of how many samples of each class each client holds."""
    labels = np.asarray(labels)
    num_classes = num_classes or int(labels.max()) + 1
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def label_skew(labels: Sequence[int] | np.ndarray, parts: Partition) -> float:
    """Mean total-variation distance between each client's label distribution and the global one.

    0 = every client sees the global mix; 1 = disjoint supports.
    """
    counts = label_counts(labels, parts).astype(float)
    global_dist = counts.sum(0) / counts.sum()
    client_dist = counts / np.maximum(counts.sum(1, keepdims=True), 1.0)
    return float(0.5 * np.abs(client_dist - global_dist).sum(1).mean())


def held_out_count(sizes: Any, fraction: float) -> Any:
    """How many of a client's ``sizes`` samples :func:`split_holdout` holds out: ``round(fraction * n)``, at
    least one when ``fraction > 0`` and at most ``n - 1``, none for clients of fewer than 2 samples. Works on
    one size or an array of them (validation sizes a whole population at once)."""
    n = np.asarray(sizes, dtype=np.int64)
    if fraction == 0.0:
        return np.zeros_like(n)
    return np.where(n < 2, 0, np.minimum(n - 1, np.maximum(1, np.rint(fraction * n).astype(np.int64))))


def split_holdout(indices: np.ndarray, fraction: float, seed: int, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's (train, held-out) indices: a seeded ``fraction`` of its samples kept for local testing.

    At least one sample is held out when ``fraction > 0`` and at least one is kept for training.
    """
    if not 0.0 <= fraction < 1.0:
        raise FedsimError(f"federated.client_test_fraction must be in [0, 1), got {fraction}")
    n = len(indices)
    n_out = int(held_out_count(n, fraction))
    order = _rng(seed, "holdout", partition_id).permutation(n)
    held = np.sort(indices[order[:n_out]])
    kept = np.sort(indices[order[n_out:]])
    return kept, held

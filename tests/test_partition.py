"""Partitions: every sample in exactly one client, deterministic, and skew that follows alpha."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data import load_dataset
from fedsim.data.partition import PARTITIONERS, label_counts, label_skew, partition, split_holdout
from fedsim.errors import FedsimError


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return load_dataset("digits").train.tensors[1].numpy()


@pytest.mark.parametrize("method", sorted(PARTITIONERS))
@pytest.mark.parametrize("num_clients", [1, 7, 20])
def test_every_sample_in_exactly_one_client(labels: np.ndarray, method: str, num_clients: int) -> None:
    parts = partition(labels, num_clients, method, seed=3, alpha=0.5, shards_per_client=2)
    assert len(parts) == num_clients
    joined = np.concatenate(parts)
    assert len(joined) == len(labels)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("method", sorted(PARTITIONERS))
def test_same_seed_same_partition_other_seed_other(labels: np.ndarray, method: str) -> None:
    a = partition(labels, 10, method, seed=1, alpha=0.5)
    b = partition(labels, 10, method, seed=1, alpha=0.5)
    c = partition(labels, 10, method, seed=2, alpha=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_skew_grows_as_alpha_falls(labels: np.ndarray) -> None:
    for seed in range(3):
        skews = [label_skew(labels, partition(labels, 20, "dirichlet", seed=seed, alpha=a))
                 for a in (100.0, 1.0, 0.1)]
        assert skews[0] < skews[1] < skews[2], skews
    iid_skew = label_skew(labels, partition(labels, 20, "iid", seed=0))
    strong = label_skew(labels, partition(labels, 20, "dirichlet", seed=0, alpha=0.1))
    assert strong > 0.6 > 0.2 > iid_skew  # measured: about 0.76 and 0.13


def test_shards_gives_exactly_k_classes(labels: np.ndarray) -> None:
    for k in (1, 2, 3):
        counts = label_counts(labels, partition(labels, 20, "shards", seed=0, shards_per_client=k))
        assert ((counts > 0).sum(axis=1) == k).all()


def test_quantity_skew_keeps_labels_but_skews_sizes(labels: np.ndarray) -> None:
    parts = partition(labels, 10, "quantity_skew", seed=0, alpha=0.5)
    sizes = sorted(len(p) for p in parts)
    assert sizes[0] >= 10 and sizes[-1] > 3 * sizes[0]
    even = [len(p) for p in partition(labels, 10, "iid", seed=0)]
    assert max(even) - min(even) <= 1


def test_holdout_split_is_disjoint_and_seeded() -> None:
    idx = np.arange(100, 150)
    kept, held = split_holdout(idx, 0.2, seed=0, partition_id=4)
    assert len(held) == 10 and len(kept) == 40
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])), idx)
    again = split_holdout(idx, 0.2, seed=0, partition_id=4)[1]
    np.testing.assert_array_equal(held, again)


def test_bad_arguments_are_clear(labels: np.ndarray) -> None:
    with pytest.raises(FedsimError, match="unknown partition 'pathological'"):
        partition(labels, 4, "pathological")
    with pytest.raises(FedsimError, match="shards_per_client"):
        partition(labels, 4, "shards", shards_per_client=11)
    with pytest.raises(FedsimError, match="alpha"):
        partition(labels, 4, "dirichlet", alpha=0.0)
    with pytest.raises(FedsimError, match="num_clients"):
        partition(labels, 0, "iid")

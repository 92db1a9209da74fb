"""Lazy partitions: the same indices as the eager partitioners, compact enough for 10^6 clients."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedsim.data import load_dataset
from fedsim.data.partition import (
    LAZY_PARTITIONERS,
    PARTITIONERS,
    LazyPartition,
    dirichlet,
    lazy_partition,
    partition,
)
from fedsim.data.partition import _lazy_dirichlet as lazy_dirichlet
from fedsim.errors import FedsimError


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return load_dataset("digits").train.tensors[1].numpy()  # 1,437 samples, 10 classes


def assert_same(eager: list[np.ndarray], lazy: LazyPartition) -> None:
    assert len(lazy) == lazy.num_clients == len(eager)
    for k, part in enumerate(eager):
        got = lazy.indices(k)
        assert got.dtype == part.dtype == np.int64
        np.testing.assert_array_equal(got, part, err_msg=f"client {k}")
    np.testing.assert_array_equal(lazy.sizes(), [len(p) for p in eager])


def assert_covers(lazy: LazyPartition, n: int) -> None:
    """Every sample in exactly one client, read through ``indices``."""
    joined = np.concatenate([lazy.indices(k) for k in range(len(lazy))])
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


def test_every_method_has_a_lazy_form() -> None:
    assert set(LAZY_PARTITIONERS) == set(PARTITIONERS)


@pytest.mark.parametrize("num_clients", [5, 10, 20, 100])
@pytest.mark.parametrize("method", sorted(PARTITIONERS))
def test_lazy_equals_eager(labels: np.ndarray, method: str, num_clients: int) -> None:
    variants: list[dict[str, float]] = [{}]
    if method in ("dirichlet", "quantity_skew"):
        # dirichlet over 100 clients never meets min_size at alpha 0.1 (see the give-up test below)
        alphas = (1.0, 10.0) if method == "dirichlet" and num_clients == 100 else (0.1, 1.0, 10.0)
        variants = [{"alpha": a} for a in alphas]
    elif method == "shards":
        variants = [{"shards_per_client": k} for k in (1, 2, 3)]
    for seed in range(3):
        for kwargs in variants:
            try:
                eager = partition(labels, num_clients, method, seed=seed, **kwargs)
            except FedsimError as error:  # dirichlet, 100 clients, alpha 0.1: no draw meets min_size
                assert _error(lazy_partition, labels, num_clients, method, seed=seed, **kwargs) == str(error)
                continue
            lazy = lazy_partition(labels, num_clients, method, seed=seed, **kwargs)
            assert_same(eager, lazy)
            assert_covers(lazy, len(labels))


@pytest.mark.parametrize("method", sorted(PARTITIONERS))
def test_lazy_equals_eager_on_other_labels(labels: np.ndarray, method: str) -> None:
    """Sparse label values, a single class (regression targets), one client, min_size below the cap."""
    cases = [(labels * 7 + 3, 13, {}), (np.zeros(300, dtype=np.int64), 9, {"shards_per_client": 1}),
             (labels, 1, {"shards_per_client": 1}), (labels, 30, {"min_size": 3, "alpha": 0.3})]
    for values, num_clients, kwargs in cases:
        assert_same(partition(values, num_clients, method, seed=5, **kwargs),
                    lazy_partition(values, num_clients, method, seed=5, **kwargs))


def test_dirichlet_redraws_follow_the_same_stream(labels: np.ndarray) -> None:
    """Draws that leave a client under min_size are redrawn from the same seeded stream: 2 tries for
    10 clients at alpha 0.1 (seed 0), 73 for 100 clients at alpha 0.5 (seed 1)."""
    for num_clients, alpha, seed in ((10, 0.1, 0), (20, 0.1, 1), (100, 0.5, 1)):
        with pytest.raises(FedsimError, match="no draw in 1 "):
            lazy_dirichlet(labels, num_clients, seed, alpha=alpha, max_tries=1)
        assert_same(partition(labels, num_clients, "dirichlet", seed=seed, alpha=alpha),
                    lazy_partition(labels, num_clients, "dirichlet", seed=seed, alpha=alpha))


def test_shards_with_fewer_slots_than_classes(labels: np.ndarray) -> None:
    """Two clients, one class each: the eight unheld classes go to the smallest client, as eagerly."""
    for seed in range(4):
        assert_same(partition(labels, 2, "shards", seed=seed, shards_per_client=1),
                    lazy_partition(labels, 2, "shards", seed=seed, shards_per_client=1))
    assert_same(partition(labels, 3, "shards", seed=0, shards_per_client=3),
                lazy_partition(labels, 3, "shards", seed=0, shards_per_client=3))


def _error(make, *args, **kwargs) -> str:  # noqa: ANN001
    with pytest.raises(FedsimError) as info:
        make(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize(("num_clients", "method", "kwargs"), [
    (4, "pathological", {}),
    (0, "iid", {}),
    (2000, "iid", {}),
    (2000, "quantity_skew", {}),
    (0, "dirichlet", {}),
    (4, "dirichlet", {"alpha": 0.0}),
    (4, "quantity_skew", {"alpha": -1.0}),
    (4, "shards", {"shards_per_client": 11}),
    (4, "shards", {"shards_per_client": 0}),
    (1437, "shards", {"shards_per_client": 1}),  # some class has fewer samples than holders
])
def test_errors_are_the_eager_ones(labels: np.ndarray, num_clients: int, method: str, kwargs: dict) -> None:
    eager = _error(partition, labels, num_clients, method, **kwargs)
    assert _error(lazy_partition, labels, num_clients, method, **kwargs) == eager


def test_dirichlet_gives_up_with_the_eager_message(labels: np.ndarray) -> None:
    args = (labels, 600, 0)
    eager = _error(dirichlet, *args, alpha=0.05, max_tries=3)
    assert "no draw in 3" in eager
    assert _error(lazy_dirichlet, *args, alpha=0.05, max_tries=3) == eager


def test_lazy_partition_is_read_only_and_hands_out_copies(labels: np.ndarray) -> None:
    lazy = lazy_partition(labels, 10, "dirichlet", seed=0, alpha=0.5)
    first = lazy.indices(3)
    first[:] = -1
    assert (lazy.indices(3) >= 0).all()
    with pytest.raises(ValueError):
        lazy.order[0] = 1
    with pytest.raises(IndexError):
        lazy.indices(10)
    with pytest.raises(IndexError):
        lazy.indices(-1)
    eager = lazy.to_list()
    assert_same(eager, lazy)
    assert lazy.sizes().dtype == np.int64 and lazy.sizes().sum() == len(labels)


def test_a_million_iid_clients() -> None:
    n, num_clients = 2_000_000, 10**6
    start = time.perf_counter()
    lazy = lazy_partition(np.zeros(n, dtype=np.int64), num_clients, "iid", seed=1)
    built = time.perf_counter() - start
    assert len(lazy) == num_clients and built < 5.0  # measured ~0.1-0.2 s
    sizes = lazy.sizes()
    assert sizes.dtype == np.int64 and sizes.min() == sizes.max() == 2
    np.testing.assert_array_equal(np.sort(lazy.order), np.arange(n))  # every sample exactly once
    picked = np.random.default_rng(0).choice(num_clients, 100, replace=False)
    start = time.perf_counter()
    parts = [lazy.indices(int(k)) for k in picked]
    assert time.perf_counter() - start < 0.5  # measured ~1 ms: O(client size), not O(population)
    for k, part in zip(picked, parts, strict=True):
        assert len(part) == sizes[k] and (np.diff(part) > 0).all()
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)  # the sampled clients are disjoint


def test_many_clients_cover_every_sample_once() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 10, 1_000_000)
    num_clients = 10**5
    for method, kwargs in (("iid", {}), ("dirichlet", {"alpha": 100.0}), ("quantity_skew", {"alpha": 1.0}),
                           ("shards", {"shards_per_client": 2})):
        lazy = lazy_partition(values, num_clients, method, seed=2, **kwargs)
        sizes = lazy.sizes()
        assert len(sizes) == num_clients and sizes.min() >= 1 and sizes.sum() == len(values)
        np.testing.assert_array_equal(np.sort(lazy.order), np.arange(len(values)))
        for k in rng.choice(num_clients, 50, replace=False):
            part = lazy.indices(int(k))
            assert len(part) == sizes[k] and (np.diff(part) > 0).all()
            if method == "shards":
                assert len(np.unique(values[part])) == 2

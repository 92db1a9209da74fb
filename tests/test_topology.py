"""Gossip topologies: mixing matrices are symmetric and doubly stochastic; bad graphs fail clearly."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.engines.gossip.topology import (
    adjacency,
    mixing_matrix,
    neighbours,
    spectral_gap,
    topology_matrix,
    torus_shape,
)
from fedsim.errors import FedsimError

CASES = [("ring", n, 3) for n in (2, 3, 5, 8)] + [("torus", n, 3) for n in (4, 6, 9, 12)] + [
    ("complete", n, 3) for n in (2, 5, 8)] + [("exponential", n, 3) for n in (3, 8, 11)] + [
    ("random_regular", 8, 3), ("random_regular", 10, 4), ("random_regular", 6, 2)]


@pytest.mark.parametrize("weights", ["metropolis", "uniform"])
@pytest.mark.parametrize(("topology", "nodes", "degree"), CASES)
def test_mixing_matrix_is_doubly_stochastic(topology: str, nodes: int, degree: int, weights: str) -> None:
    try:
        mixing = topology_matrix(topology, nodes, degree=degree, seed=0, weights=weights)
    except FedsimError as exc:  # a 2-regular draw may be two cycles: that must be the clear error
        assert topology == "random_regular" and "disconnected" in str(exc)
        return
    assert mixing.shape == (nodes, nodes)
    np.testing.assert_allclose(mixing.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(mixing.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(mixing, mixing.T)
    assert (mixing >= 0).all()
    adj = adjacency(topology, nodes, degree=degree, seed=0)
    assert ((mixing > 0) == (adj | np.eye(nodes, dtype=bool))).all()  # weight only on edges and self
    assert spectral_gap(mixing) > 0  # connected: gossip reaches consensus


def test_hand_computed_weights() -> None:
    ring = mixing_matrix(adjacency("ring", 5))
    assert np.allclose(ring[0], [1 / 3, 1 / 3, 0, 0, 1 / 3])
    complete = mixing_matrix(adjacency("complete", 4))
    assert np.allclose(complete, 0.25)
    # a path 0-1-2 is not regular: Metropolis gives the end nodes 1/3 to the centre and keeps 2/3
    path = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=bool)
    assert np.allclose(mixing_matrix(path), [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    assert np.allclose(mixing_matrix(path, "uniform"), [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    assert neighbours(mixing_matrix(adjacency("exponential", 8)), 0) == [1, 2, 4, 6, 7]
    assert torus_shape(12) == (3, 4)
    torus = adjacency("torus", 9)
    assert (torus.sum(axis=1) == 4).all()
    regular = adjacency("random_regular(4)", 10, seed=3)
    assert (regular.sum(axis=1) == 4).all()


def test_torus_on_prime_node_count_is_a_clear_error() -> None:
    with pytest.raises(FedsimError, match=r"torus.*7 is prime.*6 or 8"):
        adjacency("torus", 7)


def test_disconnected_random_graph_is_a_clear_error() -> None:
    # degree 1 = a perfect matching: 3 separate pairs on 6 nodes, never connected
    with pytest.raises(FedsimError, match=r"disconnected graph \(3 components\).*decentralized.degree"):
        adjacency("random_regular", 6, degree=1)
    with pytest.raises(FedsimError, match="even"):
        adjacency("random_regular", 5, degree=3)
    with pytest.raises(FedsimError, match="unknown topology 'star'"):
        adjacency("star", 4)

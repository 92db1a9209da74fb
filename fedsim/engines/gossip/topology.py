"""Communication graphs and gossip mixing matrices for decentralized (serverless) training.

Pure functions over numpy arrays: :func:`adjacency` builds the undirected graph of a named
topology, :func:`mixing_matrix` turns it into a symmetric, doubly stochastic matrix ``W`` with
``W[i, j] > 0`` only for ``i == j`` or neighbours ``i ~ j`` (as in D-PSGD, Lian et al. 2017).
A node's gossip step is ``x_i <- sum_j W[i, j] x_j``; because every row and every column of
``W`` sums to one, the average model is unchanged by gossip and all nodes converge to it.

Examples
--------
>>> W = mixing_matrix(adjacency("ring", 4))
>>> W[0].tolist()
[0.3333333333333333, 0.3333333333333333, 0.0, 0.3333333333333333]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from fedsim.errors import FedsimError

__all__ = [
    "TOPOLOGIES", "WEIGHTINGS", "adjacency", "mixing_matrix", "neighbours", "is_connected",
    "torus_shape", "spectral_gap", "topology_matrix",
]


def _ring(n: int, degree: int, seed: int) -> np.ndarray:
    adj = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in ((i - 1) % n, (i + 1) % n):
            if j != i:
                adj[i, j] = adj[j, i] = True
    return adj


def torus_shape(n: int) -> tuple[int, int]:
    """Rows x columns of the squarest 2-D torus with ``n`` nodes (both sides >= 2).

    Raises
    ------
    FedsimError
        When ``n`` is prime (or below 4): no grid with two sides of at least 2 exists.
    """
    for rows in range(math.isqrt(n), 1, -1):
        if n % rows == 0:
            return rows, n // rows
    hint = f"{n} is prime" if n >= 2 else f"{n} is too small"
    raise FedsimError(
        f"topology 'torus' needs a node count that factors as rows x columns with both >= 2, but {hint}; "
        f"use e.g. {_composite_near(n)} nodes or another topology (ring, exponential, complete)")


def _composite_near(n: int) -> str:
    below = next((m for m in range(n - 1, 3, -1) if any(m % r == 0 for r in range(2, math.isqrt(m) + 1))), None)
    above = next(m for m in range(max(n + 1, 4), 4 * n + 8) if any(m % r == 0 for r in range(2, math.isqrt(m) + 1)))
    return f"{below} or {above}" if below else str(above)


def _torus(n: int, degree: int, seed: int) -> np.ndarray:
    rows, cols = torus_shape(n)
    adj = np.zeros((n, n), dtype=bool)
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            # Four neighbours with wrap-around; on a side of length 2 "left" and "right" coincide.
            for rr, cc in (((r + 1) % rows, c), ((r - 1) % rows, c), (r, (c + 1) % cols), (r, (c - 1) % cols)):
                j = rr * cols + cc
                if j != i:
                    adj[i, j] = adj[j, i] = True
    return adj


def _complete(n: int, degree: int, seed: int) -> np.ndarray:
    return ~np.eye(n, dtype=bool)


def _exponential(n: int, degree: int, seed: int) -> np.ndarray:
    """Node i talks to i +- 2^k (k = 0, 1, ...): O(log n) neighbours, O(log n) diameter.

    The undirected form (Assran et al.'s SGP uses the directed one) keeps ``W`` symmetric.
    """
    adj = np.zeros((n, n), dtype=bool)
    hop = 1
    while hop < n:
        for i in range(n):
            for j in ((i + hop) % n, (i - hop) % n):
                if j != i:
                    adj[i, j] = adj[j, i] = True
        hop *= 2
    return adj


def _random_regular(n: int, degree: int, seed: int) -> np.ndarray:
    """A uniformly drawn simple d-regular graph (pairing model with rejection), seeded.

    Raises
    ------
    FedsimError
        Impossible (d >= n, n*d odd) or disconnected draws; the caller's seed picks the graph,
        so a disconnected one is reported rather than silently redrawn.
    """
    if degree < 1 or degree >= n:
        raise FedsimError(f"topology 'random_regular' needs 1 <= degree < nodes, got degree={degree}, nodes={n}")
    if (n * degree) % 2:
        raise FedsimError(f"topology 'random_regular' needs nodes x degree even, got {n} x {degree}")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        stubs = np.repeat(np.arange(n), degree)
        rng.shuffle(stubs)
        pairs = stubs.reshape(-1, 2)
        if np.any(pairs[:, 0] == pairs[:, 1]):
            continue  # self-loop: reject the whole draw (keeps the distribution uniform)
        adj = np.zeros((n, n), dtype=bool)
        duplicate = False
        for a, b in pairs:
            if adj[a, b]:
                duplicate = True
                break
            adj[a, b] = adj[b, a] = True
        if not duplicate:
            break
    else:  # pragma: no cover - only for near-complete degrees with unlucky seeds
        raise FedsimError(f"could not draw a simple {degree}-regular graph on {n} nodes; try another degree")
    if not is_connected(adj):
        parts = len(_components(adj))
        raise FedsimError(
            f"topology 'random_regular' with degree={degree} on {n} nodes (seed {seed}) drew a disconnected graph "
            f"({parts} components): gossip could never reach consensus; raise 'decentralized.degree' "
            f"(>= 3 is connected with high probability) or change the seed")
    return adj


TOPOLOGIES: dict[str, Callable[[int, int, int], np.ndarray]] = {
    "ring": _ring,
    "torus": _torus,
    "random_regular": _random_regular,
    "complete": _complete,
    "exponential": _exponential,
}


def _components(adj: np.ndarray) -> list[list[int]]:
    n = len(adj)
    seen = np.zeros(n, dtype=bool)
    parts = []
    for start in range(n):
        if seen[start]:
            continue
        stack, part = [start], []
        seen[start] = True
        while stack:
            i = stack.pop()
            part.append(i)
            for j in np.flatnonzero(adj[i]):
                if not seen[j]:
                    seen[j] = True
                    stack.append(int(j))
        parts.append(sorted(part))
    return parts


def is_connected(adj: np.ndarray) -> bool:
    """Whether the undirected graph ``adj`` has a single component."""
    return len(_components(np.asarray(adj, dtype=bool))) == 1


def adjacency(topology: str, nodes: int, *, degree: int = 3, seed: int = 0) -> np.ndarray:
    """Symmetric boolean adjacency (no self-loops) of a named topology.

    Parameters
    ----------
    topology: ``ring | torus | random_regular | complete | exponential``; ``random_regular(d)``
        is also accepted and overrides ``degree``.
    nodes: number of nodes n (>= 1).
    degree: d for ``random_regular``.
    seed: draw of ``random_regular``.

    Raises
    ------
    FedsimError
        Unknown names, torus on a prime node count, disconnected random graphs.
    """
    name, degree = _parse(topology, degree)
    if name not in TOPOLOGIES:
        raise FedsimError(f"unknown topology '{topology}'; known: {', '.join(TOPOLOGIES)}")
    if nodes < 1:
        raise FedsimError(f"topology '{name}' needs at least 1 node, got {nodes}")
    if nodes == 1:
        return np.zeros((1, 1), dtype=bool)
    adj = TOPOLOGIES[name](nodes, degree, seed)
    if not is_connected(adj):  # pragma: no cover - the deterministic topologies are connected by construction
        raise FedsimError(f"topology '{name}' on {nodes} nodes is disconnected")
    return adj


def _parse(topology: str, degree: int) -> tuple[str, int]:
    """``random_regular(4)`` -> ("random_regular", 4)."""
    text = topology.strip()
    if text.endswith(")") and "(" in text:
        name, _, arg = text[:-1].partition("(")
        try:
            return name.strip(), int(arg)
        except ValueError as exc:
            raise FedsimError(f"topology '{topology}': the argument must be an integer degree") from exc
    return text, degree


def _metropolis(adj: np.ndarray) -> np.ndarray:
    """Metropolis-Hastings: W_ij = 1 / (1 + max(d_i, d_j)) on edges (local degrees suffice)."""
    deg = adj.sum(axis=1)
    weights = np.where(adj, 1.0 / (1.0 + np.maximum.outer(deg, deg)), 0.0)
    return weights


def _uniform(adj: np.ndarray) -> np.ndarray:
    """Uniform (max-degree) weights: W_ij = 1 / (1 + d_max) on edges; 1 / (d + 1) on regular graphs."""
    return np.where(adj, 1.0 / (1.0 + adj.sum(axis=1).max()), 0.0)


WEIGHTINGS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"metropolis": _metropolis, "uniform": _uniform}


def mixing_matrix(adj: np.ndarray, weights: str = "metropolis") -> np.ndarray:
    """Symmetric doubly stochastic gossip matrix of an undirected graph (float64, n x n).

    Off-diagonal weights come from ``weights`` (``metropolis`` or ``uniform``); each diagonal entry
    takes what is left of its row. Both rules give symmetric ``W`` with non-negative diagonal, so
    rows and columns sum to one.
    """
    if weights not in WEIGHTINGS:
        raise FedsimError(f"unknown mixing weights '{weights}'; known: {', '.join(WEIGHTINGS)}")
    adj = np.asarray(adj, dtype=bool)
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1] or not np.array_equal(adj, adj.T) or adj.diagonal().any():
        raise FedsimError("mixing_matrix needs a square symmetric adjacency without self-loops")
    mixing = WEIGHTINGS[weights](adj)
    np.fill_diagonal(mixing, 1.0 - mixing.sum(axis=1))
    return mixing


def topology_matrix(topology: str, nodes: int, *, degree: int = 3, seed: int = 0,
                    weights: str = "metropolis") -> np.ndarray:
    """``mixing_matrix(adjacency(...))`` in one call."""
    return mixing_matrix(adjacency(topology, nodes, degree=degree, seed=seed), weights)


def neighbours(mixing: np.ndarray, node: int) -> list[int]:
    """Nodes j != node with a non-zero weight in row ``node`` (who ``node`` exchanges with)."""
    return [int(j) for j in np.flatnonzero(mixing[node]) if j != node]


def spectral_gap(mixing: np.ndarray) -> float:
    """1 - |second largest eigenvalue| of W: larger = faster consensus (complete graph: 1)."""
    eigenvalues = np.sort(np.abs(np.linalg.eigvalsh(mixing)))[::-1]
    return float(1.0 - eigenvalues[1]) if len(eigenvalues) > 1 else 1.0

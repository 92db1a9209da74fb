"""N-way K-shot episodes over novel classes, and accuracy as mean ± 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedsim.errors import FedsimError

__all__ = ["Episodes", "sample_episodes", "accuracy_ci"]


@dataclass
class Episodes:
    """E episodes stacked for batched evaluation.

    Attributes
    ----------
    support: ``[E, N*K, D]`` (class-major: K features of episode class 0, then class 1, ...).
    support_labels: ``[E, N*K]`` episode labels in ``[0, N)``.
    query: ``[E, N*Q, D]``; query_labels ``[E, N*Q]``.
    classes: ``[E, N]`` the original class of each episode label.
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    classes: np.ndarray

    def __len__(self) -> int:
        return self.support.shape[0]

    def to(self, device: torch.device | str) -> Episodes:
        return Episodes(self.support.to(device), self.support_labels.to(device), self.query.to(device),
                        self.query_labels.to(device), self.classes)


def sample_episodes(
    features: Mapping[int, np.ndarray | torch.Tensor],
    n_way: int = 5,
    k_shot: int = 1,
    n_query: int = 15,
    n_episodes: int = 100,
    seed: int = 0,
) -> Episodes:
    """Draw episodes from ``features`` (class -> ``[n_c, D]``): N classes, then K + Q distinct samples each.

    Deterministic in ``seed``: the same seed gives the same episodes for every method compared,
    so differences between methods are paired.
    """
    classes = sorted(features)
    if n_way > len(classes):
        raise FedsimError(f"n_way = {n_way} but only {len(classes)} novel classes are available")
    need = k_shot + n_query
    small = [c for c in classes if len(features[c]) < need]
    if small:
        raise FedsimError(f"novel class {small[0]} has {len(features[small[0]])} features; "
                          f"{k_shot}-shot with {n_query} queries needs {need}")
    arrays = {c: np.asarray(features[c], dtype=np.float32) for c in classes}
    rng = np.random.default_rng(seed)
    dim = arrays[classes[0]].shape[1]
    support = np.empty((n_episodes, n_way * k_shot, dim), dtype=np.float32)
    query = np.empty((n_episodes, n_way * n_query, dim), dtype=np.float32)
    chosen = np.empty((n_episodes, n_way), dtype=np.int64)
    for e in range(n_episodes):
        picked = rng.choice(len(classes), size=n_way, replace=False)
        for label, ci in enumerate(picked):
            cls = classes[ci]
            rows = rng.choice(len(arrays[cls]), size=need, replace=False)
            support[e, label * k_shot:(label + 1) * k_shot] = arrays[cls][rows[:k_shot]]
            query[e, label * n_query:(label + 1) * n_query] = arrays[cls][rows[k_shot:]]
            chosen[e, label] = cls
    support_labels = torch.arange(n_way).repeat_interleave(k_shot).expand(n_episodes, -1).clone()
    query_labels = torch.arange(n_way).repeat_interleave(n_query).expand(n_episodes, -1).clone()
    return Episodes(torch.from_numpy(support), support_labels, torch.from_numpy(query), query_labels, chosen)


def accuracy_ci(accuracies: np.ndarray | list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval (``1.96 * std / sqrt(E)``), as in the
    few-shot literature (population std, as ``np.std``)."""
    acc = np.asarray(accuracies, dtype=np.float64)
    if acc.size == 0:
        raise FedsimError("no episode accuracies to summarise")
    return float(acc.mean()), float(1.96 * acc.std() / math.sqrt(acc.size))

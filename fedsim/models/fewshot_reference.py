"""Distribution calibration one episode at a time with NumPy and scikit-learn.

A straightforward transcription of the method as the paper's reference code runs it (one
``np.random.multivariate_normal`` per support feature, one ``LogisticRegression`` fit per
episode). It is the yardstick for :mod:`fedsim.models.fewshot`: ``benchmarks/fewshot.py`` times
both on the same features and episodes and checks that their accuracies agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from sklearn.linear_model import LogisticRegression

from fedsim.errors import FedsimError
from fedsim.models.fewshot import DCConfig

__all__ = ["tukey_np", "base_statistics_np", "distribution_calibration_np", "run_episode_np",
           "evaluate_episodes_np"]


def tukey_np(x: np.ndarray, lam: float = 0.5) -> np.ndarray:
    """``x ** lam`` (``log x`` when ``lam == 0``)."""
    if (x < 0).any():
        raise FedsimError("Tukey's ladder of powers needs non-negative features")
    return np.log(x) if lam == 0 else np.power(x, lam)


def base_statistics_np(features: Mapping[int, np.ndarray], lam: float | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means ``[B, D]`` and ``np.cov`` covariances ``[B, D, D]`` (classes in sorted order)."""
    means, covs = [], []
    for cls in sorted(features):
        x = np.asarray(features[cls], dtype=np.float64)
        if lam is not None:
            x = tukey_np(x, lam)
        means.append(x.mean(axis=0))
        covs.append(np.cov(x.T))
    return np.stack(means), np.stack(covs)


def distribution_calibration_np(
    x: np.ndarray, base_means: np.ndarray, base_covs: np.ndarray, k: int = 2, alpha: float = 0.21,
    alpha_mode: str = "all",
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated mean and covariance of one support feature ``x [D]``."""
    dist = np.linalg.norm(base_means - x, axis=1)
    index = np.argpartition(dist, k)[:k] if k < len(dist) else np.arange(len(dist))
    mean = (base_means[index].sum(axis=0) + x) / (k + 1)
    cov = base_covs[index].mean(axis=0)
    cov = cov + alpha if alpha_mode == "all" else cov + alpha * np.eye(len(x))
    return mean, cov


def run_episode_np(
    support: np.ndarray, support_labels: np.ndarray, query: np.ndarray, query_labels: np.ndarray,
    base_means: np.ndarray | None, base_covs: np.ndarray | None, config: DCConfig, rng: np.random.Generator,
) -> float:
    """Query accuracy of one episode."""
    support = support.astype(np.float64)
    query = query.astype(np.float64)
    if config.tukey:
        support, query = tukey_np(support, config.lam), tukey_np(query, config.lam)
    k_shot = len(support_labels) // (int(support_labels.max()) + 1)
    n_per = math.floor(config.samples / k_shot)
    x, y = support, support_labels
    if config.generate and n_per > 0:
        if base_means is None or base_covs is None:
            raise FedsimError("distribution calibration needs base-class statistics")
        drawn, drawn_labels = [], []
        for feature, label in zip(support, support_labels, strict=True):
            mean, cov = distribution_calibration_np(feature, base_means, base_covs, config.k, config.alpha,
                                                    config.alpha_mode)
            drawn.append(rng.multivariate_normal(mean, cov, size=n_per, check_valid="ignore"))
            drawn_labels.extend([label] * n_per)
        x = np.concatenate([support, *drawn])
        y = np.concatenate([support_labels, drawn_labels])
    classifier = LogisticRegression(C=config.C, max_iter=1000).fit(x, y)
    return float(np.mean(classifier.predict(query) == query_labels))


def evaluate_episodes_np(
    support: np.ndarray, support_labels: np.ndarray, query: np.ndarray, query_labels: np.ndarray,
    base_features: Mapping[int, np.ndarray] | None, config: DCConfig | None = None,
    base_stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Accuracy of each episode, one after the other (arrays shaped as in :class:`fedsim.data.episodes.Episodes`).

    ``base_stats`` (means, covariances) skips computing them from ``base_features``.
    """
    config = config or DCConfig()
    means = covs = None
    if base_stats is not None:
        means, covs = base_stats
    elif config.generate:
        if base_features is None:
            raise FedsimError("distribution calibration needs base-class features")
        means, covs = base_statistics_np(base_features, config.lam if (config.tukey and config.tukey_base) else None)
    rng = np.random.default_rng(config.seed)
    return np.array([
        run_episode_np(np.asarray(support[e]), np.asarray(support_labels[e]), np.asarray(query[e]),
                       np.asarray(query_labels[e]), means, covs, config, rng)
        for e in range(len(support))
    ])

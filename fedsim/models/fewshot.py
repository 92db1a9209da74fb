"""Few-shot classification by distribution calibration, batched over episodes in torch.

"Free Lunch for Few-shot Learning: Distribution Calibration" (Yang, Liu, Xu, ICLR 2021):

1. Tukey's ladder of powers makes skewed, non-negative features more Gaussian (``x ** lam``,
   ``log x`` for ``lam = 0``) on the support and query features;
2. every base class contributes its mean and full covariance;
3. each support feature borrows the statistics of its ``k`` nearest base classes (Euclidean
   distance to the base means): calibrated mean ``(sum of the k means + x) / (k + 1)``,
   calibrated covariance ``mean of the k covariances + alpha``;
4. ``floor(samples / K)`` features are drawn from each calibrated Gaussian, and a logistic
   regression trained on support + drawn features classifies the queries.

Unlike the reference code (one scikit-learn fit per episode, see
:mod:`fedsim.models.fewshot_reference`), :func:`evaluate_episodes` runs a batch of episodes at
once: one draw, one batched matmul per covariance factor, and one L-BFGS solve of all the
episodes' logistic regressions together (their objectives are independent, so the sum has the
same minimisers). It runs on whatever device the tensors are given on.

Also here: per-client sufficient statistics whose merge equals the central base statistics
(the federated variant computes base-class statistics without pooling features).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedsim.errors import FedsimError

__all__ = [
    "DCConfig", "BaseStatistics", "SufficientStatistics", "tukey", "base_statistics", "nearest_base",
    "calibrate", "calibrated_covariance", "covariance_factor", "sample_calibrated", "fit_logistic_regression",
    "evaluate_episodes", "samples_per_support", "training_set", "class_sufficient_statistics", "merge_sufficient_statistics",
    "statistics_from_sufficient",
]

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class DCConfig:
    """Settings of distribution calibration (defaults: the paper and its reference code)."""

    tukey: bool = True
    """Apply Tukey's ladder of powers to support and query features."""
    lam: float = 0.5
    """Tukey's lambda: ``x ** lam``; 0 means ``log x``; 1 is the identity."""
    tukey_base: bool = False
    """Also transform the base features before their statistics. The reference code does not
    (base statistics come from raw features while support features are transformed)."""
    generate: bool = True
    """Train on features drawn from the calibrated distributions (off = plain logistic regression)."""
    k: int = 2
    """Base classes whose statistics each support feature borrows."""
    alpha: float = 0.21
    """Dispersion added to the calibrated covariance."""
    alpha_mode: Literal["all", "identity"] = "all"
    """``all`` adds alpha to every entry (the reference code); ``identity`` adds alpha * I."""
    samples: int = 750
    """Drawn features per class; each support feature gets ``floor(samples / K)``."""
    C: float = 1.0
    """Inverse L2 strength of the logistic regression (scikit-learn's ``C``)."""
    max_iter: int = 100
    """L-BFGS iterations of the batched logistic regression."""
    episode_batch: int = 16
    """Episodes solved at once (memory: about ``episode_batch * N * samples * D`` floats)."""
    seed: int = 0
    """Seed of the drawn features (each episode's draw is keyed by (seed, episode index))."""
    factor_cache: int = 64
    """Covariance factors kept across episode batches (keyed by the set of k base classes)."""


# ---- Tukey's ladder of powers --------------------------------------------------------------
def tukey(x: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """Tukey's ladder of powers: ``x ** lam`` for ``lam != 0``, ``log x`` for ``lam == 0``.

    Raises :class:`FedsimError` on negative inputs, which have no real power (features from a
    ReLU network are non-negative; the paper relies on that).
    """
    if bool((x < 0).any()):
        raise FedsimError(
            f"Tukey's ladder of powers needs non-negative features (min {float(x.min()):.4g}); "
            "take features after a ReLU or set tukey = false"
        )
    if lam == 0:
        return torch.log(x)
    return x.pow(lam)


# ---- base-class statistics -----------------------------------------------------------------
@dataclass
class BaseStatistics:
    """Per-base-class mean ``[B, D]`` and full covariance ``[B, D, D]`` (float64)."""

    means: torch.Tensor
    covs: torch.Tensor

    def to(self, device: torch.device | str) -> BaseStatistics:
        return BaseStatistics(self.means.to(device), self.covs.to(device))


def _as_tensor(x: ArrayLike, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


def base_statistics(features: Mapping[int, ArrayLike], lam: float | None = None) -> BaseStatistics:
    """Mean and unbiased covariance (as ``np.cov``) of each base class, in float64.

    Parameters
    ----------
    features: class -> ``[n_c, D]`` feature matrix (classes in sorted order become rows).
    lam: if given, apply :func:`tukey` with this lambda first.
    """
    means, covs = [], []
    for cls in sorted(features):
        x = _as_tensor(features[cls])
        if x.ndim != 2 or x.shape[0] < 2:
            raise FedsimError(f"base class {cls}: need a [n >= 2, D] feature matrix, got shape {tuple(x.shape)}")
        if lam is not None:
            x = tukey(x, lam)
        mean = x.mean(0)
        centred = x - mean
        means.append(mean)
        covs.append(centred.T @ centred / (x.shape[0] - 1))
    return BaseStatistics(torch.stack(means), torch.stack(covs))


# ---- federated base statistics: sufficient statistics that merge exactly ---------------------
@dataclass
class SufficientStatistics:
    """Per-class count ``[B]``, sum ``[B, D]`` and sum of outer products ``[B, D, D]`` (float64).

    A client computes these on its own features; the server adds them up
    (:func:`merge_sufficient_statistics`) and gets the same mean and covariance as if every
    feature had been pooled (:func:`statistics_from_sufficient`).
    """

    counts: torch.Tensor
    sums: torch.Tensor
    outer: torch.Tensor


def class_sufficient_statistics(
    features: ArrayLike, labels: ArrayLike, classes: Sequence[int]
) -> SufficientStatistics:
    """Sufficient statistics of ``features [n, D]`` per class in ``classes`` (absent class -> zeros)."""
    x = _as_tensor(features)
    y = torch.as_tensor(np.asarray(labels)) if not isinstance(labels, torch.Tensor) else labels
    dim = x.shape[1]
    counts = torch.zeros(len(classes), dtype=torch.float64)
    sums = torch.zeros(len(classes), dim, dtype=torch.float64)
    outer = torch.zeros(len(classes), dim, dim, dtype=torch.float64)
    for row, cls in enumerate(classes):
        xc = x[y == cls]
        counts[row] = xc.shape[0]
        sums[row] = xc.sum(0)
        outer[row] = xc.T @ xc
    return SufficientStatistics(counts, sums, outer)


def merge_sufficient_statistics(parts: Sequence[SufficientStatistics]) -> SufficientStatistics:
    """Sum clients' statistics (the same class order on every client)."""
    if not parts:
        raise FedsimError("no client statistics to merge")
    return SufficientStatistics(
        sum(p.counts for p in parts), sum(p.sums for p in parts), sum(p.outer for p in parts)  # type: ignore[arg-type]
    )


def statistics_from_sufficient(stats: SufficientStatistics) -> BaseStatistics:
    """Mean and unbiased covariance from merged sufficient statistics.

    ``cov = (sum x x^T - n mean mean^T) / (n - 1)``: in float64 this matches the two-pass central
    computation to ~1e-12 relative for features of moderate magnitude.
    """
    if bool((stats.counts < 2).any()):
        missing = torch.nonzero(stats.counts < 2).flatten().tolist()
        raise FedsimError(f"base class rows {missing} have fewer than 2 features over all clients")
    n = stats.counts[:, None]
    means = stats.sums / n
    covs = (stats.outer - n[:, :, None] * means[:, :, None] * means[:, None, :]) / (n[:, :, None] - 1)
    return BaseStatistics(means, covs)


# ---- calibration -----------------------------------------------------------------------------
def nearest_base(support: torch.Tensor, base_means: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[M, k]`` (sorted ascending) of the k base means nearest to each support feature."""
    if not 1 <= k <= base_means.shape[0]:
        raise FedsimError(f"k = {k} must be between 1 and the number of base classes ({base_means.shape[0]})")
    dist = torch.cdist(support.to(base_means.dtype), base_means)  # [M, B]
    index = torch.topk(dist, k, dim=1, largest=False).indices
    # Sorted so that the same set of base classes is one cache key, whatever the distance order.
    return torch.sort(index, dim=1).values


def calibrated_covariance(
    combos: torch.Tensor, base_covs: torch.Tensor, alpha: float, alpha_mode: str = "all"
) -> torch.Tensor:
    """Mean of the covariances of each row of base-class indices ``[U, k]``, plus alpha -> ``[U, D, D]``."""
    cov = base_covs[combos].mean(1)
    if alpha_mode == "all":
        return cov + alpha  # every entry, as the reference code's ``np.mean(...) + alpha``
    if alpha_mode == "identity":
        return cov + alpha * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    raise FedsimError(f"alpha_mode = {alpha_mode!r}: expected 'all' or 'identity'")


def calibrate(
    support: torch.Tensor, stats: BaseStatistics, k: int = 2, alpha: float = 0.21, alpha_mode: str = "all"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated mean ``[M, D]`` and covariance ``[M, D, D]`` of each support feature ``[M, D]``.

    Materialises one covariance per support feature: for inspection and tests. The batched
    path (:func:`sample_calibrated`) shares one factor per distinct set of base classes instead.
    """
    support = support.to(stats.means.dtype)
    index = nearest_base(support, stats.means, k)
    means = (stats.means[index].sum(1) + support) / (k + 1)
    return means, calibrated_covariance(index, stats.covs, alpha, alpha_mode)


def covariance_factor(cov: torch.Tensor) -> torch.Tensor:
    """``L`` with ``L @ L.T == cov`` via a float64 eigendecomposition, eigenvalues clipped at 0.

    The calibrated covariance of 640-d features estimated from ~600 samples is singular or
    slightly indefinite in floating point, where a Cholesky factor fails.
    """
    values, vectors = torch.linalg.eigh(cov.to(torch.float64))
    return vectors * values.clamp_min(0).sqrt().unsqueeze(-2)


class _FactorCache:
    """Covariance factors keyed by the (sorted) tuple of base classes; least recently used goes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.computed = 0

    def get_many(
        self, combos: torch.Tensor, base_covs: torch.Tensor, alpha: float, alpha_mode: str, dtype: torch.dtype
    ) -> list[torch.Tensor]:
        keys = [tuple(int(v) for v in row) for row in combos.tolist()]
        missing = [i for i, key in enumerate(keys) if key not in self.items]
        fresh: dict[tuple[int, ...], torch.Tensor] = {}
        for start in range(0, len(missing), 16):  # bounded [16, D, D] float64 work buffers
            rows = missing[start:start + 16]
            cov = calibrated_covariance(combos[rows], base_covs, alpha, alpha_mode)
            for i, factor in zip(rows, covariance_factor(cov).to(dtype), strict=True):
                fresh[keys[i]] = factor
            self.computed += len(rows)
        out = []
        for key in keys:
            factor = self.items.get(key, fresh.get(key))
            assert factor is not None
            out.append(factor)
            if self.capacity > 0:
                self.items[key] = factor
                self.items.move_to_end(key)
        while len(self.items) > max(self.capacity, 0):
            self.items.popitem(last=False)
        return out


def sample_calibrated(
    support: torch.Tensor,
    stats: BaseStatistics,
    n_per: int,
    noise: torch.Tensor,
    k: int = 2,
    alpha: float = 0.21,
    alpha_mode: str = "all",
    cache: _FactorCache | None = None,
) -> torch.Tensor:
    """Draw ``n_per`` features from the calibrated Gaussian of each support feature.

    Parameters
    ----------
    support: ``[M, D]`` (already Tukey-transformed when the config says so).
    noise: standard normal ``[M, n_per, D]``; passed in so the draw is keyed by episode, not by batch.

    Returns
    -------
    ``[M, n_per, D]`` in ``noise``'s dtype: ``mean + noise @ L.T`` with ``L L^T`` the calibrated covariance.
    """
    means64 = stats.means
    index = nearest_base(support, means64, k)
    cal_mean = ((means64[index].sum(1) + support.to(means64.dtype)) / (k + 1)).to(noise.dtype)
    combos, inverse = torch.unique(index, dim=0, return_inverse=True)
    cache = cache if cache is not None else _FactorCache(0)
    factors = cache.get_many(combos, stats.covs, alpha, alpha_mode, noise.dtype)
    out = torch.empty_like(noise)
    for u, factor in enumerate(factors):
        rows = torch.nonzero(inverse == u).flatten()
        # [m, n, D] @ [D, D]: every support feature that shares these base classes in one matmul
        out[rows] = noise[rows] @ factor.T + cal_mean[rows, None, :]
    del n_per  # the shape of ``noise`` carries it; the argument documents the call
    return out


# ---- batched logistic regression -----------------------------------------------------------------
def fit_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, C: float = 1.0, max_iter: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression for E independent problems at once.

    Minimises, per problem, scikit-learn's objective ``sum_i CE_i + ||W||^2 / (2C)`` (bias not
    penalised) divided by n, which has the same minimiser and keeps float32 gradients tame. The
    problems share no parameters, so one L-BFGS run on the sum solves each of them.

    Parameters
    ----------
    x: ``[E, n, D]`` features; y: ``[E, n]`` integer labels in ``[0, n_classes)``.

    Returns
    -------
    weights ``[E, D, n_classes]`` and biases ``[E, n_classes]``.
    """
    e, n, d = x.shape
    weight = torch.zeros(e, d, n_classes, dtype=x.dtype, device=x.device)
    bias = torch.zeros(e, n_classes, dtype=x.dtype, device=x.device)
    weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")
    x_t = x.transpose(1, 2).contiguous()  # [E, D, n]: the gradient's matmul reads X row-major too
    onehot = torch.nn.functional.one_hot(y, n_classes).to(x.dtype)

    def closure() -> torch.Tensor:
        # The gradient by hand: two passes over X per evaluation and no autograd graph.
        logits = torch.baddbmm(bias.unsqueeze(1), x, weight)  # [E, n, classes]
        log_p = torch.log_softmax(logits, dim=-1)
        loss = (-(onehot * log_p).sum() + weight.pow(2).sum() / (2 * C)) / n
        residual = (log_p.exp() - onehot) / n  # d loss / d logits
        weight.grad.copy_(torch.bmm(x_t, residual) + weight / (C * n))
        bias.grad.copy_(residual.sum(1))
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


# ---- whole episodes ------------------------------------------------------------------------------
def _episode_noise(seed: int, episode: int, shape: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    from fedsim.seeding import derive_seed  # the project's one way of keying random streams

    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, "dc-draw", episode))
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def samples_per_support(samples: int, k_shot: int) -> int:
    """Drawn features per support feature: ``floor(samples / K)`` (750 -> 750 at 1-shot, 150 at 5-shot)."""
    return math.floor(samples / k_shot)


def training_set(
    support: torch.Tensor,
    support_labels: torch.Tensor,
    stats: BaseStatistics | None,
    config: DCConfig,
    first_episode: int = 0,
    dtype: torch.dtype = torch.float32,
    cache: _FactorCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Support (transformed if the config says so) plus drawn features, and their labels.

    Parameters
    ----------
    support: ``[b, N*K, D]`` raw support features of episodes ``first_episode ..``; labels ``[b, N*K]``.

    Returns
    -------
    ``x [b, N*K * (1 + n_per), D]`` and ``y``: the support first, then ``n_per`` drawn features
    per support feature, in support order.
    """
    b, n_support, dim = support.shape
    n_classes = int(support_labels.max()) + 1
    n_per = samples_per_support(config.samples, n_support // n_classes)
    sup = support.to(torch.float64)
    if config.tukey:
        sup = tukey(sup, config.lam)
    x, y = sup.to(dtype), support_labels
    if not config.generate or n_per == 0:
        return x, y
    if stats is None:
        raise FedsimError("distribution calibration needs base-class statistics (generate = true)")
    noise = torch.stack([_episode_noise(config.seed, e, (n_support, n_per, dim), dtype, support.device)
                         for e in range(first_episode, first_episode + b)])  # [b, N*K, n_per, D]
    drawn = sample_calibrated(sup.reshape(-1, dim), stats, n_per, noise.reshape(-1, n_per, dim),
                              config.k, config.alpha, config.alpha_mode, cache)
    x = torch.cat([x, drawn.reshape(b, n_support * n_per, dim)], dim=1)
    y = torch.cat([y, y.repeat_interleave(n_per, dim=1)], dim=1)
    return x, y


def evaluate_episodes(
    support: torch.Tensor,
    support_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    stats: BaseStatistics | None,
    config: DCConfig = DCConfig(),
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """Query accuracy of each episode ``[E]`` (a float array), batched ``config.episode_batch`` at a time.

    Parameters
    ----------
    support: ``[E, N*K, D]`` raw features with labels ``[E, N*K]`` in ``[0, N)``.
    query: ``[E, N*Q, D]`` with labels ``[E, N*Q]``.
    stats: base statistics on the compute device (in the space the config expects: transformed
        when ``config.tukey_base``); only needed when ``config.generate``.
    """
    n_episodes = support.shape[0]
    n_classes = int(support_labels.max()) + 1
    step = max(config.episode_batch, 1)
    cache = _FactorCache(config.factor_cache)
    accuracies = []
    for start in range(0, n_episodes, step):
        stop = min(start + step, n_episodes)
        x, y = training_set(support[start:stop], support_labels[start:stop], stats, config, start, dtype, cache)
        qry = query[start:stop].to(torch.float64)
        if config.tukey:
            qry = tukey(qry, config.lam)
        weight, bias = fit_logistic_regression(x, y, n_classes, config.C, config.max_iter)
        logits = torch.baddbmm(bias.unsqueeze(1), qry.to(dtype), weight)
        correct = (logits.argmax(-1) == query_labels[start:stop]).to(torch.float64).mean(1)
        accuracies.append(correct.cpu().numpy())
    return np.concatenate(accuracies)

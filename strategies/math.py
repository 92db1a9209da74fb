"""The arithmetic of aggregation, as pure functions on ``{name: ndarray}`` dicts.

Strategies (``strategies.scaffold``, ``strategies.fednova``) and the client side
(``strategies.client``) call these; tests check them against hand-computed values. Nothing here
knows about messages, grids or processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Arrays = dict[str, np.ndarray]

__all__ = [
    "Arrays",
    "weighted_mean",
    "zeros_like",
    "subtract",
    "scaffold_correction",
    "scaffold_client_control",
    "scaffold_server_update",
    "fednova_norm",
    "fednova_aggregate",
    "staleness_weight",
    "fedbuff_update",
]


def zeros_like(arrays: Mapping[str, np.ndarray]) -> Arrays:
    """Zeros with the shape and dtype of every array (initial control variates)."""
    return {k: np.zeros_like(v) for k, v in arrays.items()}


def subtract(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Arrays:
    """``a - b`` key by key (``a``'s keys, which ``b`` must have)."""
    return {k: a[k] - b[k] for k in a}


def weighted_mean(arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Arrays:
    """``sum_i w_i a_i / sum_i w_i`` per key, summed in the given order (order fixes rounding).

    Parameters
    ----------
    arrays: one dict per client, all with the same keys and shapes.
    weights: non-negative weights (e.g. example counts), not all zero.
    """
    if len(arrays) != len(weights) or not arrays:
        raise ValueError(f"weighted_mean needs one weight per array dict, got {len(arrays)} and {len(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weighted_mean: the weights sum to zero")
    out: Arrays = {}
    for key, first in arrays[0].items():
        acc = np.zeros(first.shape, dtype=np.result_type(first.dtype, np.float32))
        for record, weight in zip(arrays, weights, strict=True):
            acc = acc + record[key] * (float(weight) / total)
        out[key] = acc.astype(first.dtype) if np.issubdtype(first.dtype, np.floating) else acc
    return out


# ---- SCAFFOLD (Karimireddy et al., 2020, "option II") ------------------------------------------
def scaffold_correction(server_control: Mapping[str, np.ndarray], client_control: Mapping[str, np.ndarray]) -> Arrays:
    """``c - c_i``: the term SCAFFOLD adds to every local gradient (``y <- y - lr (g + c - c_i)``)."""
    return subtract(server_control, client_control)


def scaffold_client_control(
    client_control: Mapping[str, np.ndarray],
    server_control: Mapping[str, np.ndarray],
    global_params: Mapping[str, np.ndarray],
    local_params: Mapping[str, np.ndarray],
    steps: int,
    lr: float,
) -> Arrays:
    """The client's new control variate ``c_i+ = c_i - c + (x - y) / (K lr)`` (option II).

    ``x`` = the global parameters the client started from, ``y`` = its parameters after ``K``
    local steps of learning rate ``lr``.
    """
    if steps <= 0 or lr <= 0:
        raise ValueError(f"scaffold_client_control needs steps > 0 and lr > 0, got {steps}, {lr}")
    scale = 1.0 / (steps * lr)
    return {
        k: client_control[k] - server_control[k] + (global_params[k] - local_params[k]) * scale
        for k in client_control
    }


def scaffold_server_update(
    global_params: Mapping[str, np.ndarray],
    server_control: Mapping[str, np.ndarray],
    delta_params: Sequence[Mapping[str, np.ndarray]],
    delta_controls: Sequence[Mapping[str, np.ndarray]],
    num_clients: int,
    server_lr: float = 1.0,
) -> tuple[Arrays, Arrays]:
    """``x <- x + lr_g mean_S(dy_i)`` and ``c <- c + (1/N) sum_S dc_i`` (uniform means, as in the paper).

    Parameters
    ----------
    delta_params: ``y_i - x`` of the clients that replied, in partition order.
    delta_controls: ``c_i+ - c_i`` of the same clients.
    num_clients: N, all clients (not only the sampled ones).
    """
    n = len(delta_params)
    if n == 0 or n != len(delta_controls):
        raise ValueError("scaffold_server_update needs one control delta per parameter delta")
    mean_dy = weighted_mean(delta_params, [1.0] * n)
    new_params = {k: global_params[k] + server_lr * mean_dy[k] for k in global_params}
    new_control = dict(server_control)
    for dc in delta_controls:
        new_control = {k: new_control[k] + dc[k] / num_clients for k in new_control}
    return new_params, new_control


# ---- FedNova (Wang et al., 2020) -------------------------------------------------------------
def fednova_norm(steps: int, momentum: float = 0.0) -> float:
    """``||a_i||_1`` of the local-update coefficients of ``steps`` SGD steps with momentum ``rho``.

    Plain SGD: ``tau``. Momentum: ``(tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)``.
    """
    if momentum == 0.0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


def fednova_aggregate(
    global_params: Mapping[str, np.ndarray],
    local_params: Sequence[Mapping[str, np.ndarray]],
    steps: Sequence[int],
    weights: Sequence[float],
    momentum: float = 0.0,
    server_lr: float = 1.0,
) -> Arrays:
    """Normalised averaging: ``x - lr_g tau_eff sum_i p_i (x - y_i) / ||a_i||_1``.

    ``p_i`` = weights normalised to sum to one, ``tau_eff = sum_i p_i ||a_i||_1``. With equal
    step counts this is FedAvg; with unequal ones it removes the bias towards clients that took
    more steps.
    """
    if not local_params or not (len(local_params) == len(steps) == len(weights)):
        raise ValueError("fednova_aggregate needs one step count and one weight per client")
    total = float(sum(weights))
    p = [float(w) / total for w in weights]
    norms = [fednova_norm(int(s), momentum) for s in steps]
    if min(norms) <= 0:
        raise ValueError(f"fednova_aggregate: every client must take at least one step, got {list(steps)}")
    tau_eff = sum(pi * ai for pi, ai in zip(p, norms, strict=True))
    out: Arrays = {}
    for key, x in global_params.items():
        direction = np.zeros(x.shape, dtype=np.result_type(x.dtype, np.float32))
        for pi, ai, y in zip(p, norms, local_params, strict=True):
            direction = direction + (x - y[key]) * (pi / ai)
        out[key] = (x - server_lr * tau_eff * direction).astype(x.dtype)
    return out


# ---- FedBuff (Nguyen et al., AISTATS 2022) ---------------------------------------------------
def staleness_weight(staleness: int, exponent: float = 0.5) -> float:
    """``(1 + tau) ** -a``: FedBuff's down-weighting of an update computed on a model ``tau`` versions
    old (``a = 0.5``: ``1 / sqrt(1 + tau)``; ``a = 0``: none)."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return float((1.0 + staleness) ** -exponent)


def fedbuff_update(
    global_params: Mapping[str, np.ndarray],
    deltas: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    staleness: Sequence[int],
    exponent: float = 0.5,
    server_lr: float = 1.0,
) -> Arrays:
    """``x + lr_g sum_i w_i s(tau_i) d_i / sum_i w_i`` over a buffer of client updates ``d_i = y_i - x_i``
    (each relative to the model its client started from).

    ``w_i`` = 1 for FedBuff's uniform mean, or example counts; the denominator leaves out the staleness
    factors so that stale updates count for less, as in FedBuff. With no staleness, ``lr_g = 1`` and
    example weights this is FedAvg's weighted mean of the client models when they all started from ``x``.
    """
    if not deltas or not (len(deltas) == len(weights) == len(staleness)):
        raise ValueError("fedbuff_update needs one weight and one staleness per update")
    factors = [float(w) * staleness_weight(int(t), exponent) for w, t in zip(weights, staleness, strict=True)]
    mean = weighted_mean(deltas, factors)  # the strategies' weighted mean, normalised by sum(factors)
    scale = server_lr * sum(factors) / float(sum(weights))
    out: Arrays = {}
    for key, x in global_params.items():
        step = mean[key] * scale if scale != 1.0 else mean[key]
        out[key] = (x + step).astype(x.dtype)
    return out

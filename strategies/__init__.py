"""Federated aggregation strategies: an explicit registry from name to factory.

Flower's message-API strategies (``flwr.serverapp.strategy``) are used as they are; SCAFFOLD
and FedNova are Flower ``Strategy`` subclasses here, with their math in :mod:`strategies.math`
and their client side in :mod:`strategies.client`.

Sampling is fedsim's job, not the strategy's: the round loop hands ``configure_train`` a view
of the grid that holds only the clients it sampled (by seed and partition id), so every
strategy is built to take all the nodes it sees (``fraction_train = 1``). Evaluation is the
server's (every round, on the test split) and, once at the end, every client's on its own
held-out data; the strategies' ``configure_evaluate`` is not used.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from fedsim.errors import ConfigError
from strategies.codec_averaging import with_codec_averaging
from strategies.fednova import FedNova
from strategies.scaffold import Scaffold
from strategies.state import get_strategy_state, set_strategy_state

__all__ = [
    "STRATEGIES",
    "StrategyContext",
    "make_strategy",
    "uses_client_state",
    "get_strategy_state",
    "set_strategy_state",
    "Scaffold",
    "FedNova",
]

# Name -> factory (a Strategy class). Explicit, so `fedsim list` and error messages can show them.
# The FedAvg family's weighted average reads reply arrays through fedsim's codec (same arithmetic,
# bit-identical; see strategies/codec_averaging.py); the robust aggregators decode as Flower does.
STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "fedavg": with_codec_averaging(FedAvg),
    "fedprox": with_codec_averaging(FedProx),
    "fedavgm": with_codec_averaging(FedAvgM),
    "fedadam": with_codec_averaging(FedAdam),
    "fedyogi": with_codec_averaging(FedYogi),
    "fedadagrad": with_codec_averaging(FedAdagrad),
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "scaffold": Scaffold,
    "fednova": FedNova,
}

# Set by fedsim for every strategy; users choose sampling with federated.clients_per_round.
# (Federated evaluation is not configured here: fedsim's round loop never calls configure_evaluate;
# the server scores the global model every round and the clients score it once at the end.)
_ENGINE_KWARGS = {
    "fraction_train": 1.0,
    "min_train_nodes": 1,
    "min_available_nodes": 1,
}
_RESERVED = {"fraction_evaluate", "min_evaluate_nodes"}


@dataclass(frozen=True)
class StrategyContext:
    """What the run knows that some strategies need (passed only to those that take it).

    Attributes
    ----------
    num_clients: all clients N (SCAFFOLD scales its control update by 1/N).
    trainable_keys: names of the model's parameters (the other arrays are buffers).
    client_momentum: the clients' SGD momentum (FedNova's step normalisation).
    """

    num_clients: int = 1
    trainable_keys: tuple[str, ...] = ()
    client_momentum: float = 0.0


def _accepted(factory: Callable[..., Strategy]) -> set[str]:
    names: set[str] = set()
    for cls in getattr(factory, "__mro__", (factory,)):
        init = getattr(cls, "__init__", None)
        if init is None or cls is object:
            continue
        params = inspect.signature(init).parameters
        names.update(p for p in params if p != "self" and params[p].kind is not inspect.Parameter.VAR_KEYWORD)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break  # this __init__ does not forward **kwargs to its parent
    return names


def make_strategy(
    name: str,
    options: Mapping[str, Any] | None = None,
    context: StrategyContext | None = None,
    *,
    file: str = "<code>",
) -> Strategy:
    """Build a registered strategy with the user's options; errors name the key and value.

    Parameters
    ----------
    name: a key of :data:`STRATEGIES`.
    options: ``federated.strategy_options`` (e.g. ``proximal_mu``, ``server_learning_rate``).
    context: run facts; passed to the strategies whose constructor takes them.
    file: the experiment file, for error messages.
    """
    if name not in STRATEGIES:
        raise ConfigError(file, "federated.strategy", name, f"unknown strategy; known: {', '.join(STRATEGIES)}")
    factory = STRATEGIES[name]
    accepted = _accepted(factory)
    options = dict(options or {})
    for key, value in options.items():
        dotted = f"federated.strategy_options.{key}"
        if key in _ENGINE_KWARGS or key in _RESERVED or key in ("num_clients", "trainable_keys", "client_momentum"):
            raise ConfigError(file, dotted, value, "set by fedsim (use federated.clients_per_round / fraction_fit)")
        if key not in accepted:
            allowed = sorted(accepted - set(_ENGINE_KWARGS) - _RESERVED - {"num_clients", "trainable_keys", "client_momentum",
                                                               "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn",
                                                               "weighted_by_key", "arrayrecord_key",
                                                               "configrecord_key"})
            raise ConfigError(file, dotted, value, f"not an option of strategy '{name}'; options: {', '.join(allowed)}")
    context = context or StrategyContext()
    kwargs: dict[str, Any] = {k: v for k, v in _ENGINE_KWARGS.items() if k in accepted}
    for key in ("num_clients", "trainable_keys", "client_momentum"):
        if key in accepted:
            kwargs[key] = getattr(context, key)
    kwargs.update(options)
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(file, "federated.strategy_options", options, f"strategy '{name}': {exc}") from exc


def uses_client_state(strategy: Strategy) -> bool:
    """Whether the round loop must keep and ship per-partition client state (SCAFFOLD's ``c_i``)."""
    return bool(getattr(strategy, "uses_client_state", False))

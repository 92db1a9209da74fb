"""A strategy's server-side state as plain numpy structures, for checkpoints and resume.

Flower's strategies keep their state in attributes (FedAvgM's momentum, FedOpt's ``m_t`` /
``v_t`` and the arrays of the last round); fedsim's keep theirs the same way. Resuming a run
restores these attributes, so round ``t + 1`` after a restart computes what it would have
computed without one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from fedsim.wire.array_codec import arrays_to_record

# Attributes that carry state across rounds in Flower 1.42's strategies and in ours.
STATE_ATTRIBUTES: tuple[str, ...] = ("current_arrays", "momentum_vector", "m_t", "v_t", "control")

__all__ = ["STATE_ATTRIBUTES", "get_strategy_state", "set_strategy_state"]


def _encode(value: Any) -> Any:
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": {k: v.numpy() for k, v in value.items()}}
    if isinstance(value, dict):
        return {"__dict__": {k: np.array(v, copy=True) for k, v in value.items()}}
    if isinstance(value, list):
        return {"__list__": [np.array(v, copy=True) for v in value]}
    if value is None:
        return None
    raise TypeError(f"cannot checkpoint strategy attribute of type {type(value).__name__}")


def _decode(value: Any) -> Any:
    if value is None:
        return None
    if "__arrayrecord__" in value:
        return arrays_to_record(value["__arrayrecord__"])
    if "__dict__" in value:
        return {k: np.array(v, copy=True) for k, v in value["__dict__"].items()}
    return [np.array(v, copy=True) for v in value["__list__"]]


def get_strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The strategy's cross-round attributes (only those it has), as numpy copies."""
    return {name: _encode(getattr(strategy, name)) for name in STATE_ATTRIBUTES if hasattr(strategy, name)}


def set_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Restore what :func:`get_strategy_state` returned (on a strategy built with the same options)."""
    for name, value in state.items():
        if name not in STATE_ATTRIBUTES or not hasattr(strategy, name):
            raise ValueError(f"strategy {type(strategy).__name__} has no state attribute '{name}'")
        setattr(strategy, name, _decode(value))

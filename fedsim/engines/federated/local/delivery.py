"""One delivery of a message to a ClientApp in this process, isolated as a separate process would be.

Shared by the sequential executor (:mod:`fedsim.engines.federated.local.grid`) and the worker pool
(:mod:`fedsim.engines.federated.local.pool`): the node's Context, the copy of the message content,
the keyed RNG state around the call, and the ``Error`` reply Flower's simulation gives for a
ClientApp that raised.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.seeding import derive_seed
from fedsim.wire import flower_private as fp

__all__ = ["LocalNode", "DeliveryOptions", "IsolatedRandomness", "copy_records", "deliver", "error_reply",
           "delivery_seed"]

log = logging.getLogger("fedsim.local_grid")


# ---- copies -------------------------------------------------------------------------------------
def _copy_value(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def copy_records(records: RecordDict) -> RecordDict:
    """A copy of ``records`` that shares only immutable payloads (each ``Array.data`` is ``bytes``)."""
    out = RecordDict()
    for key, record in records.items():
        if isinstance(record, ArrayRecord):  # a new mapping of new Array objects over the same bytes
            new: Any = fp.array_record_of({name: fp.copy_array(arr) for name, arr in record.items()})
        elif isinstance(record, MetricRecord):
            new = MetricRecord({k: _copy_value(v) for k, v in record.items()})
        elif isinstance(record, ConfigRecord):
            new = ConfigRecord({k: _copy_value(v) for k, v in record.items()})
        else:  # pragma: no cover - RecordDict only admits the three record types
            raise TypeError(f"unexpected record type {type(record).__name__} under '{key}'")
        out[key] = new
    return out


@dataclass
class LocalNode:
    """One simulated SuperNode: its id, partition and persistent Context."""

    node_id: int
    partition_id: int
    context: Context
    initial_run_config: dict[str, Any] = field(default_factory=dict)


# ---- one delivery -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeliveryOptions:
    """How a ClientApp call is isolated from the rest of the process."""

    seed: int = 0
    threads: int = 0
    """If > 0, torch threads during the call (restored after)."""


def delivery_seed(options: DeliveryOptions, node: LocalNode, message: Message) -> int:
    meta = message.metadata
    return derive_seed("local-grid-client", options.seed, node.partition_id, meta.group_id, meta.message_type)


class IsolatedRandomness:
    """Seed python/numpy/torch for one client call and put the caller's generators back after."""

    def __init__(self, seed: int, threads: int) -> None:
        self.seed, self.threads = seed, threads

    def __enter__(self) -> None:
        self.saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        self.saved_threads = torch.get_num_threads()
        if self.threads > 0 and self.threads != self.saved_threads:
            torch.set_num_threads(self.threads)
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        # The CPU generator directly: torch.manual_seed also queues a lazy CUDA seeding call with a
        # formatted stack trace every time (~ms each, and the queue grows) when CUDA is not initialised.
        torch.default_generator.manual_seed(self.seed)
        if torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(self.seed)

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.saved[0])
        np.random.set_state(self.saved[1])
        torch.set_rng_state(self.saved[2])
        if torch.get_num_threads() != self.saved_threads:
            torch.set_num_threads(self.saved_threads)


def error_reply(message: Message, exc: BaseException, code: int = fp.CLIENT_APP_RAISED_EXCEPTION) -> Message:
    """The reply Flower's simulation gives for a ClientApp that raised."""
    return Message(Error(code=code, reason=f"{type(exc)}:<'{exc}'>"), reply_to=message)


def deliver(client_app: ClientApp, node: LocalNode, message: Message, options: DeliveryOptions) -> Message:
    """Run ``client_app`` on a copy of ``message`` with the node's context; return the reply.

    Failures (an exception, a non-Message return, a modified run config) become ``Error``
    replies and leave the node's context as it was before the call.
    """
    incoming = fp.clone_message(message, copy_records(message.content))
    context = node.context
    saved_state = copy_records(context.state)
    try:
        with IsolatedRandomness(delivery_seed(options, node, message), options.threads):
            reply = client_app(message=incoming, context=context)
        if not isinstance(reply, Message):
            raise TypeError(f"the ClientApp returned {type(reply).__name__}, not a flwr Message")
        if context.run_config != node.initial_run_config:
            raise ValueError("The `run_config` field of the `Context` object cannot be modified")
    except Exception as exc:  # noqa: BLE001 - a failing client must not stop the round (as in Flower)
        log.error("ClientApp on node %d (partition %d) raised: %r", node.node_id, node.partition_id, exc,
                  exc_info=True)
        context.state = saved_state
        context.run_config = dict(node.initial_run_config)
        return error_reply(message, exc)
    if reply.has_content():
        # The reply may alias records kept in the client's Context; the server must get its own.
        reply = fp.clone_message(reply, copy_records(reply.content))
    return reply



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

__all__ = ["LocalNode", "DeliveryOptions", "IsolatedRandomness", "KeptGenerators", "seed_generators", "copy_records", "deliver", "error_reply",
           "delivery_seed"]

log = logging.getLogger("fedsim.local_grid")


# ---- copies -------------------------------------------------------------------------------------
def _copy_value(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _copy_record(record: Any) -> Any:
    if isinstance(record, ArrayRecord):  # new Array objects over the same payloads
        return fp.copy_record(record, fp.copy_array)
    if isinstance(record, (MetricRecord, ConfigRecord)):
        return fp.copy_record(record, _copy_value)
    raise TypeError(f"unexpected record type {type(record).__name__}")  # pragma: no cover - RecordDict admits 3


def copy_records(records: RecordDict) -> RecordDict:
    """A copy of ``records`` that shares only payloads nobody can write to: an ``Array``'s ``bytes``, or a
    LazyArray's read-only array (its ``numpy()`` returns copies). New records, new ``Array`` objects:
    what a client may edit in place (keys, an array's fields, ``data``) stays its own."""
    return fp.copy_record(records, _copy_record)


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


class KeptGenerators:
    """Save the python/numpy/torch generators (and torch's thread count) on entry and put them back on exit.

    Held around a whole batch of client calls, each of which seeds the generators itself
    (:func:`seed_generators`): saving NumPy's legacy state costs ~90 us, more than the rest of a
    delivery, and doing it once per batch instead of once per call changes nothing a client or
    the server can see (every call starts from its own seed; the caller's draws resume after).
    """

    def __init__(self, threads: int = 0) -> None:
        self.threads = threads

    def __enter__(self) -> KeptGenerators:
        self.saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        self.saved_threads = torch.get_num_threads()
        if self.threads > 0 and self.threads != self.saved_threads:
            torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.saved[0])
        np.random.set_state(self.saved[1])
        torch.set_rng_state(self.saved[2])
        if torch.get_num_threads() != self.saved_threads:
            torch.set_num_threads(self.saved_threads)


def seed_generators(seed: int) -> None:
    """Seed python, numpy and torch for one client call."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # The CPU generator directly: torch.manual_seed also queues a lazy CUDA seeding call with a
    # formatted stack trace every time (~ms each, and the queue grows) when CUDA is not initialised.
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


class IsolatedRandomness(KeptGenerators):
    """:class:`KeptGenerators` around a single call seeded with ``seed``."""

    def __init__(self, seed: int, threads: int) -> None:
        super().__init__(threads)
        self.seed = seed

    def __enter__(self) -> IsolatedRandomness:
        super().__enter__()
        seed_generators(self.seed)
        return self


def error_reply(message: Message, exc: BaseException, code: int = fp.CLIENT_APP_RAISED_EXCEPTION) -> Message:
    """The reply Flower's simulation gives for a ClientApp that raised."""
    return Message(Error(code=code, reason=f"{type(exc)}:<'{exc}'>"), reply_to=message)


def deliver(client_app: ClientApp, node: LocalNode, message: Message, options: DeliveryOptions) -> Message:
    """Run ``client_app`` on a copy of ``message`` with the node's context; return the reply.

    The call's generators are seeded here; the caller holds :class:`KeptGenerators` around its
    batch of calls (a worker process, which draws nothing of its own, needs not).
    Failures (an exception, a non-Message return, a modified run config) become ``Error``
    replies and leave the node's context as it was before the call.
    """
    incoming = fp.clone_message(message, copy_records(message.content))
    context = node.context
    saved_state = copy_records(context.state)
    try:
        seed_generators(delivery_seed(options, node, message))
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



"""``engine = "local"``: a Flower ``Grid`` that delivers each message to the ClientApp in this process.

The same ServerApp, ClientApp and strategy run unchanged; only the transport differs from
Flower's ``run_simulation`` (SuperLink state + Ray actors polled every 0.1 s). What a ClientApp
sees is what Flower's simulation gives it:

* one SuperNode per partition, with a random-looking 64-bit node id (here derived from the seed),
  ``node_config = {"partition-id": p, "num-partitions": N}`` and the app's run config;
* a persistent :class:`flwr.app.Context` per node whose ``state`` survives between rounds (and is
  rolled back when the ClientApp raises, as Flower discards the context of a failed call);
* a *copy* of the message content: strategies put one ``RecordDict`` object into every message of
  a round, so in-place edits by one client must not reach the others or the server. The copy is
  structural — records and ``Array`` objects are new, payloads are shared because nobody can write
  to them (``bytes``, or a :class:`~fedsim.wire.flower_private.LazyArray`'s read-only array, whose
  ``numpy()`` hands out copies) — so it costs O(number of arrays), not O(bytes);
* a ClientApp that raises comes back as an ``Error`` reply and the strategy carries on.

Isolation that separate processes give for free is made explicit: before each delivery the
global RNGs (python, numpy, torch) are seeded from (seed, partition, group id, message type), and
the server's are put back after each batch of deliveries, so client draws are reproducible and the server's own draws (e.g. FedAvg's
``random.sample``) do not depend on how much randomness the clients used.

Parallel options (see :func:`run_local`): sequential (default), a pool of worker processes
(:mod:`fedsim.engines.federated.local.pool`) and vectorised training for ClientApps that offer it
(:mod:`fedsim.engines.federated.local.vectorised`).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsim.engines.federated.local.delivery import (
    DeliveryOptions,
    IsolatedRandomness,
    KeptGenerators,
    LocalNode,
    copy_records,
    deliver,
    delivery_seed,
)
from fedsim.errors import FedsimError
from fedsim.seeding import derive_seed
from fedsim.wire import flower_private as fp

__all__ = [
    "LocalGrid", "LocalNode", "run_local", "copy_records", "make_node_ids", "deliver", "SequentialExecutor",
    "Executor", "BATCH_HANDLER_ATTR",
]

log = logging.getLogger("fedsim.local_grid")

NodeConfigFn = Callable[[int, int], dict[str, Any]]
BATCH_HANDLER_ATTR = "fedsim_batch_handler"
"""A ClientApp attribute: ``handler(messages, contexts) -> list[Message] | None`` that answers a
batch of messages at once (vectorised training); ``None`` = "not this batch", handled one by one."""


# ---- nodes --------------------------------------------------------------------------------------
class PartitionNodes:
    """Partition id <-> node id as arithmetic, so a population of any size costs nothing up front.

    Node ids look random (64-bit, a function of the seed, never 0 or the SuperLink's id): node =
    (a * partition + b) mod 2**64 with a seeded odd ``a``, which is a bijection; the inverse gives the
    partition of a node id in O(1). Nothing per node is stored.
    """

    def __init__(self, num_partitions: int, seed: int = 0) -> None:
        self.num_partitions = num_partitions
        rng = random.Random(derive_seed("local-grid-node-ids", seed))
        while True:  # (almost never more than once) until no partition maps to a reserved id
            self._a, self._b = rng.getrandbits(64) | 1, rng.getrandbits(64)
            self._a_inverse = pow(self._a, -1, 2**64)
            if all(self.partition_of(reserved) is None for reserved in (0, fp.SUPERLINK_NODE_ID)):
                break

    def node_of(self, partition_id: int) -> int:
        return (self._a * partition_id + self._b) & _MASK64

    def partition_of(self, node_id: int) -> int | None:
        partition_id = ((node_id - self._b) * self._a_inverse) & _MASK64
        return partition_id if partition_id < self.num_partitions else None

    def node_ids(self) -> list[int]:
        """Every node id in partition order (vectorised: about 40 ms for a million)."""
        with np.errstate(over="ignore"):
            ids = np.arange(self.num_partitions, dtype=np.uint64) * np.uint64(self._a) + np.uint64(self._b)
        return ids.tolist()


_MASK64 = 2**64 - 1


def make_node_ids(num_nodes: int, seed: int = 0) -> list[int]:
    """Distinct unsigned 64-bit node ids of partitions ``0..num_nodes-1``, a function of ``seed``
    (Flower draws them at random)."""
    return PartitionNodes(num_nodes, seed).node_ids()


# ---- executors ----------------------------------------------------------------------------------
class Executor(Protocol):
    """Runs a batch of deliveries; returns the replies in the same order."""

    def execute(self, deliveries: Sequence[tuple[LocalNode, Message]]) -> list[Message]: ...

    def close(self) -> None: ...


class SequentialExecutor:
    """Each delivery in turn, in this process (the default)."""

    def __init__(self, client_app: ClientApp, options: DeliveryOptions) -> None:
        self.client_app, self.options = client_app, options

    def execute(self, deliveries: Sequence[tuple[LocalNode, Message]]) -> list[Message]:
        with KeptGenerators(self.options.threads):
            return [deliver(self.client_app, node, message, self.options) for node, message in deliveries]

    def close(self) -> None:
        pass


class BatchingExecutor:
    """Offers each batch of same-type messages to the ClientApp's batch handler first.

    The handler (see :data:`BATCH_HANDLER_ATTR`) gets copies of the messages and the node contexts;
    it returns one reply per message, or None to decline, in which case ``fallback`` runs them.
    """

    def __init__(self, client_app: ClientApp, options: DeliveryOptions, fallback: Executor) -> None:
        self.handler = getattr(client_app, BATCH_HANDLER_ATTR, None)
        if self.handler is None:
            from fedsim.engines.federated.local.vectorised import handler_for

            self.handler = handler_for(client_app)
        if self.handler is None:
            raise FedsimError("vectorised clients need fedsim's own ClientApp (it has no batch handler); "
                              "set federated.vectorise = false for other apps")
        self.options, self.fallback = options, fallback
        self.batches, self.declined = 0, 0

    def execute(self, deliveries: Sequence[tuple[LocalNode, Message]]) -> list[Message]:
        kinds = {message.metadata.message_type for _, message in deliveries}
        if len(deliveries) > 1 and len(kinds) == 1:
            incoming = [fp.clone_message(m, copy_records(m.content)) for _, m in deliveries]
            contexts = [node.context for node, _ in deliveries]
            first_node, first_message = deliveries[0]
            try:
                with IsolatedRandomness(delivery_seed(self.options, first_node, first_message), self.options.threads):
                    replies = self.handler(incoming, contexts)
            except Exception as exc:  # noqa: BLE001 - one by one, each failure becomes its own Error reply
                log.warning("batch handler failed (%r); delivering the %d messages one by one", exc, len(incoming))
                replies = None
            if replies is not None:
                if len(replies) != len(deliveries):
                    raise FedsimError(f"batch handler returned {len(replies)} replies for {len(deliveries)} messages")
                self.batches += 1
                return [fp.clone_message(r, copy_records(r.content)) if r.has_content() else r for r in replies]
            self.declined += 1
        return self.fallback.execute(deliveries)

    def close(self) -> None:
        self.fallback.close()


# ---- the grid -----------------------------------------------------------------------------------
class LocalGrid(Grid):
    """A :class:`flwr.serverapp.Grid` whose SuperNodes are ClientApp calls in this process.

    Parameters
    ----------
    client_app: the ClientApp every node runs.
    num_supernodes: number of nodes (= partitions).
    run_config: the run config each node's Context carries (``[tool.flwr.app.config]``).
    seed: keys node ids and every client call's random generators.
    node_config_fn: extra node-config entries for ``(partition_id, num_partitions)``.
    executor: how deliveries run (default: sequential in this process).
    run_id: Flower run id (default: derived from the seed).
    client_threads: if > 0, torch threads during each client call.

    Notes
    -----
    ``push_messages`` runs the ClientApps before it returns, so every reply is available to the
    next ``pull_messages``; ``send_and_receive``'s ``timeout`` therefore never cuts a round short.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_supernodes: int,
        run_config: dict[str, Any] | None = None,
        *,
        seed: int = 0,
        node_config_fn: NodeConfigFn | None = None,
        executor: Executor | None = None,
        run_id: int | None = None,
        client_threads: int = 0,
    ) -> None:
        if num_supernodes < 1:
            raise FedsimError(f"num_supernodes must be >= 1 (got {num_supernodes})")
        self.client_app = client_app
        self.run_config = dict(run_config or {})
        self.seed = seed
        self.run_id = run_id if run_id is not None else derive_seed("local-grid-run", seed) % 2**62
        self.options = DeliveryOptions(seed=seed, threads=client_threads)
        self.executor: Executor = executor or SequentialExecutor(client_app, self.options)
        self._run: fp.Run | None = None
        self.num_supernodes = num_supernodes
        self.node_config_fn = node_config_fn
        self.partitions = PartitionNodes(num_supernodes, seed)
        self.nodes: dict[int, LocalNode] = {}
        """The nodes that exist: made when first sent a message, kept while their Context holds state
        (a million registered SuperNodes cost nothing until sampled, as a Context that holds
        nothing is the one a node would get anew)."""
        self._replies: dict[str, Message] = {}
        self._message_counter = itertools.count(1)
        self.stats = {"messages": 0, "errors": 0, "client_time_s": 0.0}

    # -- Grid API --
    def set_run(self, run: fp.Run) -> None:
        if not isinstance(run, fp.Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> fp.Run:
        if self._run is None:
            raise RuntimeError("LocalGrid.set_run has not been called")
        return fp.Run(**vars(self._run))

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return self.partitions.node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        deliveries: list[tuple[LocalNode, Message]] = []
        ids: list[str] = []
        for message in messages:
            meta = message.metadata
            if meta.reply_to_message_id != "" or meta.ttl <= 0 or meta.delivered_at != "":
                raise ValueError(f"Invalid message: {message}")
            node = self._node(meta.dst_node_id)
            if node is None:  # Flower's link state refuses such a message and returns no id
                log.error("message for unknown node %s dropped", meta.dst_node_id)
                continue
            message_id = self._next_id()
            fp.set_message_id(message, message_id)
            deliveries.append((node, message))
            ids.append(message_id)
        if deliveries:
            started = time.perf_counter()
            replies = self.executor.execute(deliveries)
            self.stats["client_time_s"] += time.perf_counter() - started
            for (node, message), reply in zip(deliveries, replies, strict=True):
                fp.set_message_id(reply, self._next_id())
                self._replies[message.metadata.message_id] = reply
                self.stats["messages"] += 1
                self.stats["errors"] += int(reply.has_error())
                if not len(node.context.state):
                    self.nodes.pop(node.node_id, None)  # nothing to keep: made anew when next sampled
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # -- fedsim --
    def _next_id(self) -> str:
        """A message id unique in this grid (32 hex digits, like the uuid4s of Flower's in-memory link
        state, which cost ~4 us each; nothing reads more into an id than its identity)."""
        return f"{self.run_id:016x}{next(self._message_counter):016x}"

    def node_map(self) -> PartitionNodes:
        """Partition <-> node, for fedsim's round loop (no discovery round over every node)."""
        return self.partitions

    def _node(self, node_id: int) -> LocalNode | None:
        """The node of ``node_id``, made with a fresh Context on its first message; None if no such node."""
        node = self.nodes.get(node_id)
        if node is not None:
            return node
        partition_id = self.partitions.partition_of(node_id)
        if partition_id is None:
            return None
        node_config: dict[str, Any] = {fp.PARTITION_ID_KEY: partition_id, fp.NUM_PARTITIONS_KEY: self.num_supernodes}
        if self.node_config_fn is not None:
            node_config.update(self.node_config_fn(partition_id, self.num_supernodes))
        context = Context(run_id=self.run_id, node_id=node_id, node_config=node_config, state=RecordDict(),
                          run_config=dict(self.run_config))
        node = LocalNode(node_id, partition_id, context, dict(self.run_config))
        self.nodes[node_id] = node
        return node

    def close(self) -> None:
        self.executor.close()


def make_executor(client_app: ClientApp, options: DeliveryOptions, *, workers: int = 0, vectorise: bool = False,
                  client_app_ref: str | None = None, app_dir: str | None = None) -> Executor:
    """Sequential, a worker pool (``workers`` > 0) and/or vectorised batches (``vectorise``)."""
    executor: Executor
    if workers > 0:
        from fedsim.engines.federated.local.pool import PoolExecutor

        executor = PoolExecutor(client_app, options, workers=workers, client_app_ref=client_app_ref,
                                app_dir=app_dir)
    else:
        executor = SequentialExecutor(client_app, options)
    if vectorise:
        executor = BatchingExecutor(client_app, options, executor)
    return executor


def run_local(
    server_app: ServerApp,
    client_app: ClientApp,
    num_supernodes: int,
    run_config: dict[str, Any] | None = None,
    node_config_fn: NodeConfigFn | None = None,
    *,
    seed: int = 0,
    workers: int = 0,
    vectorise: bool = False,
    client_threads: int = 0,
    client_app_ref: str | None = None,
    app_dir: str | None = None,
    grid_hook: Callable[[LocalGrid], None] | None = None,
) -> Context:
    """Run a Flower ServerApp against ``num_supernodes`` in-process ClientApps; return the server Context.

    The counterpart of ``flwr.simulation.run_simulation(server_app, client_app, num_supernodes)``
    with the run config passed explicitly (``run_simulation`` from Python passes none).

    Parameters
    ----------
    server_app, client_app: the Flower apps, unchanged.
    num_supernodes: number of simulated SuperNodes (partitions).
    run_config: the app's run config (see :func:`fedsim.engines.federated.flower_run.read_app_config`).
    node_config_fn: extra node-config entries per ``(partition_id, num_partitions)``.
    seed: keys node ids, the server's python ``random`` (stock strategies sample nodes with it) and
        each client call's generators.
    workers: > 0 runs client calls in that many worker processes (:mod:`fedsim.engines.federated.local.pool`).
    vectorise: offer batches of messages to the ClientApp's batch handler (fedsim's own ClientApp).
    client_threads: if > 0, torch threads in each client call (1 for bitwise comparisons).
    client_app_ref: ``module:attribute`` of the ClientApp, for worker processes (else it is pickled).
    app_dir: folder to put on ``sys.path`` in worker processes (third-party apps).
    grid_hook: called with the grid before the ServerApp starts (tests and benchmarks read its stats).
    """
    options = DeliveryOptions(seed=seed, threads=client_threads)
    executor = make_executor(client_app, options, workers=workers, vectorise=vectorise,
                             client_app_ref=client_app_ref, app_dir=app_dir)
    grid = LocalGrid(client_app, num_supernodes, run_config, seed=seed, node_config_fn=node_config_fn,
                     executor=executor, client_threads=client_threads)
    try:
        run = fp.make_run(grid.run_id)
        grid.set_run(run)
        context = Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(),
                          run_config=dict(grid.run_config))
        if grid_hook is not None:
            grid_hook(grid)
        random.seed(derive_seed("local-grid-server", seed))
        # In one process nobody reads np.save bytes: arrays stay arrays (fp.LazyArray) for every app.
        with fp.task_identity(run_id=grid.run_id, node_id=fp.SUPERLINK_NODE_ID), fp.zero_copy_arrays():
            server_app(grid=grid, context=context)
        return context
    finally:
        grid.close()

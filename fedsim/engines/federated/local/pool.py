"""A pool of W worker processes for the local grid's client calls.

Each worker loads the ClientApp once (by ``module:attribute`` reference, or unpickled from the
parent) and then runs deliveries exactly as the sequential executor does
(:func:`fedsim.engines.federated.local.delivery.deliver`): the node's Context travels with the message and the
updated Context comes back with the reply, as with Flower's Ray actors. Workers are started with
``spawn`` (forking a process that already runs torch threads can deadlock) and each gets
``cpu_count // W`` torch threads unless told otherwise, so W workers never oversubscribe the box.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsim.engines.federated.local.delivery import DeliveryOptions, LocalNode, deliver
from fedsim.errors import FedsimError
from fedsim.registry import import_object
from fedsim.wire import flower_private as fp

__all__ = ["PoolExecutor"]

_APP: ClientApp | None = None
_OPTIONS: DeliveryOptions | None = None


def _init_worker(app_ref: str | None, app_bytes: bytes | None, paths: list[str], options: DeliveryOptions,
                 threads: int) -> None:
    global _APP, _OPTIONS
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)
    import torch

    torch.set_num_threads(threads)
    fp.install_zero_copy_arrays()  # as in the parent's local engine: the worker serves nothing else
    if app_ref is not None:
        _APP = import_object(app_ref)
    else:
        _APP = pickle.loads(app_bytes)  # type: ignore[arg-type]
    _OPTIONS = options


def _work(batch: list[tuple[int, int, Context, dict[str, Any], Message]]) -> list[tuple[Message, Context]]:
    """Deliver a run of consecutive messages in this worker; each reply comes back with its node's Context."""
    assert _APP is not None and _OPTIONS is not None, "worker not initialised"
    results = []
    latest: dict[int, Context] = {}  # a node sent two messages in one batch sees its first call's state
    for node_id, partition_id, context, initial_run_config, message in batch:
        node = LocalNode(node_id, partition_id, latest.get(node_id, context), initial_run_config)
        results.append((deliver(_APP, node, message, _OPTIONS), node.context))
        latest[node_id] = node.context
    return results


def _ping() -> int:
    return os.getpid()


class PoolExecutor:
    """Runs each batch of deliveries on ``workers`` processes; replies come back in message order.

    Parameters
    ----------
    client_app: the ClientApp (pickled for the workers when ``client_app_ref`` is not given).
    options: seeding and threads of each call (as in the sequential executor).
    workers: number of processes W.
    client_app_ref: ``module:attribute`` the workers import the ClientApp from.
    app_dir: a folder the workers put first on ``sys.path`` (third-party apps).
    timeout_s: longest a single client call may take before the run fails.
    """

    def __init__(self, client_app: ClientApp, options: DeliveryOptions, *, workers: int,
                 client_app_ref: str | None = None, app_dir: str | None = None, timeout_s: float = 900.0) -> None:
        if workers < 1:
            raise FedsimError(f"federated.worker_processes must be >= 1 for a pool (got {workers})")
        app_bytes = None
        if client_app_ref is None:
            try:
                app_bytes = pickle.dumps(client_app)
            except Exception as exc:  # noqa: BLE001 - any pickling failure means the same thing here
                raise FedsimError("worker processes need the ClientApp by reference: define it at module level "
                                  f"and pass its 'module:attribute' ({exc})") from exc
        threads = options.threads or max(1, (os.cpu_count() or 1) // workers)
        paths = [p for p in ([app_dir] if app_dir else []) + sys.path if p]
        self.workers = workers
        self.timeout_s = timeout_s
        self.pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker,
            initargs=(client_app_ref, app_bytes, paths, options, threads))
        # Start every worker now so that start-up is not billed to the first round.
        for future in [self.pool.submit(_ping) for _ in range(workers)]:
            future.result(timeout=timeout_s)

    def execute(self, deliveries: Sequence[tuple[LocalNode, Message]]) -> list[Message]:
        # Contiguous runs of messages, two per worker: one round trip per run instead of per call (a call
        # of a small client is ~1 ms, a round trip ~0.3 ms), and a slow run leaves the other worker busy.
        # Replies are read back in message order, so aggregation sees them as sequential delivery makes them.
        runs = max(1, min(len(deliveries), 2 * self.workers))
        if len({node.node_id for node, _ in deliveries}) < len(deliveries):
            runs = 1  # a node with two messages: its calls run in order, in one worker
        size = -(-len(deliveries) // runs)
        chunks = [deliveries[start:start + size] for start in range(0, len(deliveries), size)]
        futures = [self.pool.submit(_work, [(node.node_id, node.partition_id, node.context, node.initial_run_config,
                                             message) for node, message in chunk]) for chunk in chunks]
        replies = []
        try:
            for chunk, future in zip(chunks, futures, strict=True):
                for (node, _), (reply, context) in zip(chunk, future.result(timeout=self.timeout_s * len(chunk)),
                                                       strict=True):
                    node.context = context
                    replies.append(reply)
        except BrokenProcessPool as exc:
            raise FedsimError(f"a client worker process died ({exc}); see its output above") from exc
        return replies

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

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
    if app_ref is not None:
        _APP = import_object(app_ref)
    else:
        _APP = pickle.loads(app_bytes)  # type: ignore[arg-type]
    _OPTIONS = options


def _work(node_id: int, partition_id: int, context: Context, initial_run_config: dict[str, Any],
          message: Message) -> tuple[Message, Context]:
    assert _APP is not None and _OPTIONS is not None, "worker not initialised"
    node = LocalNode(node_id, partition_id, context, initial_run_config)
    reply = deliver(_APP, node, message, _OPTIONS)
    return reply, node.context


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
        futures = [self.pool.submit(_work, node.node_id, node.partition_id, node.context, node.initial_run_config,
                                    message) for node, message in deliveries]
        replies = []
        try:
            for (node, _), future in zip(deliveries, futures, strict=True):
                reply, context = future.result(timeout=self.timeout_s)
                node.context = context
                replies.append(reply)
        except BrokenProcessPool as exc:
            raise FedsimError(f"a client worker process died ({exc}); see its output above") from exc
        return replies

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

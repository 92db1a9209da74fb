"""The one way fedsim's engines start, attach to and shut down Ray (parameter server, Ray Train).

* A caller's session (``ray.is_initialized()``, e.g. a notebook or a test fixture) is used as it is
  and left running.
* ``address`` attaches to a running cluster (``fedsim cluster up --ray``); on a local cluster
  (127.0.0.x) the driver attaches to the head's raylet, so that it outlives a lost worker node.
* Otherwise a fresh local Ray (``address="local"``, even when ``RAY_ADDRESS`` points elsewhere).

Whatever this module started, it shuts down, and nothing else. Workers get one import path: the
working directory first (users' ``module:attribute`` tasks live beside their experiment files, as
for the CLI), then the driver's ``sys.path``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ray_session", "worker_pythonpath"]


def worker_pythonpath() -> str:
    """The ``PYTHONPATH`` Ray workers get: the working directory, then the driver's import path."""
    paths = [os.getcwd(), *(p for p in sys.path if p and os.path.isdir(p))]
    return os.pathsep.join(dict.fromkeys(paths))


@contextmanager
def ray_session(address: str = "", *, num_cpus: int | None = None, log_to_driver: bool = False,
                env_vars: dict[str, str] | None = None) -> Iterator[bool]:
    """Ray for the duration of the block; yields True when this call started (and will stop) it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        yield False
        return
    runtime_env = {"env_vars": {"PYTHONPATH": worker_pythonpath(), "RAY_USAGE_STATS_ENABLED": "0",
                                **(env_vars or {})}}
    if address:
        host = address.removeprefix("ray://").rpartition(":")[0]
        local = {"_node_ip_address": host} if host.startswith("127.") else {}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver, **local)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=log_to_driver)
    try:
        yield True
    finally:
        ray.shutdown()  # exactly the session this call started

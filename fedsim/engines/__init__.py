"""Engine registry: mode -> ``module:function`` with the signature ``run(run, ctx) -> summary``.

Lazy strings so that a central run never imports Flower or Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedsim.errors import FedsimError
from fedsim.registry import import_object

ENGINES: dict[str, str] = {
    "central": "fedsim.engines.central:run_central",
    "federated": "fedsim.engines.federated.engine:run_federated",
    "ddp": "fedsim.engines.parallel.ddp:run_ddp",
    "pipeline": "fedsim.engines.parallel.pipeline:run_pipeline",
    "parameter_server": "fedsim.engines.parameter_server:run_parameter_server",
    "decentralized": "fedsim.engines.gossip.decentralized:run_decentralized",
}

__all__ = ["ENGINES", "engine_for"]


def engine_for(mode: str) -> Callable[..., dict[str, Any]]:
    if mode not in ENGINES:
        raise FedsimError(f"unknown mode '{mode}'; known: {', '.join(sorted(ENGINES))}")
    return import_object(ENGINES[mode])

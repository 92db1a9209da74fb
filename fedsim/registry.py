"""Resolving ``module:attribute`` strings, the one way users plug in tasks, datasets and apps."""

from __future__ import annotations

import importlib
from typing import Any

from fedsim.errors import FedsimError

# Modules that moved when fedsim's packages were given one folder per family (old -> new). Experiment
# files and apps written before still name the old ``module:attribute`` paths; they keep working.
MOVED_MODULES: dict[str, str] = {
    "fedsim.tasklib.part_a": "fedsim.tasks.part_a",
    "fedsim.tasklib.mae": "fedsim.tasks.mae",
    "fedsim.tasklib.fewshot": "fedsim.tasks.fewshot",
    "fedsim.tasklib.mae_report": "fedsim.reports.mae",
    "fedsim.tasklib.fewshot_report": "fedsim.reports.fewshot",
    "fedsim.compare": "fedsim.reports.compare",
    "fedsim.part_a_report": "fedsim.reports.part_a",
    "fedsim.partition_report": "fedsim.reports.partitions",
    "fedsim.topology_report": "fedsim.reports.topologies",
    "fedsim.topology": "fedsim.engines.gossip.topology",
    "fedsim.flower_run": "fedsim.engines.federated.flower_run",
    "fedsim.engines.flower_app": "fedsim.engines.federated.flower_app",
    "fedsim.engines.federated": "fedsim.engines.federated.engine",
    "fedsim.engines.fed_rounds": "fedsim.engines.federated.rounds",
    "fedsim.engines.fed_fewshot": "fedsim.engines.federated.fewshot",
    "fedsim.engines.local_grid": "fedsim.engines.federated.local.grid",
    "fedsim.engines.local_pool": "fedsim.engines.federated.local.pool",
    "fedsim.engines.vectorised": "fedsim.engines.federated.local.vectorised",
    "fedsim.engines.array_codec": "fedsim.wire.array_codec",
    "fedsim.engines.flower_private": "fedsim.wire.flower_private",
    "fedsim.engines.ddp": "fedsim.engines.parallel.ddp",
    "fedsim.engines.pipeline": "fedsim.engines.parallel.pipeline",
    "fedsim.engines.pipeline_split": "fedsim.engines.parallel.pipeline_split",
    "fedsim.engines.ray_train": "fedsim.engines.parallel.ray_train",
    "fedsim.engines.launch": "fedsim.engines.parallel.launch",
    "fedsim.engines.decentralized": "fedsim.engines.gossip.decentralized",
    "fedsim.procs": "fedsim.ops.procs",
    "fedsim.cluster": "fedsim.ops.cluster",
    "fedsim.certs": "fedsim.ops.certs",
}
"""Only a module named exactly (``module:attr``) is redirected; new code uses the new paths."""


def import_object(spec: str) -> Any:
    """Import ``package.module:attr.sub`` and return the attribute, with a clear error if absent.

    A module that moved (:data:`MOVED_MODULES`) is looked up at its new place.
    """
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise FedsimError(f"'{spec}' is not of the form module:attribute")
    module_name = MOVED_MODULES.get(module_name, module_name)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise FedsimError(f"cannot import module '{module_name}' (from '{spec}'): {exc}") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise FedsimError(f"module '{module_name}' has no attribute '{attr_path}' (from '{spec}')")
        obj = getattr(obj, part)
    return obj

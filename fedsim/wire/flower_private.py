"""Every Flower name outside its public API that the local engine touches, in one place.

Flower 1.42's public ``Grid`` interface cannot be implemented with public names alone: a message
can only be created once ``TaskIdentity`` knows the run and the node, ``Grid.set_run`` takes a
``Run``, message ids are a read-only property that Flower's own in-memory grid sets through
``metadata.__dict__``, and the error codes and node-config keys live in ``flwr.common.constant``.
Keeping them here (and :func:`check_private_api` plus its test) means a Flower upgrade that moves
or renames one of them fails loudly in one test instead of subtly at run time.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common.constant import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SUPERLINK_NODE_ID,
    ErrorCode,
    SType,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as _SECAGG_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE as _SECAGG_STATE
from flwr.common.secure_aggregation.secaggplus_constants import Key as _SecAggKey
from flwr.common.secure_aggregation.secaggplus_constants import Stage as _SecAggStage
from flwr.compat.common.recorddict_compat import (
    fitins_to_recorddict,
    fitres_to_recorddict,
    recorddict_to_fitins,
    recorddict_to_fitres,
)
from flwr.server.client_proxy import ClientProxy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD as WORKFLOW_CONFIGS_RECORD
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD as WORKFLOW_PARAMS_RECORD
from flwr.server.workflow.constant import Key as _WorkflowKey
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = [
    "Run", "SUPERLINK_NODE_ID", "PARTITION_ID_KEY", "NUM_PARTITIONS_KEY", "CLIENT_APP_RAISED_EXCEPTION",
    "NODE_UNAVAILABLE", "make_run", "task_identity", "set_message_id", "clone_message", "check_private_api",
    "FLOWER_VERSION_TESTED", "run_flower_simulation", "copy_array", "make_array",
    "array_record_of", "KEY_CLIPPING_NORM",
]

__all__ += [  # SecAgg+ (fedsim.engines.federated.secagg)
    "SECAGG_CONFIGS_RECORD", "SECAGG_STATE_RECORD", "SECAGG_STAGE_KEY", "SECAGG_STAGES", "SECAGG_SETUP",
    "SECAGG_COLLECT_MASKED_VECTORS", "SECAGG_UNMASK", "SECAGG_STATE_FIELDS", "WORKFLOW_CONFIGS_RECORD",
    "WORKFLOW_PARAMS_RECORD", "WORKFLOW_ROUND_KEY", "ClientProxy", "fitins_to_recorddict", "recorddict_to_fitins",
    "fitres_to_recorddict", "recorddict_to_fitres",
]

FLOWER_VERSION_TESTED = "1.42.0"
"""The Flower release these names were read from (``tests/test_local_grid_private.py`` checks them)."""

CLIENT_APP_RAISED_EXCEPTION: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
NODE_UNAVAILABLE: int = ErrorCode.NODE_UNAVAILABLE

# ---- SecAgg+ (fedsim.engines.federated.secagg) ----------------------------------------------------------
# Flower 1.42 exports ``SecAggPlusWorkflow``, ``secaggplus_mod`` and ``LegacyContext``, but not the record
# names of the protocol's messages, the converters to and from the legacy ``FitIns``/``FitRes`` layout
# (``fitins.*``/``fitres.*``) the mod reads and writes, ``ClientProxy`` (what legacy ``configure_fit``
# returns), nor the records the workflow reads the round and the parameters from.
SECAGG_CONFIGS_RECORD: str = _SECAGG_CONFIGS
"""The ConfigRecord every SecAgg+ message and reply carries (``secaggplus_configs``)."""
SECAGG_STATE_RECORD: str = _SECAGG_STATE
"""The ConfigRecord of the client's ``Context.state`` where ``secaggplus_mod`` keeps its keys between stages."""
SECAGG_STAGE_KEY: str = _SecAggKey.STAGE
SECAGG_STAGES: tuple[str, ...] = tuple(_SecAggStage.all())
SECAGG_SETUP: str = _SecAggStage.SETUP
SECAGG_COLLECT_MASKED_VECTORS: str = _SecAggStage.COLLECT_MASKED_VECTORS
"""The stage in which the mod calls the ClientApp (training) and uploads the masked vector."""
SECAGG_UNMASK: str = _SecAggStage.UNMASK
SECAGG_STATE_FIELDS = ("max_weight", "clipping_range")
"""Fields of the mod's stored state (``SecAggPlusState``) that fedsim's client reads (to warn before clipping)."""
WORKFLOW_ROUND_KEY: str = _WorkflowKey.CURRENT_ROUND
"""The workflow reads the round from ``context.state[WORKFLOW_CONFIGS_RECORD][WORKFLOW_ROUND_KEY]`` and the
global parameters from ``context.state[WORKFLOW_PARAMS_RECORD]``."""


def make_run(run_id: int, override_config: dict[str, Any] | None = None, task_id: int = 1) -> Run:
    """A ``Run`` record as ``run_simulation`` builds one for its Python entry point."""
    run = Run.create_empty(run_id=run_id)
    run.override_config = dict(override_config or {})
    run.primary_task_id = task_id
    return run


@contextmanager
def task_identity(run_id: int, node_id: int = SUPERLINK_NODE_ID, task_id: int = 1) -> Iterator[None]:
    """Set Flower's process-wide task identity (``Message(...)`` reads it) and restore it after.

    ``run_simulation`` sets the same three values for its legacy Python API; restoring the previous
    ones lets a local run happen inside (or next to) another Flower run in the same process.
    """
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id = task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def set_message_id(message: Message, message_id: str) -> None:
    """Give a message its id, as the SuperLink (and Flower's ``InMemoryGrid``) does on arrival."""
    message.metadata.__dict__["_message_id"] = message_id


def copy_array(array: Array) -> Array:
    """A new ``Array`` sharing the (immutable) ``bytes`` payload, without re-running ``__init__``.

    ``Array(dtype=..., shape=..., stype=..., data=...)`` validates and goes through a custom
    ``__setattr__`` (~13 us each); copying the instance dict is ~20x cheaper, which matters at
    tens of arrays per message. The chunk cache (views into the same bytes) is left out.
    """
    new = object.__new__(type(array))
    new.__dict__.update({k: v for k, v in array.__dict__.items() if k != "_chunks"})
    return new


def make_array(dtype: str, shape: tuple[int, ...], data: bytes) -> Array:
    """An ``Array`` of serialised NumPy bytes, built as its ``__init__`` ends (without the checks).

    ``Array(dtype=..., shape=..., stype=..., data=...)`` spends ~13 us validating arguments and in
    ``__setattr__``; a reply of a small model carries tens of arrays every round.
    """
    new = object.__new__(Array)
    new.__dict__.update({"dtype": dtype, "shape": shape, "stype": SType.NUMPY, "data": data, "_is_dirty": True})
    return new


def array_record_of(arrays: dict[str, Array]) -> ArrayRecord:
    """An ``ArrayRecord`` holding ``arrays`` (already valid ``Array`` objects), without per-item checks.

    ``record[name] = array`` type-checks key and value through ``TypedDict.__setitem__``; copying a
    message of tens of arrays twice per client that way costs more than the client's bookkeeping.
    """
    record = ArrayRecord()
    record.__dict__["_data"].update(arrays)
    record.is_dirty = True
    return record


def clone_message(message: Message, content: RecordDict) -> Message:
    """A new message with a copy of ``message``'s metadata and the given content.

    What a SuperNode hands its ClientApp is a deserialised copy; the client may then replace
    ``message.content`` or edit the metadata without touching the server's object.
    """
    return Message(content=content, metadata=copy.copy(message.metadata))


def run_flower_simulation(
    server_app: Any,
    client_app: Any,
    num_supernodes: int,
    run_config: dict[str, Any] | None = None,
    *,
    app_dir: str | None = None,
    backend_config: dict[str, Any] | None = None,
    run_id: int = 4242,
) -> Any:
    """Flower's ``run_simulation`` (Ray backend) with a run config; returns the server's final Context.

    The public ``run_simulation`` gives every app an empty run config. This is the call behind it
    (``_run_simulation``) with the run's ``override_config`` set, ``app_dir`` for the ClientApps
    to fuse it with the app's pyproject (as ``flwr run`` does) and an explicit server Context.
    Without ``app_dir`` the ClientApps' run config is empty, as with ``run_simulation``.
    """
    from flwr.app import Context
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    config = dict(run_config or {})
    run = make_run(run_id, config if app_dir else {})
    run.federation_id = NOOP_FEDERATION_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(config))
    with task_identity(run_id=run_id):
        result = _run_simulation(
            num_supernodes=num_supernodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app, server_app=server_app, backend_config=backend_config,
            server_app_context=context, app_dir=app_dir or "", run=run, is_app=bool(app_dir))
    return result.context


def check_private_api() -> None:
    """Exercise every private name above; raise AssertionError/AttributeError if Flower changed them."""
    import flwr

    assert isinstance(SUPERLINK_NODE_ID, int)
    assert (PARTITION_ID_KEY, NUM_PARTITIONS_KEY) == ("partition-id", "num-partitions")
    assert isinstance(CLIENT_APP_RAISED_EXCEPTION, int) and isinstance(NODE_UNAVAILABLE, int)
    run = make_run(12345, {"a": 1})
    assert run.run_id == 12345 and run.override_config == {"a": 1}
    with task_identity(run_id=12345):
        message = Message(RecordDict(), 7, "train", group_id="1")
        assert message.metadata.run_id == 12345 and message.metadata.src_node_id == SUPERLINK_NODE_ID
        set_message_id(message, "abc")
        assert message.metadata.message_id == "abc"
        clone = clone_message(message, RecordDict())
        assert clone.metadata.message_id == "abc" and clone.metadata is not message.metadata
    original = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"12345678")
    copied = copy_array(original)
    assert copied is not original and copied.data is original.data and copied.shape == (2,)
    assert copied.dtype == "float32" and copied.stype == "numpy.ndarray"
    made = make_array("float32", (2,), b"12345678")
    assert made.__dict__ == Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"12345678").__dict__
    assert made.object_id == original.object_id
    record = array_record_of({"w": made})
    assert dict(record) == {"w": made} and record.is_dirty and isinstance(record, ArrayRecord)
    record["v"] = copied  # still a working record after the bypass
    assert list(record.keys()) == ["w", "v"]
    assert KEY_CLIPPING_NORM == "clipping_norm"  # the config key Flower's client-side DP wrapper writes
    _check_secagg_names()
    assert flwr.__version__, "flwr has no version"


def _check_secagg_names() -> None:
    """The SecAgg+ names: the stage key and order the workflow and the mod agree on, the mod's state fields,
    what the workflow reads and calls, and the legacy layout's round trip."""
    import dataclasses
    import inspect

    from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
    from flwr.common import Code, FitIns, FitRes, Parameters, Status
    from flwr.server.workflow import SecAggPlusWorkflow

    assert (SECAGG_CONFIGS_RECORD, SECAGG_STATE_RECORD, SECAGG_STAGE_KEY) == (
        "secaggplus_configs", "secaggplus_state", "stage")
    assert SECAGG_STAGES == (SECAGG_SETUP, "share_keys", SECAGG_COLLECT_MASKED_VECTORS, SECAGG_UNMASK)
    assert {f.name for f in dataclasses.fields(SecAggPlusState)} >= {"current_stage", *SECAGG_STATE_FIELDS}
    assert SecAggPlusState().current_stage == SECAGG_UNMASK  # no stored state = the state after a completed round
    workflow = inspect.getsource(SecAggPlusWorkflow)
    for used in ("MAIN_CONFIGS_RECORD", "MAIN_PARAMS_RECORD", "WorkflowKey.CURRENT_ROUND", "random.shuffle",
                 "context.strategy.configure_fit", "context.strategy.aggregate_fit", "fitres.parameters = parameters"):
        assert used in workflow, f"SecAggPlusWorkflow no longer uses {used}"
    assert (WORKFLOW_CONFIGS_RECORD, WORKFLOW_PARAMS_RECORD, WORKFLOW_ROUND_KEY) == (
        "config", "parameters", "current_round")
    params = Parameters(tensors=[b"ab", b"cd"], tensor_type="numpy.ndarray")
    ins = recorddict_to_fitins(fitins_to_recorddict(FitIns(params, {"x": 1}), True), True)
    assert ins.parameters.tensors == [b"ab", b"cd"] and ins.config == {"x": 1}
    res = recorddict_to_fitres(fitres_to_recorddict(FitRes(Status(Code.OK, ""), params, 7, {"m": 0.5}), True), True)
    assert (res.parameters.tensors, res.num_examples, res.metrics) == ([b"ab", b"cd"], 7, {"m": 0.5})
    assert "node_id" in ClientProxy.__annotations__

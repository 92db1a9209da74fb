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
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = [
    "Run", "SUPERLINK_NODE_ID", "PARTITION_ID_KEY", "NUM_PARTITIONS_KEY", "CLIENT_APP_RAISED_EXCEPTION",
    "NODE_UNAVAILABLE", "make_run", "task_identity", "set_message_id", "clone_message", "check_private_api",
    "FLOWER_VERSION_TESTED", "run_flower_simulation", "copy_array", "make_array",
    "array_record_of",
]

FLOWER_VERSION_TESTED = "1.42.0"
"""The Flower release these names were read from (``tests/test_local_grid_private.py`` checks them)."""

CLIENT_APP_RAISED_EXCEPTION: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
NODE_UNAVAILABLE: int = ErrorCode.NODE_UNAVAILABLE


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
    assert flwr.__version__, "flwr has no version"

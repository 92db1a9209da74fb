"""Every Flower name outside its public API that the local engine touches, in one place.

Flower 1.42's public ``Grid`` interface cannot be implemented with public names alone: a message
can only be created once ``TaskIdentity`` knows the run and the node, ``Grid.set_run`` takes a
``Run``, message ids are a read-only property that Flower's own in-memory grid sets through
``metadata.__dict__``, and the error codes and node-config keys live in ``flwr.common.constant``.
Keeping them here (and :func:`check_private_api` plus its test) means a Flower upgrade that moves
or renames one of them fails loudly in one test instead of subtly at run time.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.app.message.typeddict import TypedDict
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

from fedsim.wire import npy_header

__all__ = [
    "Run", "SUPERLINK_NODE_ID", "PARTITION_ID_KEY", "NUM_PARTITIONS_KEY", "CLIENT_APP_RAISED_EXCEPTION",
    "NODE_UNAVAILABLE", "make_run", "task_identity", "set_message_id", "clone_message", "check_private_api",
    "FLOWER_VERSION_TESTED", "run_flower_simulation", "copy_array", "make_array",
    "array_record_of", "KEY_CLIPPING_NORM", "LazyArray", "lazy_array", "zero_copy_arrays", "install_zero_copy_arrays",
    "zero_copy_installed", "copy_record",
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
    """A new ``Array`` sharing the payload (``bytes``, or a LazyArray's read-only array), without ``__init__``.

    ``Array(dtype=..., shape=..., stype=..., data=...)`` validates and goes through a custom
    ``__setattr__`` (~13 us each); copying the instance dict is ~20x cheaper, which matters at
    tens of arrays per message. The chunk cache (views into the same bytes) is left out.
    """
    new = object.__new__(type(array))
    state = new.__dict__
    state.update(array.__dict__)
    state.pop("_chunks", None)
    return new


def make_array(dtype: str, shape: tuple[int, ...], data: bytes) -> Array:
    """An ``Array`` of serialised NumPy bytes, built as its ``__init__`` ends (without the checks).

    ``Array(dtype=..., shape=..., stype=..., data=...)`` spends ~13 us validating arguments and in
    ``__setattr__``; a reply of a small model carries tens of arrays every round.
    """
    new = object.__new__(Array)
    new.__dict__.update({"dtype": dtype, "shape": shape, "stype": SType.NUMPY, "data": data, "_is_dirty": True})
    return new


def copy_record(record: Any, value_copy: Any = None) -> Any:
    r"""A new record of ``record``'s type (``RecordDict``, ``ArrayRecord``, ``ConfigRecord``, ``MetricRecord``)
    with the same keys and ``value_copy(value)`` (default: the same values), without per-item checks.

    Those four are Flower ``TypedDict``\ s: two check functions and a plain ``_data`` dict in the
    instance dict. Setting items one by one type-checks every key and value (~5 us a record, ~2 us an
    item); the values here are already valid, so the copy is one dict comprehension.
    """
    state = record.__dict__
    new = object.__new__(type(record))
    TypedDict.__init__(new, state["_check_key_fn"], state["_check_value_fn"])
    data = state["_data"]
    new.__dict__["_data"] = {k: value_copy(v) for k, v in data.items()} if value_copy is not None else dict(data)
    if isinstance(new, ArrayRecord):
        new.is_dirty = True
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


# ---- the local engine's array path -----------------------------------------------------------------
# A Flower ``Array`` is ``np.save`` bytes: ``Array(ndarray)`` writes them (np.save into a BytesIO, ~70 us
# for a small layer) and ``Array.numpy()`` parses them again (np.load with an ``ast``-parsed header, ~60 us).
# In one process nobody needs those bytes: a ``LazyArray`` keeps a private, read-only copy of the
# source array (one memcpy, as np.save's) and writes the bytes only when something asks for ``data``
# (Flower's wire, object ids, pickles to other machines). ``install_zero_copy_arrays`` makes Flower's
# own constructors return them, so an unchanged Flower app and Flower's strategies use this path too.
_SNAPSHOT = "_fedsim_ndarray"
"""The ``Array.__dict__`` key of a LazyArray's private copy (Flower's own keys: the four fields,
``_is_dirty``, ``_object_id``, ``_chunks``)."""


class LazyArray(Array):
    """An ``Array`` whose ``np.save`` bytes are made on first access of ``data``; equal to (and, for every
    reader, indistinguishable from) ``Array(ndarray)`` of the same array.

    The copy it holds is read-only and never handed out: ``numpy()`` returns a new array, as
    ``np.load`` does, so neither the sender nor any receiver can change what the others see.
    Setting ``data`` (as ``Array.inflate`` does) drops the copy and makes it an ordinary Array.
    """

    # Flower names an object's type in its serialised header (``__qualname__``) and looks the class up by
    # that name when inflating; as "Array", deflated bytes and object ids are Array(ndarray)'s own.
    __qualname__ = "Array"

    @property  # type: ignore[override]
    def data(self) -> bytes:
        state = self.__dict__
        data = state.get("data")
        if data is None:
            data = npy_header.payload_bytes(state[_SNAPSHOT])
            state["data"] = data  # made once; the copy stays for numpy()
        return data

    @data.setter
    def data(self, value: bytes) -> None:
        self.__dict__.pop(_SNAPSHOT, None)
        self.__dict__["data"] = value

    def numpy(self) -> np.ndarray:
        snapshot = self.__dict__.get(_SNAPSHOT)
        return snapshot.copy() if snapshot is not None else _bytes_to_numpy(self)

    def snapshot(self) -> np.ndarray | None:
        """The read-only array itself (no copy), or None once ``data`` was replaced."""
        return self.__dict__.get(_SNAPSHOT)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Array):
            return NotImplemented
        return (self.dtype, self.shape, self.stype, self.data) == (other.dtype, other.shape, other.stype, other.data)

    __hash__ = None  # type: ignore[assignment]  # as the dataclass Array: mutable, compared by value

    def __reduce__(self) -> tuple[Any, ...]:
        # Unpickled anywhere (a Ray worker, a pool process) as a LazyArray again, from the array alone.
        # The dtype goes as its full string: NumPy's own pickle of a '>i4' array comes back as '<i4'.
        snapshot = self.snapshot()
        if snapshot is None:
            return (make_array, (self.dtype, tuple(self.shape), self.data))
        return (_lazy_array_of_bytes, (snapshot.dtype.str, snapshot.shape, snapshot.tobytes()))


def lazy_array(value: np.ndarray) -> Array:
    """``Array(value)``: a :class:`LazyArray` over a read-only copy of ``value`` where the bytes would be
    header + C-ordered payload, else Flower's own (Fortran order, object or string dtypes...)."""
    if not npy_header.fast_path_dtype(value):
        return _ORIGINAL_FROM_NUMPY.__func__(Array, value)
    snapshot = value.copy()
    snapshot.flags.writeable = False
    new = object.__new__(LazyArray)
    new.__dict__.update({"dtype": _dtype_name(value.dtype), "shape": tuple(value.shape), "stype": SType.NUMPY,
                         _SNAPSHOT: snapshot, "_is_dirty": True})
    return new


_DTYPE_NAMES: dict[np.dtype, str] = {}


def _dtype_name(dtype: np.dtype) -> str:
    """``str(dtype)``, Flower's ``Array.dtype``, looked up (NumPy formats it anew each time: ~3 us, more
    than the rest of a small array's LazyArray)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = str(dtype)
        if len(_DTYPE_NAMES) < 256:
            _DTYPE_NAMES[dtype] = name
    return name


def _lazy_array_of_bytes(dtype: str, shape: tuple[int, ...], payload: bytes) -> Array:
    return lazy_array(np.frombuffer(payload, dtype=np.dtype(dtype)).reshape(shape))


def _bytes_to_numpy(array: Array) -> np.ndarray:
    """``Array.numpy()`` of ordinary bytes, with the header looked up instead of parsed."""
    data = array.data
    length, parsed = npy_header.decode_header(data) if array.stype == SType.NUMPY else (0, None)
    if parsed is None:
        return _ORIGINAL_NUMPY(array)
    dtype, shape, count = parsed
    return np.frombuffer(data, dtype=dtype, count=count, offset=length).reshape(shape).copy()


_ORIGINAL_INIT = Array.__init__
_ORIGINAL_FROM_NUMPY = Array.__dict__["from_numpy_ndarray"]
_ORIGINAL_NUMPY = Array.numpy
_ORIGINAL_FROM_ARRAY_DICT = ArrayRecord.__dict__["from_array_dict"]
_ORIGINAL_HOOKS = (_ORIGINAL_INIT, _ORIGINAL_FROM_NUMPY, _ORIGINAL_NUMPY)


def _array_init(self: Array, *args: Any, **kwargs: Any) -> None:
    """``Array.__init__``: an ndarray or tensor (the one argument) becomes a LazyArray in place."""
    source = args[0] if len(args) == 1 and not kwargs else None
    if source is None and not args and len(kwargs) == 1:
        source = kwargs.get("ndarray", kwargs.get("torch_tensor"))
    if source is not None and not isinstance(source, np.ndarray):
        torch = sys.modules.get("torch")
        try:  # as Array.from_torch_tensor; a tensor NumPy cannot take (bfloat16) gets Flower's own error below
            source = source.detach().cpu().numpy() if torch is not None and isinstance(source, torch.Tensor) else None
        except (TypeError, RuntimeError):
            source = None
    if source is not None and npy_header.fast_path_dtype(source):
        made = lazy_array(source)
        self.__class__ = LazyArray  # type: ignore[assignment]  # same layout: a subclass adding no slots
        self.__dict__.update(made.__dict__)
        return
    _ORIGINAL_INIT(self, *args, **kwargs)


def _from_numpy_ndarray(cls: type[Array], ndarray: np.ndarray) -> Array:
    if not isinstance(ndarray, np.ndarray):
        return _ORIGINAL_FROM_NUMPY.__func__(cls, ndarray)
    return lazy_array(ndarray)


def _from_array_dict(cls: type[ArrayRecord], array_dict: dict[str, Array], *, keep_input: bool = True) -> ArrayRecord:
    """``ArrayRecord({name: Array})``: Flower rebuilds each Array from its fields, reading ``data`` (which
    would make a LazyArray's bytes); a copy of the Array object is the same record."""
    if not all(isinstance(k, str) and isinstance(v, Array) for k, v in array_dict.items()):
        return _ORIGINAL_FROM_ARRAY_DICT.__func__(cls, array_dict, keep_input=keep_input)
    record = array_record_of({k: copy_array(v) for k, v in array_dict.items()})
    if not keep_input:
        array_dict.clear()
    return record


_install_lock = threading.Lock()
_install_depth = 0


def install_zero_copy_arrays() -> None:
    """From now on in this process, Flower's ``Array(ndarray|tensor)``, ``Array.from_numpy_ndarray`` (and so
    ``ArrayRecord(state_dict)``, ``from_torch_state_dict``, stock strategies' aggregates) make LazyArrays,
    and ``Array.numpy()`` of bytes looks its header up. For worker processes; see :func:`zero_copy_arrays`."""
    global _install_depth
    with _install_lock:
        _install_depth += 1
        if _install_depth == 1:
            Array.__init__ = _array_init  # type: ignore[method-assign]
            Array.from_numpy_ndarray = classmethod(_from_numpy_ndarray)  # type: ignore[method-assign,assignment]
            Array.numpy = _bytes_to_numpy  # type: ignore[method-assign]
            ArrayRecord.from_array_dict = classmethod(_from_array_dict)  # type: ignore[method-assign,assignment]


def _uninstall_zero_copy_arrays() -> None:
    global _install_depth
    with _install_lock:
        _install_depth -= 1
        if _install_depth == 0:
            Array.__init__, Array.from_numpy_ndarray, Array.numpy = _ORIGINAL_HOOKS  # type: ignore[method-assign]
            ArrayRecord.from_array_dict = _ORIGINAL_FROM_ARRAY_DICT  # type: ignore[method-assign]


def zero_copy_installed() -> bool:
    return Array.numpy is _bytes_to_numpy


@contextmanager
def zero_copy_arrays() -> Iterator[None]:
    """The LazyArray path while the block runs (re-entrant); Flower's own methods again after.

    It changes Flower's ``Array`` class for the whole process, as the local engine runs Flower's
    apps in this process anyway. LazyArrays made inside stay valid after the block.
    """
    install_zero_copy_arrays()
    try:
        yield
    finally:
        _uninstall_zero_copy_arrays()


def clone_message(message: Message, content: RecordDict) -> Message:
    """A new message with a copy of ``message``'s metadata and the given content.

    What a SuperNode hands its ClientApp is a deserialised copy; the client may then replace
    ``message.content`` or edit the metadata without touching the server's object. Built as
    ``Message.__init__`` ends (its three instance fields) rather than through it: the argument
    checks cost ~10 us, twice per client call, for a message that is already valid.
    """
    metadata = message.metadata
    new_metadata = object.__new__(type(metadata))
    new_metadata.__dict__.update(metadata.__dict__)
    new = object.__new__(Message)
    new.__dict__.update({"_metadata": new_metadata, "_content": content, "_error": message.__dict__["_error"]})
    return new


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
        assert clone.metadata.__dict__ == message.metadata.__dict__ and set(clone.__dict__) == set(message.__dict__)
        assert clone.has_content() and not clone.has_error() and Message(RecordDict(), reply_to=clone)
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
    _check_record_copies(record)
    _check_lazy_arrays()
    assert KEY_CLIPPING_NORM == "clipping_norm"  # the config key Flower's client-side DP wrapper writes
    _check_secagg_names()
    assert flwr.__version__, "flwr has no version"


def _check_record_copies(record: ArrayRecord) -> None:
    """``copy_record`` makes records that behave as Flower's own (TypedDict's instance layout)."""
    from flwr.app import ConfigRecord, MetricRecord

    config, metrics = ConfigRecord({"a": 1, "b": [1, 2]}), MetricRecord({"m": 0.5})
    content = RecordDict({"arrays": record, "config": config, "metrics": metrics})
    copied = copy_record(content, lambda r: copy_record(r, copy_array if isinstance(r, ArrayRecord) else None))
    assert type(copied) is RecordDict and copied is not content and list(copied.keys()) == list(content.keys())
    assert copied["arrays"] is not record and list(copied["arrays"].keys()) == list(record.keys())
    assert copied["config"] == config and copied["metrics"] == metrics and copied["config"] is not config
    copied["config"]["c"] = "new"  # still type-checked after the copy
    assert "c" not in config and copied["config"]["c"] == "new"
    try:
        copied["metrics"]["bad"] = "a string"  # type: ignore[assignment]
    except TypeError:
        pass
    else:
        raise AssertionError("a copied MetricRecord no longer type-checks its values")
    assert copied.array_records and copied.config_records and copied.metric_records


def _check_lazy_arrays() -> None:
    """``LazyArray`` and the installed constructors agree with Flower's ``Array`` byte for byte."""
    import pickle

    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    reference = _ORIGINAL_FROM_NUMPY.__func__(Array, value)
    assert set(reference.__dict__) >= {"dtype", "shape", "stype", "data"}, "Array's instance layout changed"
    with zero_copy_arrays():
        made = [Array(value), Array(ndarray=value), Array.from_numpy_ndarray(value), ArrayRecord([value])["0"]]
        made.append(ArrayRecord({"x": made[0]})["x"])  # Flower rebuilds the Arrays of a dict from their fields
        assert made[-1] is not made[0] and zero_copy_installed()
    assert not zero_copy_installed()
    for lazy in made:
        assert type(lazy) is LazyArray and "data" not in lazy.__dict__
        assert (lazy.dtype, lazy.shape, lazy.stype) == (reference.dtype, reference.shape, reference.stype)
        assert lazy.object_id == reference.object_id and lazy.data == reference.data and lazy == reference
        assert np.array_equal(lazy.numpy(), value) and lazy.numpy().flags.writeable
    assert Array.inflate(made[0].deflate(), made[0].children).data == reference.data
    assert pickle.loads(pickle.dumps(made[1])) == reference
    made[2].data = reference.data  # Array.inflate's way of filling data: the copy goes
    assert made[2].snapshot() is None and np.array_equal(made[2].numpy(), value)


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

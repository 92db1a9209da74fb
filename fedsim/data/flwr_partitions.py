"""Flower Datasets partitioners by name, so a Flower user's partitioning carries over unchanged.

``flwr_partition(split, "DirichletPartitioner", {"alpha": 0.5, "partition_by": "label"}, 10, seed)``
builds ``flwr_datasets.partitioner.DirichletPartitioner(num_partitions=10, partition_by="label",
alpha=0.5, seed=seed)``, hands it the train split's table and returns, for each partition k, the
train-row indices ``partitioner.load_partition(k)`` returns, in its order. The table is
``split.table`` (a Hugging Face data set's train split, so any of its columns can be
``partition_by``) or, for array data, a one-column table ``label`` of the train labels; a hidden
row-number column (:data:`ROW_COLUMN`) is added so the rows can be read back whatever the
partitioner does to the table (sorting, shuffling).

Every horizontal partitioner that ``flwr_datasets.partitioner`` exports can be used (the list is
read from the module, so new ones work), except the abstract ``Partitioner``, the ``Vertical*``
ones (they split columns, not rows) and those that need a Python function
(``IdToSizeFncPartitioner``), which TOML cannot express. ``num_partitions`` is fedsim's client
count, passed to the classes that take it; the others (``NaturalIdPartitioner``,
``SizePartitioner``, ...) decide the count themselves: it is the length of the returned list.
``seed`` is fedsim's seed unless the options set one.
"""

from __future__ import annotations

import collections.abc
import contextlib
import inspect
import types
import typing
from collections.abc import Iterator
from typing import Any

import numpy as np

from fedsim.data.base import DatasetSplit
from fedsim.data.hf import import_datasets
from fedsim.data.partition import partition_labels
from fedsim.errors import FedsimError

__all__ = ["ROW_COLUMN", "flwr_partition", "list_partitioners", "partition_table", "partitioner_class",
           "takes_num_partitions"]

ROW_COLUMN = "__fedsim_row__"
"""The hidden column holding each row's index in the train split."""

_REFUSED = {
    "Partitioner": "it is the abstract base class",
    "IdToSizeFncPartitioner": "it takes a Python function, which an experiment file cannot express",
}


def _module() -> Any:
    import_datasets()  # offline mode before flwr_datasets imports datasets
    import flwr_datasets.partitioner as module

    return module


def _init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls.__init__).parameters
    return {name: p for name, p in params.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: values are passed unchecked
        return {}


def _is_callable_type(annotation: Any) -> bool:
    if annotation is collections.abc.Callable or typing.get_origin(annotation) is collections.abc.Callable:
        return True
    return "Callable" in str(annotation)


def _refusal(module: Any, name: str) -> str | None:
    """Why the exported class ``name`` cannot be used (None: it can)."""
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, module.Partitioner)):
        return "it is not a partitioner class"
    if name in _REFUSED:
        return _REFUSED[name]
    if name.startswith("Vertical"):
        return "vertical partitioners split columns between parties, not rows between clients"
    if inspect.isabstract(cls):
        return "it is abstract"
    hints = _hints(cls)
    for pname, param in _init_parameters(cls).items():
        if param.default is param.empty and _is_callable_type(hints.get(pname, param.annotation)):
            return f"its argument '{pname}' is a Python function, which an experiment file cannot express"
    return None


def _classes() -> dict[str, type]:
    module = _module()
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    return {name: getattr(module, name) for name in names if _refusal(module, name) is None}


def list_partitioners() -> list[str]:
    """The Flower Datasets partitioners an experiment can name (``federated.partitioner``)."""
    return sorted(_classes())


def partitioner_class(name: str) -> type:
    """The allowed Flower Datasets partitioner class called ``name``; a one-line error otherwise."""
    classes = _classes()
    if name in classes:
        return classes[name]
    module = _module()
    allowed = ", ".join(sorted(classes))
    if hasattr(module, name):
        raise FedsimError(f"Flower Datasets partitioner '{name}' cannot be used: {_refusal(module, name)}; "
                          f"allowed: {allowed}")
    raise FedsimError(f"unknown Flower Datasets partitioner '{name}'; allowed: {allowed}")


def takes_num_partitions(name: str) -> bool:
    """Whether the partitioner's client count is fedsim's ``num_partitions`` (else the data decide it)."""
    return "num_partitions" in _init_parameters(partitioner_class(name))


# ----------------------------------------------------------------------------------------------- options


class _Mismatch(Exception):
    pass


def _convert(value: Any, annotation: Any) -> Any:
    """``value`` (from TOML) as ``annotation`` asks, or :class:`_Mismatch`. Unknown annotations pass."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        # Plain branches first, so a list stays a list where a list is accepted.
        for arg in sorted(args, key=lambda a: typing.get_origin(a) is np.ndarray or a is np.ndarray):
            try:
                return _convert(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        if value in args and all(type(value) is type(a) for a in args if a == value):
            return value
        raise _Mismatch
    if annotation is type(None):
        if value is None:
            return value
        raise _Mismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if annotation is np.ndarray or origin is np.ndarray:
        if isinstance(value, list | tuple | np.ndarray):
            array = np.asarray(value)
            if array.dtype.kind in "biuf":
                return array
        raise _Mismatch
    if origin in (list, collections.abc.Sequence, tuple) or annotation in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _Mismatch
        item = args[0] if args else Any
        return [_convert(v, item) for v in value]
    return value


def _describe(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("collections.abc.", "")


def _kwargs(cls: type, name: str, options: dict[str, Any], num_partitions: int, seed: int) -> dict[str, Any]:
    params = _init_parameters(cls)
    hints = _hints(cls)
    for key, value in options.items():
        if key not in params:
            raise FedsimError(f"Flower Datasets partitioner {name}: unknown argument '{key}' = {value!r}; "
                              f"its arguments: {', '.join(params)}")
    kwargs: dict[str, Any] = {}
    if "num_partitions" in params:
        given = options.get("num_partitions", num_partitions)
        if given != num_partitions:
            raise FedsimError(f"Flower Datasets partitioner {name}: argument 'num_partitions' = {given!r} differs "
                              f"from federated.num_clients = {num_partitions}; set federated.num_clients instead")
        kwargs["num_partitions"] = num_partitions
    if "seed" in params and "seed" not in options:
        kwargs["seed"] = seed
    for key, value in options.items():
        if key == "num_partitions":
            continue
        annotation = hints.get(key, params[key].annotation)
        try:
            kwargs[key] = _convert(value, annotation)
        except _Mismatch:
            raise FedsimError(f"Flower Datasets partitioner {name}: argument '{key}' = {value!r} is not "
                              f"{_describe(annotation)}") from None
    missing = [p for p, param in params.items() if param.default is param.empty and p not in kwargs]
    if missing:
        raise FedsimError(f"Flower Datasets partitioner {name}: missing argument(s) {', '.join(missing)} "
                          "(set them in federated.partitioner_options)")
    return kwargs


# ----------------------------------------------------------------------------------------------- partitions


def partition_table(split: DatasetSplit) -> Any:
    """The table handed to the partitioner: ``split.table`` (or the train labels as column ``label``),
    plus :data:`ROW_COLUMN` = the row's index in the train split."""
    datasets = import_datasets()
    n = len(split.train)
    table = split.table
    if table is None:
        table = datasets.Dataset.from_dict({"label": partition_labels(split.train.tensors[1])})
    elif not isinstance(table, datasets.Dataset):
        raise FedsimError(f"the data set's table is a {type(table).__name__}, not a datasets.Dataset; Flower Datasets "
                          "partitioners need a Hugging Face Dataset whose rows are the train samples")
    elif len(table) != n:
        raise FedsimError(f"the data set's table has {len(table)} rows but its train split {n} samples; "
                          "Flower Datasets partitioners need one row per train sample")
    if ROW_COLUMN in table.column_names:
        table = table.remove_columns([ROW_COLUMN])
    if getattr(table, "_indices", None) is not None:  # a select()ed view: add_column would flatten it on disk
        table = table.flatten_indices(keep_in_memory=True)
    return table.add_column(ROW_COLUMN, np.arange(n, dtype=np.int64))


@contextlib.contextmanager
def _no_cache_files() -> Iterator[None]:
    """Partitioners sort/select the table; keep the index files that makes out of the user's data folder."""
    datasets = import_datasets()
    enabled = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_caching()


def _rows(part: Any) -> np.ndarray:
    return np.asarray(part.select_columns([ROW_COLUMN]).with_format("numpy")[:][ROW_COLUMN], dtype=np.int64)


def flwr_partition(split: DatasetSplit, name: str, options: dict[str, Any] | None, num_partitions: int,
                   seed: int) -> list[np.ndarray]:
    """For each partition k of the Flower Datasets partitioner ``name``, the train-split row indices
    ``partitioner.load_partition(k)`` returns, in its order; the list's length is the partitioner's
    ``num_partitions`` (``num_partitions`` here for the classes that take it, else the data's count)."""
    cls = partitioner_class(name)
    options = dict(options or {})
    kwargs = _kwargs(cls, name, options, num_partitions, seed)
    table = partition_table(split)
    partition_by = kwargs.get("partition_by")
    if isinstance(partition_by, str) and partition_by not in table.column_names:
        columns = [c for c in table.column_names if c != ROW_COLUMN]
        raise FedsimError(f"Flower Datasets partitioner {name}: argument 'partition_by' = {partition_by!r} is not "
                          f"a column of the data; columns: {', '.join(columns)}")
    shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
    try:
        partitioner = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise FedsimError(f"Flower Datasets partitioner {name}({shown}): {_one_line(exc)}") from exc
    partitioner.dataset = table
    with _no_cache_files():
        try:
            count = int(partitioner.num_partitions)
            return [_rows(partitioner.load_partition(k)) for k in range(count)]
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise FedsimError(f"Flower Datasets partitioner {name}({shown}) cannot partition the "
                              f"{len(table)} train samples: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__

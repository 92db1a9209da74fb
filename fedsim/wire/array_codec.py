"""Flower ``Array`` <-> NumPy arrays and torch tensors without per-array (de)serialisation.

A Flower ``Array`` holds ``np.save`` bytes; writing and parsing them costs tens of microseconds per
array (``ast.literal_eval`` of every header), about a millisecond per message of a small model, as
much as the client's training step. Here:

* :func:`ndarray_to_array` / :func:`tensor_to_array` / :func:`tensors_to_record` make
  LazyArrays (:class:`~fedsim.wire.flower_private.LazyArray`): one copy of the payload, ``np.save``'s bytes
  written only if something asks for them (Flower's wire does; nothing in one process does);
* :func:`array_to_numpy` / :func:`record_to_numpy` / :func:`record_to_tensors` give read-only views
  (a LazyArray's own copy, or the message's bytes with the header looked up in a cache): load them
  into a model, never write to them. Headers this module does not understand (Fortran order, object
  dtypes, other ``.npy`` versions) fall back to ``Array.numpy()``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedsim.wire import flower_private as fp
from fedsim.wire.npy_header import decode_header, npy_size

__all__ = ["npy_size", "array_wire_bytes", "array_to_numpy", "record_to_numpy", "record_to_tensors", "ndarray_to_array", "tensor_to_array",
           "tensors_to_record", "arrays_to_record", "weighted_average"]


def array_wire_bytes(array: Array) -> int:
    """The ``.npy`` bytes a Flower ``Array`` carries, from its dtype and shape (its ``data`` is not read)."""
    if array.stype != "numpy.ndarray":
        return len(array.data)
    return npy_size(array.dtype, tuple(array.shape))


def array_to_numpy(array: Array) -> np.ndarray:
    """``array.numpy()``, as a read-only view (of a LazyArray's copy, or of the bytes) where possible."""
    if isinstance(array, fp.LazyArray) and (snapshot := array.snapshot()) is not None:
        return snapshot
    data = array.data
    length, parsed = decode_header(data) if array.stype == "numpy.ndarray" else (0, None)
    if parsed is None:
        return array.numpy()
    dtype, shape, count = parsed
    return np.frombuffer(data, dtype=dtype, count=count, offset=length).reshape(shape)


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Every array of ``record`` (read-only views where possible), by name."""
    return {name: array_to_numpy(array) for name, array in record.items()}


def record_to_tensors(record: ArrayRecord | Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """CPU tensors sharing the record's bytes: for ``load_state_dict`` (which copies), not for writing."""
    arrays = record_to_numpy(record) if isinstance(record, ArrayRecord) else record
    with warnings.catch_warnings():  # read-only on purpose: the bytes belong to the message
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {name: torch.from_numpy(value) for name, value in arrays.items()}


def ndarray_to_array(value: np.ndarray) -> Array:
    """``Array(value)``, equal to Flower's, as a LazyArray (one copy; bytes made only if asked for)."""
    return fp.lazy_array(value)


def tensor_to_array(tensor: torch.Tensor) -> Array:
    """``Array(tensor)``, faster (see :func:`ndarray_to_array`)."""
    return ndarray_to_array(tensor.detach().cpu().numpy())


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``ArrayRecord(state_dict)`` with the same arrays, faster (see :func:`ndarray_to_array`)."""
    return fp.array_record_of({name: tensor_to_array(tensor) for name, tensor in tensors.items()})


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` of NumPy arrays, each made C-contiguous first (strategy state, control variates)."""
    return fp.array_record_of({name: ndarray_to_array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def weighted_average(records: Sequence[RecordDict], weighting_metric_name: str) -> ArrayRecord:
    """Flower's ``aggregate_arrayrecords`` (the FedAvg family's average), reading arrays through this codec.

    The arithmetic is Flower's, operation for operation (each array times its weight in NumPy, summed
    in reply order, in the arrays' own dtypes), so the result is bit-identical; only the decoding
    and encoding of the ``.npy`` payloads is cheaper.
    """
    weights = [next(iter(record.metric_records.values()))[weighting_metric_name] for record in records]
    total_weight = sum(weights)  # type: ignore[arg-type]
    factors = [w / total_weight for w in weights]  # type: ignore[operator]
    aggregated: dict[str, np.ndarray] = {}
    for record, weight in zip(records, factors, strict=True):
        for array_record in record.array_records.values():
            for key, array in array_record.items():
                if key not in aggregated:
                    aggregated[key] = array_to_numpy(array) * weight
                else:
                    aggregated[key] += array_to_numpy(array) * weight
    return fp.array_record_of({k: ndarray_to_array(np.asarray(v)) for k, v in aggregated.items()})

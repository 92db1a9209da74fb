"""Flower ``Array`` <-> torch tensors without per-array NumPy (de)serialisation overhead.

A Flower ``Array`` holds ``np.save`` bytes. ``Array.numpy()`` parses the ``.npy`` header with
``ast.literal_eval`` on every call (~20 us), and ``Array(ndarray)`` formats one and validates its
arguments (~15 us): for a small model with tens of arrays that is about a millisecond per message,
as much as the client's training step. Headers repeat every round (same names, shapes, dtypes), so
both directions cache them by their bytes and copy only the payload:

* :func:`record_to_numpy` / :func:`record_to_tensors` — read-only views of the message's own
  bytes (load them into a model, never write to them); any header this module does not
  understand (Fortran order, object dtypes, other ``.npy`` versions) falls back to ``Array.numpy()``;
* :func:`tensors_to_record` — an ``ArrayRecord`` whose bytes are exactly what ``np.save`` writes
  (the header is taken from one ``np.save`` per dtype and shape), so every consumer (Flower's
  strategies, its serialisation for the wire) sees ordinary arrays.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedsim.wire import flower_private as fp

__all__ = ["npy_size", "array_wire_bytes", "array_to_numpy", "record_to_numpy", "record_to_tensors", "ndarray_to_array", "tensor_to_array",
           "tensors_to_record", "arrays_to_record", "weighted_average"]

_MAGIC = b"\x93NUMPY"
_DECODED: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}
"""``.npy`` header bytes -> (dtype, shape, element count) for C-ordered, non-object arrays."""
_ENCODED: dict[tuple[str, tuple[int, ...]], bytes] = {}
"""(dtype descr, shape) -> the ``.npy`` header ``np.save`` writes for a C-contiguous array."""
_CACHE_LIMIT = 4096  # distinct headers; a model has tens, so this only bounds pathological use


_NPY_SIZES: dict[tuple[str, tuple[int, ...]], int] = {}


def npy_size(dtype: str | np.dtype, shape: tuple[int, ...]) -> int:
    """Bytes of ``np.save`` of a C-ordered array of ``dtype`` and ``shape`` (header + payload), computed
    from the header alone (``np.lib.format.write_array_header_1_0`` of the same dict ``np.save`` writes),
    never from the array: the virtual clock prices messages this way on every engine."""
    dtype = np.dtype(dtype)
    key = (dtype.str, tuple(int(n) for n in shape))
    size = _NPY_SIZES.get(key)
    if size is None:
        stream = io.BytesIO()
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": key[1]}
        np.lib.format.write_array_header_1_0(stream, header)
        size = len(stream.getvalue()) + dtype.itemsize * int(np.prod(key[1], dtype=np.int64))
        if len(_NPY_SIZES) < _CACHE_LIMIT:
            _NPY_SIZES[key] = size
    return size


def array_wire_bytes(array: Array) -> int:
    """The ``.npy`` bytes a Flower ``Array`` carries, from its dtype and shape (its ``data`` is not read)."""
    if array.stype != "numpy.ndarray":
        return len(array.data)
    return npy_size(array.dtype, tuple(array.shape))


def _header(data: bytes) -> tuple[bytes, tuple[np.dtype, tuple[int, ...], int] | None]:
    """The header bytes of an ``.npy`` payload and what they describe (None: not handled here)."""
    if data[:6] != _MAGIC or data[6] not in (1, 2):
        return b"", None
    start = 10 if data[6] == 1 else 12
    header = data[:start + int.from_bytes(data[8:start], "little")]
    parsed = _DECODED.get(header)
    if parsed is None:
        stream = io.BytesIO(header)
        stream.seek(8)
        read = np.lib.format.read_array_header_1_0 if data[6] == 1 else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(stream)
        if fortran_order or dtype.hasobject:
            return header, None
        parsed = (dtype, tuple(shape), int(np.prod(shape, dtype=np.int64)))
        if len(_DECODED) < _CACHE_LIMIT:
            _DECODED[header] = parsed
    return header, parsed


def array_to_numpy(array: Array) -> np.ndarray:
    """``array.numpy()``, as a read-only view of the array's bytes when the header allows it."""
    data = array.data
    header, parsed = _header(data) if array.stype == "numpy.ndarray" else (b"", None)
    if parsed is None:
        return array.numpy()
    dtype, shape, count = parsed
    return np.frombuffer(data, dtype=dtype, count=count, offset=len(header)).reshape(shape)


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
    """``Array(value)`` with the same bytes, formatting the ``.npy`` header once per dtype and shape."""
    if not value.flags.c_contiguous or value.dtype.hasobject:
        return Array(value)  # np.save writes these differently (Fortran order, pickles): leave it to Flower
    key = (value.dtype.str, value.shape)
    header = _ENCODED.get(key)
    if header is None:
        reference = Array(value)  # np.save's own bytes: the header is what precedes the payload
        header = reference.data[:len(reference.data) - value.nbytes]
        if len(_ENCODED) < _CACHE_LIMIT:
            _ENCODED[key] = header
    # One copy of the payload (join reads the array's buffer), not tobytes() and then a concatenation.
    return fp.make_array(str(value.dtype), tuple(value.shape), b"".join((header, value.reshape(-1).view(np.uint8))))


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

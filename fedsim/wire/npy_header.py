"""``.npy`` headers (what ``np.save`` writes before the payload), cached by dtype and shape.

Flower's ``Array`` carries ``np.save`` bytes. Writing a header costs a formatted dict and
reading one costs ``ast.literal_eval`` (~20 us each); a model's arrays repeat the same few headers
every round, so both directions are looked up here instead. Pure NumPy: no Flower names.
"""

from __future__ import annotations

import io

import numpy as np

__all__ = ["MAGIC", "npy_size", "fast_path_dtype", "encode_header", "decode_header", "payload_bytes"]

MAGIC = b"\x93NUMPY"
_CACHE_LIMIT = 4096  # distinct headers; a model has tens, so this only bounds pathological use
_DECODED: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}
"""``.npy`` header bytes -> (dtype, shape, element count) for C-ordered, non-object arrays."""
_ENCODED: dict[tuple[str, tuple[int, ...]], bytes] = {}
"""(dtype descr, shape) -> the ``.npy`` header ``np.save`` writes for a C-contiguous array."""
_NPY_SIZES: dict[tuple[object, tuple[int, ...]], int] = {}
"""Sizes keyed by ``npy_size``'s arguments as passed (a dtype name, type or object; the shape as a tuple):
equal keys are equal dtypes, so a dtype spelled two ways gets two entries of the same size."""


def npy_size(dtype: str | np.dtype, shape: tuple[int, ...]) -> int:
    """Bytes of ``np.save`` of a C-ordered array of ``dtype`` and ``shape`` (header + payload), computed
    from the header alone (``np.lib.format.write_array_header_1_0`` of the same dict ``np.save`` writes),
    never from the array: the virtual clock prices messages this way on every engine."""
    # The round loop prices every message of a round: the lookup comes first, by the arguments as given
    # (normalising the dtype and the shape cost more than the rest of a message's pricing).
    key: tuple[object, tuple[int, ...]] | None = (dtype, shape if type(shape) is tuple else tuple(shape))
    try:
        return _NPY_SIZES[key]
    except KeyError:
        pass
    except TypeError:  # a dtype given in an unhashable form (a structured dtype's list of fields): not cached
        key = None
    dtype = np.dtype(dtype)
    dims = tuple(int(n) for n in shape)
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": dims})
    size = len(stream.getvalue()) + dtype.itemsize * int(np.prod(dims, dtype=np.int64))
    if key is not None and len(_NPY_SIZES) < _CACHE_LIMIT:
        _NPY_SIZES[key] = size
    return size


def fast_path_dtype(value: np.ndarray) -> bool:
    """Whether ``value`` is written by ``np.save`` as header + its C-ordered bytes (a plain, C-contiguous
    ndarray of booleans or numbers), the only case the cached paths handle; the rest goes to NumPy."""
    return type(value) is np.ndarray and value.flags.c_contiguous and value.dtype.kind in "biufc"


def encode_header(value: np.ndarray) -> bytes:
    """The header ``np.save`` writes before ``value``'s payload (``value`` passes :func:`fast_path_dtype`)."""
    key = (value.dtype.str, value.shape)
    header = _ENCODED.get(key)
    if header is None:
        stream = io.BytesIO()
        # np.save's own bytes of an array of this dtype and shape: the header is what precedes the payload.
        np.save(stream, np.zeros(value.shape, dtype=value.dtype), allow_pickle=False)
        written = stream.getvalue()
        header = written[:len(written) - value.nbytes]
        if len(_ENCODED) < _CACHE_LIMIT:
            _ENCODED[key] = header
    return header


def payload_bytes(value: np.ndarray) -> bytes:
    """Exactly ``np.save``'s bytes of ``value`` (one copy of the payload; ``value`` passes :func:`fast_path_dtype`)."""
    # join reads the array's buffer directly: not tobytes() and then a concatenation.
    return b"".join((encode_header(value), value.reshape(-1).view(np.uint8)))


def decode_header(data: bytes) -> tuple[int, tuple[np.dtype, tuple[int, ...], int] | None]:
    """The header length of an ``.npy`` payload and what it describes (None: not handled here:
    another ``.npy`` version, Fortran order, object dtypes)."""
    if data[:6] != MAGIC or data[6] not in (1, 2):
        return 0, None
    start = 10 if data[6] == 1 else 12
    header = bytes(data[:start + int.from_bytes(data[8:start], "little")])
    parsed = _DECODED.get(header)
    if parsed is None:
        stream = io.BytesIO(header)
        stream.seek(8)
        read = np.lib.format.read_array_header_1_0 if data[6] == 1 else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(stream)
        if fortran_order or dtype.hasobject:
            return len(header), None
        parsed = (dtype, tuple(shape), int(np.prod(shape, dtype=np.int64)))
        if len(_DECODED) < _CACHE_LIMIT:
            _DECODED[header] = parsed
    return len(header), parsed

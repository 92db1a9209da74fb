"""LEAF benchmarks (FEMNIST, Shakespeare) read from the JSON files LEAF's preprocessing writes.

LEAF (https://github.com/TalwalkarLab/leaf) writes ``<name>/data/train/*.json`` and
``<name>/data/test/*.json``, each file ``{"users": [...], "num_samples": [...], "user_data": {user:
{"x": [...], "y": [...]}}}`` (plus ``"hierarchies"``, ignored). Nothing is downloaded: a missing folder
is a one-line :class:`FedsimError` naming the path and the LEAF commands that make it.

Options (``data.options`` in an experiment):

``path``
    the folder holding LEAF's ``train/`` and ``test/`` (e.g. ``leaf/data/femnist/data``); a relative
    path is relative to ``data.data_dir``. Default ``<data_dir>/leaf/<kind>/data``; with ``kind =
    "auto"`` whichever of ``<data_dir>/leaf/femnist/data`` and ``<data_dir>/leaf/shakespeare/data``
    exists (both or neither: an error asking for ``path`` or ``kind``).
``kind``
    ``"femnist"``, ``"shakespeare"`` or ``"auto"`` (default: detected from the first sample of the
    first train file: a list of 784 numbers is FEMNIST, an 80-character string Shakespeare).
``cache_dir``
    where the cache goes instead of ``<path>/.fedsim-cache`` (relative: under ``data.data_dir``).

What comes back:

* FEMNIST: ``x`` float32 ``[N, 1, 28, 28]`` exactly as LEAF wrote it (pixel/255 in [0, 1], white
  background near 1), ``y`` int64 in 0..61; ``DataInfo("leaf_femnist", (1, 28, 28), 62)``.
* Shakespeare: ``x`` int64 ``[N, 80]``, ``y`` int64 in 0..79, both indices into LEAF's own
  80-character alphabet :data:`ALL_LETTERS` (``models/utils/language_utils.py``);
  ``DataInfo("leaf_shakespeare", (80,), 80)``. A character outside the alphabet is an error naming the
  file, the user and the character: LEAF's ``ALL_LETTERS.find`` maps it to -1 (an embedding row that
  does not exist, or silently the last one); we refuse instead. LEAF's alphabet is the set of
  characters its Shakespeare text holds, so real LEAF files never hit this.
* ``train`` is the union of every user's train samples and ``test`` of every user's test samples, in
  the order of the sorted file names and, inside a file, of its ``users`` list: a central run trains
  on the union. LEAF has its own split, so ``test_fraction`` and ``split_seed`` do not apply.
  ``normalise`` is ignored: LEAF data are already scaled (pixels in [0, 1]) or are indices, and
  standardising would need a full in-memory copy, defeating the lazy cache.
* ``clients`` (:class:`NaturalClients`, used by ``partition = "natural"``, which therefore fixes the
  number of clients): one client per user that has train samples, in order of first appearance
  (sorted train file names, then each file's ``users`` list). Client ``k``'s train rows are exactly
  that user's train samples and its test rows that user's test samples, both in file order. A user
  with train samples and no test samples is a client with an empty test group.
* Test-only users (LEAF's ``-t user`` split puts whole users in test) are not clients: their
  samples stay in the central ``test`` split, in file order, and belong to no client's test group
  (``NaturalClients``' test groups cover only client users' rows; their per-sample user index in
  the cache is -1). With ``-t user`` no client has test samples.

Only the users listed in ``users`` are read; ``user_data`` entries of unlisted users are ignored
(LEAF's ``-t sample`` split leaves empty entries for the users it dropped). Malformed files are
one-line errors naming the file (and user): invalid JSON, a missing ``users`` / ``num_samples`` /
``user_data`` key, a listed user without ``user_data``, ``num_samples`` disagreeing with the data, a
user with no samples, ``x`` and ``y`` of different lengths, a label outside the declared classes, a
wrong feature size (not 784 numbers, not 80 characters), a user listed twice.

**Cache, laziness.** Loading one LEAF user costs parsing its whole JSON file, so the first load
parses every file once (one at a time, streaming the rows to disk, so memory holds one parsed file)
and writes ``.npy`` files beside the data, in ``<path>/.fedsim-cache/``: ``{train,test}_{x,y,user}``
(inputs, labels, per-sample client index) and ``manifest.json`` (cache format version, kind, client
names, and every source file's name, size and mtime). Later loads check the manifest against the
files (any difference: rebuild) and open the arrays with ``np.load(mmap_mode="c")`` +
``torch.from_numpy``: only the rows a client indexes are paged in, so a cohort never holds every
user's tensors. The cache is written to a temporary folder beside it and renamed into place (atomic;
concurrent loaders that race keep one). FEMNIST pixels are cached as float32 although LEAF's values
are exact multiples of 1/255 (uint8 would be exact and 4× smaller): the mapped arrays are handed to
the model as they are, with no per-batch conversion. If ``<path>`` is read-only the cache goes to
``<data_dir>/.fedsim-cache/leaf-<hash of path>``; if that is not writable either, the arrays are built
in a temporary folder and read into memory (not lazy, with a warning).

Not implemented: Sent140 (its models need GloVe embeddings, a separate 800 MB download) and CelebA
(its ``x`` are image file names that need the raw CelebA images); their files are refused with a
message saying so. Reddit and the synthetic LEAF set are not handled either.

:func:`write_leaf_standin` writes tiny but real-format LEAF folders with learnable structure, for
tests and demos that must not need the real data.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedsim.data.base import DataInfo, DatasetSplit, NaturalClients
from fedsim.errors import FedsimError

__all__ = [
    "ALL_LETTERS",
    "CACHE_FORMAT",
    "CACHE_NAME",
    "KINDS",
    "decode_text",
    "encode_text",
    "load_leaf_split",
    "write_leaf_standin",
]

ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
"""LEAF's Shakespeare alphabet (``models/utils/language_utils.py``): 80 characters, index = class."""
SEQ_LENGTH = 80
FEMNIST_PIXELS = 28 * 28
CACHE_FORMAT = 1
CACHE_NAME = ".fedsim-cache"
SPLITS = ("train", "test")

_CHAR_TABLE = np.full(128, -1, dtype=np.int64)
for _index, _char in enumerate(ALL_LETTERS):
    _CHAR_TABLE[ord(_char)] = _index
_LETTERS = np.array(list(ALL_LETTERS))


@dataclass(frozen=True)
class LeafKind:
    name: str
    info: DataInfo
    x_dtype: type
    row_shape: tuple[int, ...]
    obtain: str
    """How to make the data with LEAF (network needed once)."""


KINDS = {
    "femnist": LeafKind(
        "femnist", DataInfo("leaf_femnist", (1, 28, 28), 62), np.float32, (1, 28, 28),
        "git clone https://github.com/TalwalkarLab/leaf && cd leaf/data/femnist && "
        "./preprocess.sh -s niid --sf 0.05 -k 0 -t sample",
    ),
    "shakespeare": LeafKind(
        "shakespeare", DataInfo("leaf_shakespeare", (SEQ_LENGTH,), len(ALL_LETTERS)), np.int64, (SEQ_LENGTH,),
        "git clone https://github.com/TalwalkarLab/leaf && cd leaf/data/shakespeare && "
        "./preprocess.sh -s niid --sf 0.2 -k 0 -t sample -tf 0.8",
    ),
}


# --------------------------------------------------------------------------------------------------
# Shakespeare text encoding


def _first_unknown(text: str) -> str | None:
    for char in text:
        if char not in ALL_LETTERS:
            return char
    return None


def _encode(text: str) -> tuple[np.ndarray | None, str | None]:
    """Indices of ``text`` in :data:`ALL_LETTERS`, or ``(None, first unknown character)``."""
    if text.isascii():
        codes = _CHAR_TABLE[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
        bad = np.flatnonzero(codes < 0)
        if bad.size == 0:
            return codes, None
        return None, text[int(bad[0])]
    return None, _first_unknown(text)


def encode_text(text: str) -> np.ndarray:
    """``text`` as int64 indices into LEAF's alphabet; ValueError naming a character outside it."""
    codes, bad = _encode(text)
    if codes is None:
        raise ValueError(f"character {bad!r} is not in LEAF's Shakespeare alphabet")
    return codes


def decode_text(indices: Any) -> str:
    """Inverse of :func:`encode_text` (accepts a tensor or array of indices)."""
    array = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() >= len(ALL_LETTERS)):
        raise ValueError(f"indices must be in 0..{len(ALL_LETTERS) - 1}")
    return "".join(_LETTERS[array.reshape(-1)].tolist())


# --------------------------------------------------------------------------------------------------
# Errors


def _remedy(kind: str) -> str:
    if kind in KINDS:
        return f"fix the file or regenerate it with LEAF ({KINDS[kind].obtain})"
    how = "; ".join(f"{name}: {spec.obtain}" for name, spec in KINDS.items())
    return f"fix the file or regenerate it with LEAF ({how})"


def _bad(path: Path, what: str, kind: str) -> FedsimError:
    return FedsimError(f"dataset 'leaf': {path}: {what}; {_remedy(kind)}")


def _missing(folder: Path, detail: str, kind: str, copy_to: str | None = None) -> FedsimError:
    kinds = [kind] if kind in KINDS else list(KINDS)
    how = "; or ".join(
        f"{KINDS[k].obtain}, then set data.options.path to the absolute path of leaf/data/{k}/data" for k in kinds
    )
    hint = ""
    if (folder / "data" / "train").is_dir():
        hint = f" ({folder / 'data'} holds a train/ folder: point data.options.path there)"
    return FedsimError(
        f"dataset 'leaf': {detail} under {folder}{hint}. Get LEAF's files (network needed once): {how} "
        f"(or copy an existing LEAF data folder to {copy_to or folder})"
    )


# --------------------------------------------------------------------------------------------------
# Locating the files


def _resolve(data_dir: str, path: str | os.PathLike[str]) -> Path:
    folder = Path(path).expanduser()
    return folder if folder.is_absolute() else Path(data_dir) / folder


def _locate(data_dir: str, path: str | os.PathLike[str] | None, kind: str) -> Path:
    if path is not None:
        return _resolve(data_dir, path)
    if kind != "auto":
        return Path(data_dir) / "leaf" / kind / "data"
    candidates = [Path(data_dir) / "leaf" / name / "data" for name in KINDS]
    found = [c for c in candidates if (c / "train").is_dir()]
    if len(found) == 1:
        return found[0]
    if not found:
        root = Path(data_dir) / "leaf"
        raise _missing(root, "no femnist/data/train or shakespeare/data/train folder", kind,
                       copy_to=f"{root / 'femnist' / 'data'} or {root / 'shakespeare' / 'data'}")
    raise FedsimError(
        f"dataset 'leaf': both {found[0]} and {found[1]} exist; set data.options.kind (femnist or "
        "shakespeare) or data.options.path"
    )


def _source_files(folder: Path, kind: str) -> dict[str, list[Path]]:
    if not folder.is_dir():
        raise _missing(folder, "no LEAF folder", kind)
    files: dict[str, list[Path]] = {}
    for split in SPLITS:
        sub = folder / split
        found = sorted((p for p in sub.glob("*.json") if p.is_file()), key=lambda p: p.name) if sub.is_dir() else []
        if not found:
            raise _missing(folder, f"no {split}/*.json files (LEAF writes train/ and test/ folders)", kind)
        files[split] = found
    return files


def _fingerprint(files: dict[str, list[Path]]) -> dict[str, list[list[Any]]]:
    out: dict[str, list[list[Any]]] = {}
    for split, paths in files.items():
        out[split] = []
        for p in paths:
            stat = p.stat()
            out[split].append([p.name, stat.st_size, stat.st_mtime_ns])
    return out


# --------------------------------------------------------------------------------------------------
# Parsing LEAF JSON


def _parse_json_file(path: Path) -> Any:
    """Parse one LEAF JSON file (the one place JSON data files are read: tests patch it)."""
    with open(path, "rb") as handle:
        return json.load(handle)


def _read_leaf_file(path: Path, kind: str) -> tuple[list[str], list[Any], dict[str, Any]]:
    try:
        data = _parse_json_file(path)
    except json.JSONDecodeError as error:
        raise _bad(path, f"not valid JSON ({error.msg} at line {error.lineno} column {error.colno})", kind) from None
    except (UnicodeDecodeError, ValueError) as error:
        raise _bad(path, f"not valid JSON ({type(error).__name__})", kind) from None
    if not isinstance(data, dict):
        raise _bad(path, f"top level is a {type(data).__name__}, not a LEAF object", kind)
    for key in ("users", "num_samples", "user_data"):
        if key not in data:
            raise _bad(path, f"missing key '{key}' (LEAF files hold users, num_samples and user_data)", kind)
    users, counts, user_data = data["users"], data["num_samples"], data["user_data"]
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise _bad(path, "'users' is not a list of user names", kind)
    if not isinstance(counts, list) or len(counts) != len(users):
        raise _bad(path, f"'num_samples' is not a list of {len(users)} counts, one per user", kind)
    if not isinstance(user_data, dict):
        raise _bad(path, "'user_data' is not an object keyed by user", kind)
    if len(set(users)) != len(users):
        twice = next(u for u in users if users.count(u) > 1)
        raise _bad(path, f"user {twice!r} is listed twice", kind)
    return users, counts, user_data


def _detect_kind(path: Path, users: list[str], user_data: dict[str, Any]) -> str:
    for user in users:
        entry = user_data.get(user)
        xs = entry.get("x") if isinstance(entry, dict) else None
        if not isinstance(xs, list) or not xs:
            continue
        first = xs[0]
        if isinstance(first, str):
            if len(first) == SEQ_LENGTH:
                return "shakespeare"
            raise FedsimError(
                f"dataset 'leaf': {path}: x holds strings of {len(first)} characters, not Shakespeare's "
                f"{SEQ_LENGTH} (CelebA, whose x are image file names, is not supported); set "
                "data.options.kind if this is FEMNIST or Shakespeare"
            )
        if isinstance(first, list) and len(first) == FEMNIST_PIXELS:
            return "femnist"
        raise FedsimError(
            f"dataset 'leaf': {path}: cannot tell the LEAF data set from x (not 784 pixels, not an "
            f"{SEQ_LENGTH}-character string; Sent140 and CelebA are not supported); set data.options.kind "
            "to femnist or shakespeare"
        )
    raise _bad(path, "no user with samples to detect the data set from", "auto")


def _user_arrays(path: Path, user: str, declared: Any, entry: Any, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """One user's ``(x, y)`` as the cache stores them, after every format check."""
    where = f"user {user!r}"
    if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
        raise _bad(path, f"{where}: user_data entry has no 'x' and 'y' lists", kind)
    xs, ys = entry["x"], entry["y"]
    if not isinstance(xs, list) or not isinstance(ys, list):
        raise _bad(path, f"{where}: 'x' and 'y' must be lists", kind)
    if len(xs) != len(ys):
        raise _bad(path, f"{where}: {len(xs)} inputs x but {len(ys)} labels y", kind)
    if not ys:
        raise _bad(path, f"{where} has no samples (LEAF drops such users; remove it from 'users')", kind)
    if isinstance(declared, bool) or not isinstance(declared, int) or declared != len(ys):
        raise _bad(path, f"{where}: num_samples says {declared!r} but user_data holds {len(ys)} samples", kind)
    spec = KINDS[kind]
    n = len(ys)
    if kind == "femnist":
        if not all(isinstance(row, list) and len(row) == FEMNIST_PIXELS for row in xs):
            bad = next(row for row in xs if not (isinstance(row, list) and len(row) == FEMNIST_PIXELS))
            size = len(bad) if isinstance(bad, list) else type(bad).__name__
            raise _bad(path, f"{where}: a FEMNIST x has {size} values, not {FEMNIST_PIXELS} (28x28 pixels)", kind)
        try:
            x = np.asarray(xs, dtype=np.float32)
        except (TypeError, ValueError):
            raise _bad(path, f"{where}: FEMNIST pixels must be numbers", kind) from None
        if not np.isfinite(x).all():
            raise _bad(path, f"{where}: FEMNIST pixels must be finite numbers", kind)
        x = x.reshape(n, *spec.row_shape)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ys):
            bad_label = next(v for v in ys if not (isinstance(v, int) and not isinstance(v, bool)))
            raise _bad(path, f"{where}: label {bad_label!r} is not an integer class", kind)
        y = np.asarray(ys, dtype=np.int64)
        outside = (y < 0) | (y >= spec.info.num_classes)
        if outside.any():
            raise _bad(path, f"{where}: label {int(y[outside][0])} is outside FEMNIST's 62 classes (0..61)", kind)
        return x, y
    # Shakespeare: 80-character strings, one-character labels
    for text in xs:
        if not isinstance(text, str) or len(text) != SEQ_LENGTH:
            size = f"{len(text)} characters" if isinstance(text, str) else f"a {type(text).__name__}"
            raise _bad(path, f"{where}: a Shakespeare x is {size}, not an {SEQ_LENGTH}-character string", kind)
    codes, unknown = _encode("".join(xs))
    if codes is None:
        raise _bad(path, f"{where}: character {unknown!r} in x is not in LEAF's 80-letter alphabet", kind)
    for label in ys:
        if not isinstance(label, str) or len(label) != 1:
            raise _bad(path, f"{where}: label {label!r} is not one character", kind)
    labels, unknown = _encode("".join(ys))
    if labels is None:
        raise _bad(path, f"{where}: label {unknown!r} is outside LEAF's 80-letter alphabet (the classes)", kind)
    return codes.reshape(n, SEQ_LENGTH), labels


# --------------------------------------------------------------------------------------------------
# The cache


class _Column:
    """Rows appended to a raw file, turned into one ``.npy`` at the end (memory: one chunk)."""

    def __init__(self, folder: Path, name: str, dtype: Any, row_shape: tuple[int, ...]) -> None:
        self.folder, self.name, self.dtype, self.row_shape = folder, name, np.dtype(dtype), row_shape
        self.raw = folder / f"{name}.raw"
        self.handle = open(self.raw, "wb")  # closed in finish() or abandon()
        self.rows = 0

    def append(self, rows: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += len(rows)

    def finish(self) -> None:
        self.handle.close()
        shape = (self.rows, *self.row_shape)
        target = self.folder / f"{self.name}.npy"
        if self.rows == 0:
            np.save(target, np.zeros(shape, dtype=self.dtype))
        else:
            out = np.lib.format.open_memmap(target, mode="w+", dtype=self.dtype, shape=shape)
            source = np.memmap(self.raw, dtype=self.dtype, mode="r", shape=shape)
            step = max(1, (64 << 20) // max(1, source[0].nbytes))
            for start in range(0, self.rows, step):
                out[start:start + step] = source[start:start + step]
            out.flush()
            del out, source
        self.raw.unlink()

    def abandon(self) -> None:
        if not self.handle.closed:
            self.handle.close()


def _build(folder: Path, files: dict[str, list[Path]], fingerprint: dict[str, Any], kind: str, into: Path
           ) -> dict[str, Any]:
    """Parse every file once and write the cache into the (new, empty) folder ``into``."""
    names: list[str] = []
    index: dict[str, int] = {}
    first_file: dict[str, str] = {}
    columns: dict[str, _Column] = {}
    test_only: list[str] = []
    try:
        for split in SPLITS:
            seen: dict[str, str] = {}
            for path in files[split]:
                users, counts, user_data = _read_leaf_file(path, kind)
                if kind == "auto":
                    kind = _detect_kind(path, users, user_data)
                if not columns:
                    spec = KINDS[kind]
                    for s in SPLITS:
                        columns[f"{s}_x"] = _Column(into, f"{s}_x", spec.x_dtype, spec.row_shape)
                        columns[f"{s}_y"] = _Column(into, f"{s}_y", np.int64, ())
                        columns[f"{s}_user"] = _Column(into, f"{s}_user", np.int64, ())
                for user, declared in zip(users, counts, strict=True):
                    if user in seen:
                        raise _bad(path, f"user {user!r} is also in {seen[user]} ({split} files must not share users)",
                                   kind)
                    seen[user] = path.name
                    if user not in user_data:
                        raise _bad(path, f"user {user!r} is listed in 'users' but has no entry in 'user_data'", kind)
                    x, y = _user_arrays(path, user, declared, user_data[user], kind)
                    if split == "train":
                        index[user] = len(names)
                        names.append(user)
                        first_file[user] = path.name
                        client = index[user]
                    else:
                        client = index.get(user, -1)
                        if client < 0:
                            test_only.append(user)
                    columns[f"{split}_x"].append(x)
                    columns[f"{split}_y"].append(y)
                    columns[f"{split}_user"].append(np.full(len(y), client, dtype=np.int64))
                del users, counts, user_data
            if split == "train" and not names:
                raise _bad(folder / "train", "no file lists a user (every 'users' list is empty)", kind)
        for column in columns.values():
            column.finish()
    except BaseException:
        for column in columns.values():
            column.abandon()
        raise
    manifest = {
        "format": CACHE_FORMAT,
        "kind": kind,
        "source": str(folder.resolve()),
        "files": fingerprint,
        "rows": {split: columns[f"{split}_y"].rows for split in SPLITS},
        "clients": names,
        "test_only_users": test_only,
    }
    (into / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _read_manifest(cache: Path, fingerprint: dict[str, Any], kind: str) -> dict[str, Any] | None:
    try:
        manifest = json.loads((cache / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        return None
    if manifest.get("files") != fingerprint or manifest.get("kind") not in KINDS:
        return None
    if kind != "auto" and manifest["kind"] != kind:
        return None
    return manifest


def _open_arrays(cache: Path, manifest: dict[str, Any], mmap: bool = True) -> dict[str, np.ndarray] | None:
    """The cached arrays (memory-mapped copy-on-write), or None when any is missing or the wrong shape."""
    spec = KINDS[manifest["kind"]]
    arrays: dict[str, np.ndarray] = {}
    try:
        for split in SPLITS:
            rows = int(manifest["rows"][split])
            for column, shape in (("x", (rows, *spec.row_shape)), ("y", (rows,)), ("user", (rows,))):
                name = f"{split}_{column}"
                array = np.load(cache / f"{name}.npy", mmap_mode="c" if mmap and rows else None)
                if array.shape != shape:
                    return None
                arrays[name] = array
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return arrays


def _new_tmp(cache: Path) -> Path:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f"{cache.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def _install(tmp: Path, cache: Path, fingerprint: dict[str, Any], kind: str) -> Path:
    """Rename the finished ``tmp`` to ``cache``; a stale cache is moved aside first. If another
    process installed a valid cache meanwhile, keep theirs."""
    if cache.exists():
        if not (cache / "manifest.json").exists() and any(cache.iterdir()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise FedsimError(
                f"dataset 'leaf': cache folder {cache} exists and is not a fedsim LEAF cache (no manifest.json); "
                "empty it or set data.options.cache_dir to a new folder"
            )
        trash = cache.parent / f"{cache.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(cache, trash)
        except OSError:
            trash = None
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, cache)
        return cache
    except OSError:
        if _read_manifest(cache, fingerprint, kind) is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return cache
        raise


def _cache_candidates(folder: Path, data_dir: str, cache_dir: str | os.PathLike[str] | None) -> list[Path]:
    if cache_dir is not None:
        return [_resolve(data_dir, cache_dir)]
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    return [folder / CACHE_NAME, Path(data_dir) / CACHE_NAME / f"leaf-{digest}"]


def _load_arrays(folder: Path, files: dict[str, list[Path]], kind: str, data_dir: str,
                 cache_dir: str | os.PathLike[str] | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    fingerprint = _fingerprint(files)
    candidates = _cache_candidates(folder, data_dir, cache_dir)
    for cache in candidates:
        manifest = _read_manifest(cache, fingerprint, kind)
        if manifest is not None:
            arrays = _open_arrays(cache, manifest)
            if arrays is not None:
                return arrays, manifest
    for cache in candidates:
        try:
            tmp = _new_tmp(cache)
        except OSError:
            continue
        try:
            manifest = _build(folder, files, fingerprint, kind, tmp)
            cache = _install(tmp, cache, fingerprint, kind)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        arrays = _open_arrays(cache, manifest)
        if arrays is None:  # pragma: no cover - only if someone deletes the cache under us
            raise FedsimError(f"dataset 'leaf': the cache just written to {cache} cannot be read; delete it and retry")
        return arrays, manifest
    tmp = Path(tempfile.mkdtemp(prefix="fedsim-leaf-"))
    try:
        manifest = _build(folder, files, fingerprint, kind, tmp)
        arrays = _open_arrays(tmp, manifest, mmap=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    warnings.warn(
        f"LEAF cache: neither {' nor '.join(str(c) for c in candidates)} is writable; the data are held in "
        "memory and parsed again on every load (set data.options.cache_dir to a writable folder)",
        stacklevel=3,
    )
    assert arrays is not None
    return arrays, manifest


def _clients(manifest: dict[str, Any], train_user: np.ndarray, test_user: np.ndarray) -> NaturalClients:
    names = tuple(manifest["clients"])

    def group(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.flatnonzero(ids >= 0)
        order = rows[np.argsort(ids[rows], kind="stable")]
        offsets = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum(np.bincount(ids[rows], minlength=len(names)), out=offsets[1:])
        return order, offsets

    train_order, train_offsets = group(train_user)
    test_order, test_offsets = group(test_user)
    return NaturalClients(names, train_order, train_offsets, test_order, test_offsets)


# --------------------------------------------------------------------------------------------------
# The loader


def load_leaf_split(
    test_fraction: float = 0.2,
    split_seed: int = 0,
    normalise: bool = True,
    data_dir: str = "data",
    *,
    path: str | os.PathLike[str] | None = None,
    kind: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    **unknown: Any,
) -> DatasetSplit:
    """LEAF FEMNIST or Shakespeare with one natural client per user (see the module docstring).

    ``test_fraction``, ``split_seed`` and ``normalise`` do not apply: LEAF has its own per-user
    split and its data are already scaled.
    """
    del test_fraction, split_seed, normalise
    if unknown:
        raise FedsimError(
            f"dataset 'leaf': unknown option(s) {', '.join(sorted(unknown))}; known: path, kind, cache_dir"
        )
    if kind not in (*KINDS, "auto"):
        raise FedsimError(
            f"dataset 'leaf': kind {kind!r} is not supported; use femnist, shakespeare or auto "
            "(Sent140 needs GloVe embeddings and CelebA the raw images: not implemented)"
        )
    folder = _locate(data_dir, path, kind)
    files = _source_files(folder, kind)
    arrays, manifest = _load_arrays(folder, files, kind, data_dir, cache_dir)
    spec = KINDS[manifest["kind"]]
    train = TensorDataset(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]))
    test = TensorDataset(torch.from_numpy(arrays["test_x"]), torch.from_numpy(arrays["test_y"]))
    clients = _clients(manifest, arrays["train_user"], arrays["test_user"])
    return DatasetSplit(train, test, spec.info, clients=clients)


# --------------------------------------------------------------------------------------------------
# Stand-in data in the real format

_STANDIN_TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: "
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date. "
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.\n"
)


def _standin_samples(kind: str, rng: np.random.Generator, count: int, offset: int, classes: int
                     ) -> tuple[list[Any], list[Any]]:
    if kind == "femnist":
        templates = np.random.default_rng(1234).random((classes, FEMNIST_PIXELS)) < 0.25
        labels = rng.integers(0, classes, size=count)
        ink = 1.0 - 0.8 * templates[labels] + rng.normal(0.0, 0.08, size=(count, FEMNIST_PIXELS))
        pixels = np.round(np.clip(ink, 0.0, 1.0) * 255) / 255  # exact k/255 floats, as LEAF writes
        return pixels.tolist(), [int(v) for v in labels]
    text = _STANDIN_TEXT * (2 + (offset + count) // len(_STANDIN_TEXT))
    xs = [text[offset + i: offset + i + SEQ_LENGTH] for i in range(count)]
    ys = [text[offset + i + SEQ_LENGTH] for i in range(count)]
    return xs, ys


def write_leaf_standin(
    folder: str | os.PathLike[str],
    kind: str,
    *,
    users: int = 6,
    files: int = 2,
    train_samples: tuple[int, int] = (3, 9),
    test_samples: tuple[int, int] = (1, 3),
    seed: int = 0,
    classes: int = 10,
) -> Path:
    """Write a tiny LEAF folder in the real format (``train/`` and ``test/``, ``users`` spread over
    ``files`` files of each, ``users`` / ``num_samples`` / ``user_data``) and return it (the value for
    ``data.options.path``).

    Each user draws its train and test counts uniformly from the inclusive ranges. A user with 0
    test samples is left out of the test file's ``users`` (its ``user_data`` entry is empty, as LEAF's
    sample split writes it). FEMNIST: ``classes`` (≤ 62) classes, each a fixed random ink pattern plus
    noise, pixels k/255 in [0, 1]; Shakespeare: windows of a short repeated passage (next character
    predictable). Deterministic in ``seed``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not 1 <= files <= users:
        raise ValueError(f"need 1 <= files <= users, got files={files}, users={users}")
    if train_samples[0] < 1 or train_samples[1] < train_samples[0]:
        raise ValueError(f"train_samples must be an inclusive range starting at 1 or more, not {train_samples}")
    if test_samples[0] < 0 or test_samples[1] < test_samples[0]:
        raise ValueError(f"test_samples must be an inclusive range starting at 0 or more, not {test_samples}")
    if not 1 <= classes <= KINDS["femnist"].info.num_classes:
        raise ValueError(f"classes must be in 1..62, not {classes}")
    root = Path(folder)
    for split in SPLITS:
        (root / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for file_index, group in enumerate(np.array_split(np.arange(users), files)):
        contents = {split: {"users": [], "num_samples": [], "user_data": {}} for split in SPLITS}
        for u in group.tolist():
            name = f"f{u:04d}_{(7 * u) % 90 + 10:02d}" if kind == "femnist" else f"THE_STANDIN_PLAY_SPEAKER_{u}"
            n_train = int(rng.integers(train_samples[0], train_samples[1] + 1))
            n_test = int(rng.integers(test_samples[0], test_samples[1] + 1))
            xs, ys = _standin_samples(kind, rng, n_train + n_test, int(rng.integers(0, len(_STANDIN_TEXT))), classes)
            for split, rows in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
                part = contents[split]
                part["user_data"][name] = {"x": xs[rows], "y": ys[rows]}
                if ys[rows]:
                    part["users"].append(name)
                    part["num_samples"].append(len(ys[rows]))
        for split in SPLITS:
            target = root / split / f"all_data_{file_index}_niid_0_keep_0_{split}_9.json"
            target.write_text(json.dumps(contents[split]))
    return root

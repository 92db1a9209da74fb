"""Hugging Face datasets read from local files: ``save_to_disk`` folders and parquet/arrow files.

Nothing is downloaded: ``HF_DATASETS_OFFLINE=1`` is set before ``datasets`` is first imported
(unless the user set it, or ``HF_HUB_OFFLINE``, themselves), folders are read with
``datasets.load_from_disk`` and data files with pyarrow (no cache folder is written). A missing or
unreadable file is a one-line :class:`FedsimError` naming the path and how to obtain the data.

Options (``data.options`` in an experiment file)::

    path = "mnist_hf"                 # a save_to_disk folder (a DatasetDict, or one Dataset = the train split)
    data_files = "mnist/*.parquet"    # or files: a path/glob, a list, or a table {train = ..., test = ...}
    image_column = "image"            # Image feature (PIL images) or nested lists/arrays
    label_column = "label"            # ClassLabel or integer values
    train_split = "train"
    test_split = "test"               # absent: a seeded stratified split of the train split
    client_column = ""                # e.g. "writer_id": natural clients grouped by its values
    image_mode = ""                   # e.g. "L" or "RGB": convert every image to this PIL mode

Relative paths resolve against ``data_dir``. Images become float32 ``[N, C, H, W]`` in [0, 1]
(8-bit values / 255, 16-bit / 65535; floats as stored; grey images get C = 1; 1-D rows stay
``[N, D]``), standardised with train statistics when ``normalise``; labels int64.
``DatasetSplit.table`` is the train split as a ``datasets.Dataset`` (row i = train sample i), for
Flower Datasets partitioners (:mod:`fedsim.data.flwr_partitions`).
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedsim.data.base import DataInfo, DatasetSplit, NaturalClients, normalise_by_train, stratified_split
from fedsim.errors import FedsimError

__all__ = ["HF_OPTIONS", "import_datasets", "load_hf_split", "read_hf_dataset"]

HF_OPTIONS = ("path", "data_files", "image_column", "label_column", "train_split", "test_split",
              "client_column", "image_mode")
PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
_HOW_TO_GET = ("save it on a machine with network: `datasets.load_dataset(NAME).save_to_disk({path!r})` and "
               "copy the folder here, or download the dataset's parquet files and set data.options.data_files")


def import_datasets() -> Any:
    """``import datasets`` in offline mode (unless the user chose otherwise), so nothing reaches the network."""
    if "HF_DATASETS_OFFLINE" not in os.environ and "HF_HUB_OFFLINE" not in os.environ:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    return datasets


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _missing(path: Path) -> FedsimError:
    return FedsimError(f"hf dataset: {path} not found; " + _HOW_TO_GET.format(path=str(path)))


def _resolve(data_dir: str, value: Any, option: str) -> Path:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise FedsimError(f"hf dataset: data.options.{option} must be a path, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(data_dir) / path


# ----------------------------------------------------------------------------------------------- reading


def _load_folder(path: Path) -> dict[str, Any]:
    """A ``save_to_disk`` folder as {split: Dataset}; a single Dataset is the train split (key None)."""
    datasets = import_datasets()
    if not path.exists():
        raise _missing(path)
    if not path.is_dir():
        raise FedsimError(f"hf dataset: {path} is a file, not a save_to_disk folder; "
                          "name parquet/arrow files with data.options.data_files instead of data.options.path")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure here means the folder is not a readable dataset
        raise FedsimError(
            f"hf dataset: {path} is not a readable save_to_disk folder ({_first_line(exc)}); "
            + _HOW_TO_GET.format(path=str(path))
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded)
    return {None: loaded}


def _expand(data_dir: str, value: Any, option: str) -> list[Path]:
    values = value if isinstance(value, list | tuple) else [value]
    if not values:
        raise FedsimError(f"hf dataset: data.options.{option} is empty; name at least one parquet/arrow file")
    files: list[Path] = []
    for item in values:
        path = _resolve(data_dir, item, option)
        if glob.has_magic(str(path)):
            matches = sorted(Path(p) for p in glob.glob(str(path)))
            if not matches:
                raise _missing(path)
            files.extend(matches)
        elif not path.exists():
            raise _missing(path)
        elif path.is_dir():
            raise FedsimError(f"hf dataset: {path} is a folder; name its files (e.g. '{path}/*.parquet') in "
                              f"data.options.{option}, or give a save_to_disk folder as data.options.path")
        else:
            files.append(path)
    return files


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _read_file(path: Path) -> Any:
    datasets = import_datasets()
    from datasets.table import InMemoryTable, MemoryMappedTable

    suffix = path.suffix.lower()
    try:
        if suffix in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            table = InMemoryTable(pq.read_table(str(path)))
        elif suffix in ARROW_SUFFIXES:
            try:  # the arrow stream format save_to_disk writes, memory-mapped
                table = MemoryMappedTable.from_file(str(path))
            except Exception:  # noqa: BLE001 - then the arrow IPC file (feather v2) format
                import pyarrow as pa

                with pa.memory_map(str(path)) as source:
                    table = InMemoryTable(pa.ipc.open_file(source).read_all())
        else:
            raise FedsimError(f"hf dataset: {path}: unknown data file type '{suffix}'; "
                              f"expected {', '.join(PARQUET_SUFFIXES + ARROW_SUFFIXES)}")
        return datasets.Dataset(table, fingerprint=_fingerprint(path))
    except FedsimError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow/datasets errors on a malformed file
        kind = "parquet" if suffix in PARQUET_SUFFIXES else "arrow"
        raise FedsimError(
            f"hf dataset: {path} is not a readable {kind} file ({_first_line(exc)}); write it with `Dataset.to_parquet` (or download "
            "the dataset's parquet files again on a machine with network)"
        ) from exc


def _load_files(files: list[Path]) -> Any:
    datasets = import_datasets()
    parts = [_read_file(f) for f in files]
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except Exception as exc:  # noqa: BLE001 - files whose columns/features differ
        raise FedsimError(f"hf dataset: {', '.join(map(str, files))} do not share one schema and cannot be "
                          f"concatenated ({_first_line(exc)})") from exc


def read_hf_dataset(data_dir: str, path: Any = None, data_files: Any = None) -> tuple[str, dict[Any, Any]]:
    """The data set's name and its splits ({split name: ``datasets.Dataset``}; key None = one unnamed split)."""
    if (path is None) == (data_files is None):
        raise FedsimError("hf dataset: set exactly one of data.options.path (a save_to_disk folder) and "
                          "data.options.data_files (parquet/arrow files)")
    if path is not None:
        folder = _resolve(data_dir, path, "path")
        return folder.name, _load_folder(folder)
    if isinstance(data_files, dict):
        if not data_files:
            raise FedsimError("hf dataset: data.options.data_files is an empty table; give {train = FILES, ...}")
        splits: dict[Any, Any] = {}
        first: list[Path] = []
        for split, value in data_files.items():
            files = _expand(data_dir, value, f"data_files.{split}")
            first = first or files
            splits[str(split)] = _load_files(files)
        return _files_name(first), splits
    files = _expand(data_dir, data_files, "data_files")
    return _files_name(files), {None: _load_files(files)}


def _files_name(files: list[Path]) -> str:
    return files[0].stem if len(files) == 1 else files[0].parent.name


# ----------------------------------------------------------------------------------------------- columns


def _check_column(ds: Any, column: str, option: str, where: str) -> None:
    if column not in ds.column_names:
        raise FedsimError(f"hf dataset: {where} has no column '{column}' (data.options.{option}); "
                          f"available columns: {', '.join(ds.column_names)}")


def _labels(ds: Any, column: str, where: str) -> tuple[np.ndarray, int | None]:
    """Integer labels and, for a ClassLabel feature, its class count."""
    datasets = import_datasets()
    feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        num_classes: int | None = feature.num_classes
    elif isinstance(feature, datasets.Value) and (feature.dtype.startswith("int") or feature.dtype.startswith("uint")):
        num_classes = None
    else:
        raise FedsimError(f"hf dataset: {where}: label column '{column}' is not integer ({feature}); encode it "
                          "first, e.g. `ds.class_encode_column(...)`, or name another one in data.options.label_column")
    labels = ds.select_columns([column]).with_format("numpy")[:][column]
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and labels.min() < 0:
        raise FedsimError(f"hf dataset: {where}: label column '{column}' holds negative labels (e.g. -1 for "
                          "unlabelled rows); drop those rows before saving the data set")
    return labels, num_classes


def _images(ds: Any, column: str, mode: str, where: str) -> np.ndarray:
    """Raw pixel arrays, channels first: ``[N, C, H, W]`` (or ``[N, D]`` for 1-D rows)."""
    datasets = import_datasets()
    feature = ds.features[column]
    is_image = isinstance(feature, datasets.Image)
    if mode:
        if not is_image:
            raise FedsimError(f"hf dataset: data.options.image_mode = {mode!r} needs an Image column; "
                              f"'{column}' of {where} is {feature}")
        ds = ds.cast_column(column, datasets.Image(mode=mode))
    try:
        values = ds.select_columns([column]).with_format("numpy")[:][column]
    except Exception as exc:  # noqa: BLE001 - undecodable image bytes
        raise FedsimError(f"hf dataset: {where}: cannot decode column '{column}' ({_first_line(exc)})") from exc
    x = np.asarray(values)
    if x.dtype == object:
        shapes = sorted({np.shape(v) for v in values}, key=str)
        hint = " (set data.options.image_mode, e.g. \"RGB\", to convert every image to one mode)" if is_image else ""
        raise FedsimError(f"hf dataset: {where}: rows of column '{column}' differ in shape "
                          f"({', '.join(map(str, shapes[:4]))}){hint}; resize them to one shape first")
    if x.ndim == 1:
        raise FedsimError(f"hf dataset: {where}: column '{column}' holds one number per row, not images; "
                          "name the image column in data.options.image_column")
    if x.ndim == 3:  # grey images [N, H, W]
        return x[:, None]
    if x.ndim == 4:
        channels_last = is_image or (x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4))
        return x.transpose(0, 3, 1, 2) if channels_last else x
    return x  # [N, D] rows, or higher-rank arrays as stored


def _scale(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """float32 in [0, 1]: 8-bit values / 255, 16-bit / 65535, booleans as 0/1, floats as stored."""
    dtype = arrays[0].dtype
    if dtype == np.bool_ or np.issubdtype(dtype, np.floating):
        return [a.astype(np.float32) for a in arrays]
    if np.issubdtype(dtype, np.integer):
        top = max((int(a.max()) for a in arrays if a.size), default=0)
        scale = 65535.0 if (dtype == np.uint16 or 255 < top <= 65535) else 255.0
        scale = max(scale, float(top))
        return [a.astype(np.float32) / np.float32(scale) for a in arrays]
    raise FedsimError(f"hf dataset: image values of type {dtype} are not numbers")


def _client_ids(ds: Any, column: str) -> list[Any]:
    values = list(ds.select_columns([column])[:][column])
    if any(v is None for v in values):
        raise FedsimError(f"hf dataset: client column '{column}' has empty (null) values; every row needs a client")
    return values


def _natural_clients(train_values: list[Any], test_values: list[Any]) -> NaturalClients:
    """Clients = the distinct values in the train split (sorted, as Flower's NaturalIdPartitioner numbers
    them); each keeps its own test rows; test rows of ids absent from training belong to no client."""
    try:
        ids = sorted(set(train_values))
    except TypeError:  # mixed types: order by their text
        ids = sorted(set(train_values), key=str)
    index = {v: i for i, v in enumerate(ids)}
    unknown = len(ids)
    train_ids = np.fromiter((index[v] for v in train_values), dtype=np.int64, count=len(train_values))
    test_ids = np.fromiter((index.get(v, unknown) for v in test_values), dtype=np.int64, count=len(test_values))
    names = tuple(str(v) for v in ids)
    grouped = NaturalClients.from_ids(train_ids, test_ids, (*names, "<no client>"))
    return NaturalClients(names, grouped.train_order, grouped.train_offsets[:-1],
                          grouped.test_order[:grouped.test_offsets[-2]], grouped.test_offsets[:-1])


# ----------------------------------------------------------------------------------------------- loader


def load_hf_split(
    test_fraction: float,
    split_seed: int,
    normalise: bool = True,
    data_dir: str = "data",
    **options: Any,
) -> DatasetSplit:
    """A Hugging Face data set from a ``save_to_disk`` folder or parquet/arrow files (see the module doc)."""
    unknown = sorted(set(options) - set(HF_OPTIONS))
    if unknown:
        raise FedsimError(f"hf dataset: unknown option(s) {', '.join(f'data.options.{k}' for k in unknown)}; "
                          f"known: {', '.join(HF_OPTIONS)}")
    image_column = str(options.get("image_column", "image"))
    label_column = str(options.get("label_column", "label"))
    train_name = str(options.get("train_split", "train"))
    test_name = str(options.get("test_split", "test"))
    client_column = str(options.get("client_column", "") or "")
    image_mode = str(options.get("image_mode", "") or "")
    source = options.get("path") if options.get("path") is not None else options.get("data_files")

    name, splits = read_hf_dataset(data_dir, options.get("path"), options.get("data_files"))
    if None in splits:
        train_ds, test_ds = splits[None], None
    else:
        if train_name not in splits:
            raise FedsimError(f"hf dataset: {source!r} has no split '{train_name}' (data.options.train_split); "
                              f"splits: {', '.join(map(str, splits))}")
        train_ds, test_ds = splits[train_name], splits.get(test_name)
    train_where, test_where = f"{name}[{train_name}]", f"{name}[{test_name}]"
    for ds, where in ((train_ds, train_where), (test_ds, test_where)):
        if ds is None:
            continue
        _check_column(ds, image_column, "image_column", where)
        _check_column(ds, label_column, "label_column", where)
        if client_column:
            _check_column(ds, client_column, "client_column", where)
    if len(train_ds) == 0:
        raise FedsimError(f"hf dataset: {train_where} has no rows")

    y_train, num_classes = _labels(train_ds, label_column, train_where)
    x_train = _images(train_ds, image_column, image_mode, train_where)
    if test_ds is None:
        try:
            idx_train, idx_test, _, _ = stratified_split(np.arange(len(y_train)), y_train, test_fraction, split_seed)
        except ValueError as exc:
            raise FedsimError(
                f"hf dataset: {source!r} has no '{test_name}' split and its '{train_name}' split cannot be split "
                f"with data.test_fraction = {test_fraction} stratified by class ({exc}); give a test split "
                "(data.options.test_split) or change data.test_fraction"
            ) from exc
        idx_train, idx_test = np.asarray(idx_train, dtype=np.int64), np.asarray(idx_test, dtype=np.int64)
        x_test, y_test = x_train[idx_test], y_train[idx_test]
        x_train, y_train = x_train[idx_train], y_train[idx_train]
        table = train_ds.select(idx_train)
        test_table = train_ds.select(idx_test) if client_column else None
    else:
        y_test, test_classes = _labels(test_ds, label_column, test_where)
        x_test = _images(test_ds, image_column, image_mode, test_where)
        if x_test.shape[1:] != x_train.shape[1:]:
            raise FedsimError(f"hf dataset: {name}: '{train_name}' samples have shape {x_train.shape[1:]} but "
                              f"'{test_name}' samples {x_test.shape[1:]}")
        num_classes = num_classes or test_classes
        table, test_table = train_ds, test_ds
    if num_classes is None:
        num_classes = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1

    x_train, x_test = _scale([x_train, x_test])
    if normalise:
        x_train, x_test = normalise_by_train(x_train, x_test)
    clients = None
    if client_column:
        clients = _natural_clients(_client_ids(table, client_column), _client_ids(test_table, client_column))
    train = TensorDataset(torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
                          torch.as_tensor(y_train, dtype=torch.long))
    test = TensorDataset(torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
                         torch.as_tensor(y_test, dtype=torch.long))
    return DatasetSplit(train, test, DataInfo(f"hf:{name}", tuple(x_train.shape[1:]), int(num_classes)),
                        clients=clients, table=table)

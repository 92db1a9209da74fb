"""Readers for torchvision's on-disk formats (MNIST/FashionMNIST idx files, CIFAR-10 pickles).

Nothing is downloaded: the files must already be under ``data_dir`` in torchvision's layout,
otherwise a :class:`FedsimError` says exactly which files to put where.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedsim.data.base import DataInfo, DatasetSplit, normalise_by_train
from fedsim.errors import FedsimError

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (big-endian header: magic, dims; uint8 payload), plain or gzipped."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    magic = int.from_bytes(raw[0:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload, the only type MNIST uses
        raise FedsimError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    return None


def _missing(name: str, folder: Path, files: list[str]) -> FedsimError:
    return FedsimError(
        f"dataset '{name}': files not found under {folder}. Put torchvision's files there "
        f"({', '.join(files)}; e.g. from torchvision.datasets with download=True on a machine with network), "
        f"or set data.data_dir to the folder that holds '{folder.parent.name}/{folder.name}'."
    )


def _wrap(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
          normalise: bool) -> DatasetSplit:
    x_train = x_train.astype(np.float32) / 255.0
    x_test = x_test.astype(np.float32) / 255.0
    if normalise:
        x_train, x_test = normalise_by_train(x_train, x_test)
    train = TensorDataset(torch.from_numpy(np.ascontiguousarray(x_train)), torch.as_tensor(y_train, dtype=torch.long))
    test = TensorDataset(torch.from_numpy(np.ascontiguousarray(x_test)), torch.as_tensor(y_test, dtype=torch.long))
    return DatasetSplit(train, test, DataInfo(name, tuple(x_train.shape[1:]), 10))


def load_idx_dataset(name: str, folder_name: str, data_dir: str, normalise: bool = True) -> DatasetSplit:
    """MNIST-like: ``<data_dir>/<folder_name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``."""
    folder = Path(data_dir) / folder_name / "raw"
    paths = {key: _find(folder, stem) for key, stem in IDX_FILES.items()}
    if any(p is None for p in paths.values()):
        raise _missing(name, folder, list(IDX_FILES.values()))
    arrays = {key: read_idx(p) for key, p in paths.items() if p is not None}
    return _wrap(name, arrays["train_x"][:, None], arrays["train_y"], arrays["test_x"][:, None], arrays["test_y"],
                 normalise)


def _read_cifar_batches(folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for batch_name in names:
        with open(folder / batch_name, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar10(data_dir: str, normalise: bool = True, **_: object) -> DatasetSplit:
    """CIFAR-10 python version: ``<data_dir>/cifar-10-batches-py/{data_batch_1..5,test_batch}``."""
    folder = Path(data_dir) / "cifar-10-batches-py"
    if not all((folder / n).exists() for n in CIFAR_TRAIN + CIFAR_TEST):
        raise _missing("cifar10", folder, CIFAR_TRAIN + CIFAR_TEST)
    x_train, y_train = _read_cifar_batches(folder, CIFAR_TRAIN)
    x_test, y_test = _read_cifar_batches(folder, CIFAR_TEST)
    return _wrap("cifar10", x_train, y_train, x_test, y_test, normalise)


def load_mnist(data_dir: str, normalise: bool = True, **_: object) -> DatasetSplit:
    return load_idx_dataset("mnist", "MNIST", data_dir, normalise)


def load_fashion_mnist(data_dir: str, normalise: bool = True, **_: object) -> DatasetSplit:
    return load_idx_dataset("fashion_mnist", "FashionMNIST", data_dir, normalise)


def write_cifar10_standin(data_dir: str | Path, *, per_batch: int = 20, test: int = 40, seed: int = 0) -> Path:
    """A tiny stand-in of CIFAR-10's python version under ``<data_dir>/cifar-10-batches-py``: the same
    pickles (``data_batch_1..5``, ``test_batch``; ``b"data"`` uint8 ``[N, 3072]``, ``b"labels"``), with
    class-dependent colours so that a few steps learn something. For tests and smoke runs."""
    folder = Path(data_dir) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (10, 3, 1, 1))

    def batch(n: int) -> dict[bytes, object]:
        labels = rng.integers(0, 10, n)
        noise = rng.normal(0, 40, (n, 3, 32, 32))
        images = np.clip(palette[labels] + noise, 0, 255).astype(np.uint8)
        return {b"data": images.reshape(n, -1), b"labels": labels.tolist()}

    for name in CIFAR_TRAIN:
        (folder / name).write_bytes(pickle.dumps(batch(per_batch)))
    (folder / CIFAR_TEST[0]).write_bytes(pickle.dumps(batch(test)))
    return folder

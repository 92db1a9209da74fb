"""scikit-learn's digits (1,797 8x8 images, 10 classes): the embedded default, no download.

The split (stratified, seeded) is written once to ``$FEDSIM_CACHE_DIR`` (default ``~/.cache/fedsim``)
and read back with NumPy on later runs: importing scikit-learn (which imports SciPy and pandas)
takes about a second and ~80 MB, longer than a small federated run's first round. The file name
carries every input of the split and the scikit-learn and NumPy versions that made it; a cache
that cannot be written is skipped.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedsim.data.base import DataInfo, DatasetSplit, to_split

_FORMAT = 1
"""Bump when what is stored (or how it is computed) changes: older files are then ignored."""


def cache_dir() -> Path:
    return Path(os.environ.get("FEDSIM_CACHE_DIR") or Path.home() / ".cache" / "fedsim")


def _cache_file(test_fraction: float, split_seed: int, normalise: bool) -> Path | None:
    try:
        sklearn_version = metadata.version("scikit-learn")
    except metadata.PackageNotFoundError:  # pragma: no cover - a dependency of fedsim
        return None
    name = (f"digits-v{_FORMAT}-test{test_fraction!r}-seed{split_seed}-norm{int(normalise)}"
            f"-sklearn{sklearn_version}-numpy{np.__version__}.npz")
    return cache_dir() / name


def _read(path: Path) -> DatasetSplit | None:
    try:
        with np.load(path) as stored:
            arrays = {k: torch.from_numpy(stored[k].copy()) for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, KeyError):  # absent, or a partial file from another era: recompute
        return None
    info = DataInfo("digits", tuple(arrays["x_train"].shape[1:]), 10)
    return DatasetSplit(TensorDataset(arrays["x_train"], arrays["y_train"]),
                        TensorDataset(arrays["x_test"], arrays["y_test"]), info)


def _write(path: Path, split: DatasetSplit) -> None:
    x_train, y_train = split.train.tensors
    x_test, y_test = split.test.tensors
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(partial, "wb") as out:  # complete or absent: another run may read it at any time
            np.savez(out, x_train=x_train.numpy(), y_train=y_train.numpy(), x_test=x_test.numpy(),
                     y_test=y_test.numpy())
        os.replace(partial, path)
    except OSError:
        pass  # a read-only home: compute every time, as before


def load_digits_split(test_fraction: float, split_seed: int, normalise: bool = True, **_: object) -> DatasetSplit:
    path = _cache_file(test_fraction, split_seed, normalise)
    cached = _read(path) if path is not None else None
    if cached is not None:
        return cached
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None, :, :]  # [N, 1, 8, 8], pixel values 0..16
    y = digits.target.astype(np.int64)
    split = to_split("digits", x, y, 10, test_fraction, split_seed, normalise)
    if path is not None:
        _write(path, split)
    return split

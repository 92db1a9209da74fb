"""Datasets: digits split is fixed, stratified, normalised on train only; torchvision-format readers."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.data import load_dataset
from fedsim.errors import FedsimError


def test_digits_split_is_fixed_stratified_and_train_normalised() -> None:
    a = load_dataset("digits")
    b = load_dataset("digits")
    assert len(a.train) + len(a.test) == 1797
    assert a.info.input_shape == (1, 8, 8) and a.info.num_classes == 10
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    x_train = a.train.tensors[0]
    assert abs(float(x_train.mean())) < 1e-5 and abs(float(x_train.std()) - 1) < 1e-2
    train_frac = np.bincount(a.train.tensors[1].numpy()) / len(a.train)
    test_frac = np.bincount(a.test.tensors[1].numpy()) / len(a.test)
    assert np.abs(train_frac - test_frac).max() < 0.01  # stratified
    other = load_dataset("digits", split_seed=1)
    assert not torch.equal(a.test.tensors[1], other.test.tensors[1])


def test_synthetic_shapes() -> None:
    split = load_dataset("synthetic", n_samples=300, shape=[3, 4, 4], num_classes=5)
    assert split.info.input_shape == (3, 4, 4) and split.info.num_classes == 5
    assert len(split.train) + len(split.test) == 300


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_reader_on_tiny_files(tmp_path: Path, name: str, folder: str) -> None:
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 256, (4, 28, 28))
    _write_idx(raw / "train-images-idx3-ubyte.gz", train_x)
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(12) % 10)
    _write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.array([3, 1, 4, 1]))
    split = load_dataset(name, data_dir=str(tmp_path), normalise=False)
    assert split.info.input_shape == (1, 28, 28)
    assert torch.allclose(split.train.tensors[0][5, 0], torch.tensor(train_x[5] / 255.0, dtype=torch.float32))
    assert split.test.tensors[1].tolist() == [3, 1, 4, 1]


def test_cifar_reader_on_tiny_files(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [0, 1, 2]}
        (folder / name).write_bytes(pickle.dumps(batch))
    split = load_dataset("cifar10", data_dir=str(tmp_path))
    assert len(split.train) == 15 and len(split.test) == 3 and split.info.input_shape == (3, 32, 32)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_files_say_where_to_put_them(tmp_path: Path, name: str) -> None:
    with pytest.raises(FedsimError, match=str(tmp_path)):
        load_dataset(name, data_dir=str(tmp_path))


def test_unknown_dataset() -> None:
    with pytest.raises(FedsimError, match="unknown dataset 'nope'"):
        load_dataset("nope")


def test_digits_split_cache_is_the_split_and_skips_scikit_learn(tmp_path, monkeypatch) -> None:
    import subprocess
    import sys

    from fedsim.data import digits

    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path))
    made = digits.load_digits_split(0.2, 7)  # computed with scikit-learn, then written
    files = list(tmp_path.glob("digits-v*-test0.2-seed7-norm1-*.npz"))
    assert len(files) == 1 and not list(tmp_path.glob(".*.tmp"))
    read = digits.load_digits_split(0.2, 7)
    for a, b in ((made.train, read.train), (made.test, read.test)):
        for x, y in zip(a.tensors, b.tensors, strict=True):
            assert x.dtype == y.dtype and torch.equal(x, y)
    assert read.info == made.info
    other = digits.load_digits_split(0.25, 7)  # another split has another file
    assert len(other.test) != len(made.test) and len(list(tmp_path.glob("digits-*.npz"))) == 2
    code = ("import sys; from fedsim.data import load_digits_split as f; s = f(0.2, 7); "
            "print(len(s.train), 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "FEDSIM_CACHE_DIR": str(tmp_path)}).stdout.split()
    assert out == [str(len(made.train)), "False"]  # read back without importing scikit-learn
    files[0].write_bytes(b"not an npz")  # a damaged file is recomputed, not trusted
    again = digits.load_digits_split(0.2, 7)
    assert torch.equal(again.train.tensors[0], made.train.tensors[0])

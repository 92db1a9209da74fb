"""Generated class-conditional data of any size, for scale tests and benchmarks."""

from __future__ import annotations

import numpy as np

from fedsim.data.base import DatasetSplit, to_split


def load_synthetic_split(
    test_fraction: float,
    split_seed: int,
    normalise: bool = True,
    n_samples: int = 2000,
    shape: tuple[int, ...] | list[int] = (1, 8, 8),
    num_classes: int = 10,
    noise: float = 1.0,
    **_: object,
) -> DatasetSplit:
    """Gaussian blobs around one random prototype per class, shaped like images (or vectors).

    Deterministic in ``split_seed``; a ``noise`` of 1 keeps classes overlapping but learnable.
    """
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(split_seed)
    prototypes = rng.normal(size=(num_classes, *shape)).astype(np.float32)
    y = np.arange(n_samples) % num_classes
    rng.shuffle(y)
    x = prototypes[y] + noise * rng.normal(size=(n_samples, *shape)).astype(np.float32)
    return to_split("synthetic", x, y.astype(np.int64), num_classes, test_fraction, split_seed, normalise)

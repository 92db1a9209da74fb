"""scikit-learn's digits (1,797 8x8 images, 10 classes): the embedded default, no download."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from fedsim.data.base import DatasetSplit, to_split


def load_digits_split(test_fraction: float, split_seed: int, normalise: bool = True, **_: object) -> DatasetSplit:
    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None, :, :]  # [N, 1, 8, 8], pixel values 0..16
    y = digits.target.astype(np.int64)
    return to_split("digits", x, y, 10, test_fraction, split_seed, normalise)

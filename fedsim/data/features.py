"""Feature sources for few-shot evaluation: a trained backbone, feature files, or a generator.

Every source returns a :class:`FeatureSet`: base-class and novel-class features as
``class -> [n_c, D]`` float arrays (the reference code's pickle format).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedsim.errors import FedsimError

__all__ = [
    "FeatureSet", "load_feature_file", "load_feature_files", "synthetic_features", "backbone_encoder",
    "extract_features", "features_by_class",
]

ClassFeatures = dict[int, np.ndarray]


@dataclass
class FeatureSet:
    """Base-class features (for statistics) and novel-class features (for episodes)."""

    base: ClassFeatures
    novel: ClassFeatures

    @property
    def dim(self) -> int:
        return next(iter(self.base.values())).shape[1]


# ---- (b) feature files ---------------------------------------------------------------------------
def _class_key(key: object, path: str) -> int:
    try:
        return int(key)  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise FedsimError(f"{path}: class key {key!r} is not an integer class id") from exc


def load_feature_file(path: str | Path) -> ClassFeatures:
    """Read ``class -> feature matrix`` from a pickle (the reference code's ``*_features.plk``) or ``.npz``.

    Raises :class:`FedsimError` naming the path when it is missing or holds something else.
    """
    path = Path(path)
    if not path.is_file():
        raise FedsimError(f"feature file '{path}' not found (expected a pickle or .npz mapping class -> features)")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                raw: Mapping[object, object] = {key: archive[key] for key in archive.files}
        else:
            with open(path, "rb") as handle:
                raw = pickle.load(handle)  # trusted input: the user's own feature file
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise FedsimError(f"feature file '{path}' cannot be read: {exc}") from exc
    if not isinstance(raw, Mapping) or not raw:
        raise FedsimError(f"feature file '{path}' must map class -> feature matrix, got {type(raw).__name__}")
    out: ClassFeatures = {}
    for key, value in raw.items():
        matrix = np.asarray(value, dtype=np.float32)
        if matrix.ndim != 2:
            raise FedsimError(f"feature file '{path}': class {key!r} has shape {matrix.shape}, expected [n, D]")
        out[_class_key(key, str(path))] = matrix
    dims = {m.shape[1] for m in out.values()}
    if len(dims) != 1:
        raise FedsimError(f"feature file '{path}': classes have different feature sizes {sorted(dims)}")
    return out


def load_feature_files(base_path: str | Path, novel_path: str | Path) -> FeatureSet:
    """Base and novel features from two files (the reference code writes ``base_features.plk`` and
    ``novel_features.plk``)."""
    if not str(base_path) or not str(novel_path):
        raise FedsimError("features = 'file' needs both 'path' (base classes) and 'novel_path' (novel classes)")
    base, novel = load_feature_file(base_path), load_feature_file(novel_path)
    if next(iter(base.values())).shape[1] != next(iter(novel.values())).shape[1]:
        raise FedsimError(f"'{base_path}' and '{novel_path}' hold features of different sizes")
    return FeatureSet(base, novel)


# ---- (c) synthetic features ----------------------------------------------------------------------
def synthetic_features(
    n_base: int = 64,
    n_novel: int = 20,
    dim: int = 640,
    per_base: int = 600,
    per_novel: int = 100,
    n_groups: int = 16,
    rank: int = 16,
    group_spread: float = 1.0,
    class_spread: float = 0.2,
    factor_scale: float = 0.6,
    noise: float = 0.3,
    offset: float = 0.5,
    seed: int = 0,
) -> FeatureSet:
    """Skewed, non-negative features of many base classes whose novel classes lie near base classes.

    The generator follows the method's assumption: classes come in ``n_groups`` groups; within a
    group class means are close (``class_spread`` around a group centre that is ``group_spread``
    from the others) and classes share one covariance (``rank`` strong directions of scale
    ``factor_scale`` plus isotropic ``noise``). Novel classes are new members of the groups, so
    their nearest base classes have their covariance. A latent Gaussian ``g`` is mapped to
    ``relu(g) ** 2``: non-negative with a heavy right tail and exact zeros, like ReLU features,
    and Tukey's ``lam = 0.5`` undoes the square.

    Sizes default to miniImageNet's split (64 base / 20 novel classes, 600 images per class,
    640-d WRN features). Deterministic in ``seed``.
    """
    if n_groups < 1 or n_base < n_groups:
        raise FedsimError(f"n_base = {n_base} must be >= n_groups = {n_groups} >= 1")
    rng = np.random.default_rng(seed)
    centres = offset + group_spread * rng.normal(size=(n_groups, dim))  # spreads are per coordinate
    factors = factor_scale * rng.normal(size=(n_groups, dim, rank))

    def draw(group: int, n: int) -> np.ndarray:
        mean = centres[group] + class_spread * rng.normal(size=dim)
        latent = mean + rng.normal(size=(n, rank)) @ factors[group].T + noise * rng.normal(size=(n, dim))
        return (np.maximum(latent, 0.0) ** 2).astype(np.float32)

    base = {c: draw(c % n_groups, per_base) for c in range(n_base)}
    novel = {n_base + j: draw(j % n_groups, per_novel) for j in range(n_novel)}
    return FeatureSet(base, novel)


# ---- (a) features from a trained backbone ----------------------------------------------------------
def backbone_encoder(model: nn.Module, head: str = "") -> nn.Sequential:
    """The model's named children up to (not including) ``head``; default: all but the last child.

    fedsim models that are stacks of layers run their children in order (the pipeline
    convention), so the children before the classification head compute the penultimate features.
    """
    children = list(model.named_children())
    if len(children) < 2:
        raise FedsimError(f"{type(model).__name__} has {len(children)} child modules; "
                          "a backbone needs feature layers followed by a head")
    names = [name for name, _ in children]
    stop = names.index(head) if head else len(children) - 1
    if head and head not in names:
        raise FedsimError(f"head '{head}' is not a child of {type(model).__name__}; children: {', '.join(names)}")
    if stop == 0:
        raise FedsimError(f"head '{head}' is the first child: no feature layers before it")
    return nn.Sequential(*(module for _, module in children[:stop]))


@torch.no_grad()
def extract_features(encoder: nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Flattened encoder outputs ``[n, D]`` in eval mode (BatchNorm uses its running statistics)."""
    was_training = encoder.training
    encoder.eval()
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in encoder.parameters()), torch.float32)
    out = [encoder(x[i:i + batch_size].to(device=device, dtype=dtype)).flatten(1).cpu()
           for i in range(0, len(x), batch_size)]
    encoder.train(was_training)
    return torch.cat(out).numpy().astype(np.float32)


def features_by_class(features: np.ndarray, labels: np.ndarray | torch.Tensor) -> ClassFeatures:
    """Group rows of ``features`` by label."""
    labels = np.asarray(labels)
    return {int(c): features[labels == c] for c in np.unique(labels)}

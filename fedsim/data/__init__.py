"""Dataset registry: name -> loader returning a :class:`DatasetSplit` of torch TensorDatasets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedsim.data.base import ClientShard, DataInfo, DatasetSplit, NaturalClients, Population
from fedsim.data.digits import load_digits_split
from fedsim.data.fedprox_synthetic import load_fedprox_synthetic_split
from fedsim.data.hf import load_hf_split
from fedsim.data.leaf import load_leaf_split
from fedsim.data.synthetic import load_synthetic_split
from fedsim.data.torchvision_files import load_cifar10, load_fashion_mnist, load_mnist
from fedsim.errors import FedsimError

__all__ = ["DATASETS", "ClientShard", "DataInfo", "DatasetSplit", "NaturalClients", "Population", "load_dataset"]


def _official_split(loader: Callable[..., DatasetSplit]) -> Callable[..., DatasetSplit]:
    """torchvision data sets ship their own train/test split; the split arguments do not apply."""

    def load(test_fraction: float, split_seed: int, normalise: bool = True, **options: Any) -> DatasetSplit:
        return loader(normalise=normalise, **options)

    load.__doc__ = loader.__doc__
    return load


DATASETS: dict[str, Callable[..., DatasetSplit]] = {
    "digits": load_digits_split,
    "synthetic": load_synthetic_split,
    "mnist": _official_split(load_mnist),
    "fashion_mnist": _official_split(load_fashion_mnist),
    "cifar10": _official_split(load_cifar10),
    "hf": load_hf_split,
    "leaf": load_leaf_split,
    "fedprox_synthetic": load_fedprox_synthetic_split,
}


def load_dataset(
    name: str,
    *,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    normalise: bool = True,
    data_dir: str = "data",
    **options: Any,
) -> DatasetSplit:
    """Load a registered dataset, or a user's ``module:attribute`` loader with the same signature."""
    if ":" in name:
        from fedsim.registry import import_object

        loader = import_object(name)
    elif name in DATASETS:
        loader = DATASETS[name]
    else:
        raise FedsimError(f"unknown dataset '{name}'; known: {', '.join(sorted(DATASETS))} or module:attribute")
    return loader(test_fraction=test_fraction, split_seed=split_seed, normalise=normalise, data_dir=data_dir, **options)

"""``logreg``: multinomial logistic regression, FedProx's model for its Synthetic(alpha, beta) data.

The model is ``flatten`` then one ``nn.Linear(features, classes)`` (60 -> 10 on
:mod:`fedsim.data.fedprox_synthetic`, 610 parameters), trained with the mean cross-entropy; metrics
are accuracy (primary) and mean cross-entropy. It takes any data set with integer labels (inputs are
flattened). ``hidden = [h1, ...]`` turns it into an MLP (ReLU between the layers) for the same data:
the CNNs of :mod:`fedsim.tasks.benchmark` and ``bn_cnn`` need images, which 60-d vectors are not.

Vectorisable (no batch coupling). No pipeline split points: the logistic regression is one layer (the
``flatten`` child holds no parameters, so a cut would give a stage with nothing to train), and the
split points of a task are fixed per class, not per ``hidden`` option.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from fedsim.data import DataInfo
from fedsim.errors import ConfigError, FedsimError
from fedsim.tasks import Task
from fedsim.tasks.part_a import classification_metrics

__all__ = ["LogRegOptions", "LogRegTask"]


@dataclass(frozen=True)
class LogRegOptions:
    """Options of the ``logreg`` task."""

    hidden: tuple[int, ...] = ()
    """Hidden layer widths; empty (the default) is logistic regression, the paper's model."""


class LogRegTask(Task):
    """Multinomial logistic regression (``flatten`` + one linear layer), or an MLP with ``hidden``."""

    name: ClassVar[str] = "logreg"
    description: ClassVar[str] = "multinomial logistic regression (FedProx's Synthetic(alpha, beta) model); MLP with hidden"
    default_dataset: ClassVar[str] = "fedprox_synthetic"
    Options: ClassVar[type] = LogRegOptions
    primary_metric: ClassVar[str] = "accuracy"
    pipeline_reason: ClassVar[str] = ("one linear layer (flatten has no parameters): nothing to split across "
                                      "pipeline stages")
    vectorisable: ClassVar[bool] = True

    def __init__(self, options: LogRegOptions | None = None) -> None:
        super().__init__(options)
        for width in self.options.hidden:
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ConfigError("<task_options>", "task_options.hidden", list(self.options.hidden),
                                  "widths must be integers >= 1")

    def build_model(self, info: DataInfo) -> nn.Module:
        if info.num_classes < 2:
            raise FedsimError(f"logreg needs integer class labels (>= 2 classes); dataset '{info.name}' has "
                              f"{info.num_classes}")
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width = int(np.prod(info.input_shape))
        for i, h in enumerate(self.options.hidden):
            layers[f"hidden{i}"] = nn.Linear(width, h)
            layers[f"relu{i}"] = nn.ReLU()
            width = h
        layers["linear"] = nn.Linear(width, info.num_classes)
        return nn.Sequential(layers)

    def output_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int = 512) -> dict[str, float]:
        return classification_metrics(model, dataset, batch_size)

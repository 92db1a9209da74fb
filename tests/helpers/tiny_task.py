"""A tiny softmax-regression task on digits: exercises the core without any Part-A model."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from fedsim.data import DataInfo
from fedsim.tasks import Batch, Task, eval_loader, move_batch


@dataclass(frozen=True)
class TinyOptions:
    hidden: int = 16
    """Hidden units (0 = plain softmax regression)."""


class TinyTask(Task):
    name = "tiny"
    description = "MLP on flattened digits (tests only)"
    Options = TinyOptions
    pipeline_split_points = ("act", "out")

    def build_model(self, info: DataInfo) -> nn.Module:
        features = int(torch.tensor(info.input_shape).prod())
        hidden = self.options.hidden
        if not hidden:
            return nn.Sequential(OrderedDict(flatten=nn.Flatten(), out=nn.Linear(features, info.num_classes)))
        return nn.Sequential(OrderedDict(
            flatten=nn.Flatten(), hidden=nn.Linear(features, hidden), act=nn.Tanh(),
            out=nn.Linear(hidden, info.num_classes)))

    def output_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(output, target)

    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int = 512) -> dict[str, float]:
        correct, total, loss = 0, 0, 0.0
        for batch in eval_loader(dataset, batch_size):
            x, y = move_batch(batch, model)
            logits = model(x)
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
        return {"accuracy": correct / total, "loss": loss / total}


class LossOnlyTask(TinyTask):
    """A user task written the simplest way (and before hooks took a context): it overrides only
    ``loss(model, batch)``, doing forward and loss in one call."""

    name = "tiny_loss_only"
    vectorisable = True  # claims it; the vectorised engine still refuses it (no separable loss)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

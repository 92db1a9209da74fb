"""Tasks: how each model is built, trained and scored. One definition serves every engine.

A task is a subclass of :class:`Task` registered by name in :data:`TASKS` (lazy ``module:Class``
strings, so ``fedsim list`` does not import every model). Users plug in their own with
``task = "my_module:MyTask"`` in an experiment file.

Conventions every engine relies on:

* data are ``TensorDataset(x, y)`` with exactly two tensors (multi-target tasks pack their
  targets into one ``y`` tensor), so samplers, partitioners and pipeline schedules stay generic;
* ``loss(model, batch)`` is the mean over the batch, so gradient averaging across ranks or
  microbatches equals a large-batch step;
* a model that is a stack of layers runs its named children in order, so the pipeline engine
  can cut it at :attr:`Task.pipeline_split_points`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedsim.config import TrainConfig, from_dict
from fedsim.data import DataInfo, DatasetSplit
from fedsim.errors import FedsimError, UnsupportedError
from fedsim.registry import import_object

__all__ = ["TASKS", "Task", "NoOptions", "make_task", "task_class", "make_optimizer", "Batch"]

Batch = tuple[torch.Tensor, torch.Tensor]
Optimizers = dict[str, torch.optim.Optimizer]
ExtraLoss = Callable[[nn.Module], torch.Tensor]


@dataclass(frozen=True)
class NoOptions:
    """A task without options."""


def make_optimizer(params: Any, train: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer named in the config, from torch.optim (never hand-written)."""
    lr = train.lr if lr is None else lr
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay)
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=train.weight_decay)
    if train.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=train.weight_decay)
    raise FedsimError(f"unknown optimizer '{train.optimizer}'")


class Task:
    """Base class: override :meth:`build_model`, :meth:`loss` and :meth:`evaluate` at least."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    default_dataset: ClassVar[str] = "digits"
    Options: ClassVar[type] = NoOptions
    primary_metric: ClassVar[str] = "accuracy"
    """Metric that comparisons report (higher is better unless listed in ``lower_is_better``)."""
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"loss", "test_loss", "mse", "recon_mse"})
    supports_data_parallel: ClassVar[bool] = True
    data_parallel_reason: ClassVar[str] = ""
    pipeline_split_points: ClassVar[tuple[str, ...]] = ()
    """Names of child modules where a new pipeline stage may start; empty = cannot be pipelined."""
    pipeline_reason: ClassVar[str] = ""
    vectorisable: ClassVar[bool] = False
    """Clients share one architecture and a plain loss: K clients may train at once with torch.func."""

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()
        self.out_dir: Path | None = None
        """Folder of the current run; engines set it so tasks can write figures there."""
        self.epoch = 0
        """Epoch the shared loop is in (plus the engine's offset, e.g. the federated round): tasks key
        per-sample random draws (MAE masks) by it, never by rank, batch or call count."""

    # ---- data -------------------------------------------------------------------------
    def prepare_data(self, split: DatasetSplit) -> DatasetSplit:
        """Adapt a loaded dataset to this task (e.g. pool, flatten, derive labels). Default: as is."""
        return split

    # ---- model ------------------------------------------------------------------------
    def build_model(self, info: DataInfo) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean loss of a batch (a scalar tensor with grad)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int = 512) -> dict[str, float]:
        """Metrics of ``model`` on ``dataset``; keys are plain names like ``accuracy``, ``loss``."""
        raise NotImplementedError

    def final_metrics(self, model: nn.Module, split: DatasetSplit) -> dict[str, float]:
        """Costly metrics computed once at the end of a run (probes, episodes). Default: none."""
        return {}

    # ---- optimisation -----------------------------------------------------------------
    def build_optimizers(self, model: nn.Module, train: TrainConfig) -> Optimizers:
        """One optimizer per player; most tasks have one called ``model``."""
        return {"model": make_optimizer(model.parameters(), train)}

    def train_step(
        self, model: nn.Module, batch: Batch, optimizers: Optimizers, extra_loss: ExtraLoss | None = None
    ) -> dict[str, float]:
        """One optimisation step. Tasks with several players (the GAN) override this.

        ``extra_loss(model)`` adds a term to the objective (FedProx's proximal term); engines pass
        it instead of writing a second loop.
        """
        optimizer = optimizers["model"]
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(model, batch)
        total = loss + extra_loss(model) if extra_loss is not None else loss
        total.backward()
        optimizer.step()
        return {"loss": float(loss.detach())}

    # ---- capabilities -----------------------------------------------------------------
    def require(self, capability: str) -> None:
        """Raise a clear :class:`UnsupportedError` if this task cannot run in ``capability``."""
        if capability == "data_parallel" and not self.supports_data_parallel:
            raise UnsupportedError(f"task '{self.name}' cannot run data-parallel: {self.data_parallel_reason}")
        if capability == "pipeline" and not self.pipeline_split_points:
            raise UnsupportedError(f"task '{self.name}' cannot be pipelined: {self.pipeline_reason}")
        if capability == "vectorise" and not self.vectorisable:
            raise UnsupportedError(f"task '{self.name}' cannot train vectorised clients")


def eval_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def move_batch(batch: Batch, model: nn.Module) -> Batch:
    """Inputs to the model's device and (floating) dtype; integer targets keep their dtype."""
    x, y = batch
    device, dtype = model_device(model), model_dtype(model)
    x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    y = y.to(device=device, dtype=dtype) if y.is_floating_point() else y.to(device)
    return x, y


# Name -> "module:Class". Lazy so that listing tasks does not import every model.
TASKS: dict[str, str] = {
    "exam_net": "fedsim.tasklib.part_a:ExamNetTask",
    "linear_ae": "fedsim.tasklib.part_a:LinearAETask",
    "bn_cnn": "fedsim.tasklib.part_a:BNConvNetTask",
    "gan": "fedsim.tasklib.part_a:GANTask",
    "dual_head_vit": "fedsim.tasklib.part_a:DualHeadViTTask",
    "mae": "fedsim.tasklib.mae:MAETask",
    "fewshot_dc": "fedsim.tasklib.fewshot:FewShotDCTask",
}


def task_class(name: str) -> type[Task]:
    """Resolve a registered task name or a user's ``module:Class``."""
    if name in TASKS:
        return import_object(TASKS[name])
    if ":" in name:
        cls = import_object(name)
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise FedsimError(f"'{name}' is not a fedsim.tasks.Task subclass")
        return cls
    raise FedsimError(f"unknown task '{name}'; known: {', '.join(sorted(TASKS))} or module:Class")


def make_task(name: str, options: dict[str, Any] | None = None, file: str = "<code>") -> Task:
    """Instantiate a task with its options validated (unknown option keys name the file and key)."""
    cls = task_class(name)
    opts = from_dict(cls.Options, dict(options or {}), file, "task_options")
    return cls(opts)


def options_dict(task: Task) -> dict[str, Any]:
    return dataclasses.asdict(task.options)

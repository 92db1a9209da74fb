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
import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from fedsim.config import TrainConfig, from_dict
from fedsim.data import DataInfo, DatasetSplit
from fedsim.errors import FedsimError, UnsupportedError
from fedsim.registry import import_object
from fedsim.train import (
    Batch,
    ExtraLoss,
    Optimizers,
    TaskContext,
    TensorBatches,
    model_device,
    model_dtype,
    move_batch,
)

__all__ = ["TASKS", "Task", "NoOptions", "make_task", "task_class", "make_optimizer", "Batch", "ExtraLoss",
           "Optimizers", "TaskContext", "eval_loader", "model_device", "model_dtype", "move_batch", "options_dict"]



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


_CONTEXT_HOOKS = ("loss", "train_step", "final_metrics")
"""Hooks that take the engine's :class:`TaskContext` as a keyword (``context=``)."""


def _drop_context(hook: Callable[..., Any]) -> Callable[..., Any]:
    """A hook written before hooks took ``context`` (``loss(self, model, batch)``), made callable with it."""

    @functools.wraps(hook)
    def call(self: Task, *args: Any, context: TaskContext | None = None, **kwargs: Any) -> Any:
        return hook(self, *args, **kwargs)

    return call


def _drop_context_static(hook: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(hook)
    def call(*args: Any, context: TaskContext | None = None, **kwargs: Any) -> Any:
        return hook(*args, **kwargs)

    return call


class Task:
    """Base class: override :meth:`build_model`, :meth:`output_loss` (or :meth:`loss`) and :meth:`evaluate`.

    The forward pass and the loss are separate hooks, composed by :meth:`loss`:
    ``loss = output_loss(forward(model, batch, context), target)`` with
    ``forward = model(*model_inputs(model, batch, context))``. Pipeline schedules feed
    :meth:`model_inputs` to the first stage and :meth:`output_loss` to the last; ``torch.func``
    (vectorised clients) calls the model functionally between the two. A task that overrides only
    :meth:`loss` still runs central, DDP, federated, parameter-server and gossip; the pipeline and
    vectorised engines refuse it with a message (:meth:`require`).

    Engines never set attributes on a task: what a hook needs to know about where it runs (epoch,
    run folder, rank, device) comes in the :class:`TaskContext` argument.
    """

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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Tasks written before the hooks took a context keep working: engines always pass
        # ``context=``, and an override that does not accept it gets a wrapper that drops it.
        for name in _CONTEXT_HOOKS:
            hook = cls.__dict__.get(name)
            if isinstance(hook, staticmethod):  # no ``self``: adapt the function, keep it static
                function = hook.__func__
                if "context" not in inspect.signature(function).parameters:
                    setattr(cls, name, staticmethod(_drop_context_static(function)))
            elif callable(hook) and "context" not in inspect.signature(hook).parameters:
                setattr(cls, name, _drop_context(hook))

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    # ---- data -------------------------------------------------------------------------
    def prepare_data(self, split: DatasetSplit) -> DatasetSplit:
        """Adapt a loaded dataset to this task (e.g. pool, flatten, derive labels). Default: as is."""
        return split

    # ---- model, forward and loss --------------------------------------------------------
    def build_model(self, info: DataInfo) -> nn.Module:
        raise NotImplementedError

    def model_inputs(self, model: nn.Module, batch: Batch, context: TaskContext) -> tuple[Any, ...]:
        """What the model (or a pipeline's first stage) is called with. Default: ``(x,)``.

        Tasks that draw per-sample randomness for the forward pass (MAE masks) make it here, keyed
        by ``context.epoch`` and the sample, never by rank, batch or call count.
        """
        return (batch[0],)

    def forward(self, model: nn.Module, batch: Batch, context: TaskContext) -> Any:
        """The model's output on a batch: ``model(*model_inputs(...))``."""
        return model(*self.model_inputs(model, batch, context))

    def output_loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch from the model's output and the batch's target (a scalar with grad)."""
        raise NotImplementedError(f"task '{self.name or type(self).__name__}' defines neither output_loss nor loss")

    def loss(self, model: nn.Module, batch: Batch, context: TaskContext | None = None) -> torch.Tensor:
        """Mean loss of a batch (a scalar tensor with grad): ``output_loss(forward(...), target)``."""
        return self.output_loss(self.forward(model, batch, context or TaskContext()), batch[1])

    @classmethod
    def has_separable_loss(cls) -> bool:
        """True when the loss is the composition of :meth:`forward` and :meth:`output_loss`, which the
        pipeline and vectorised engines call separately (False for a task that overrides only ``loss``)."""
        return cls.loss is Task.loss and cls.output_loss is not Task.output_loss

    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int = 512) -> dict[str, float]:
        """Metrics of ``model`` on ``dataset``; keys are plain names like ``accuracy``, ``loss``."""
        raise NotImplementedError

    def final_metrics(self, model: nn.Module, split: DatasetSplit, *, context: TaskContext) -> dict[str, float]:
        """Costly metrics computed once at the end of a run (probes, episodes); figures go to
        ``context.run_dir`` when it is set. Default: none."""
        return {}

    # ---- optimisation -----------------------------------------------------------------
    def build_optimizers(self, model: nn.Module, train: TrainConfig) -> Optimizers:
        """One optimizer per player; most tasks have one called ``model``."""
        return {"model": make_optimizer(model.parameters(), train)}

    def train_step(
        self, model: nn.Module, batch: Batch, optimizers: Optimizers, extra_loss: ExtraLoss | None = None, *,
        context: TaskContext,
    ) -> dict[str, float]:
        """One optimisation step. Tasks with several players (the GAN) override this.

        ``extra_loss(model)`` adds a term to the objective (FedProx's proximal term); engines pass
        it instead of writing a second loop.
        """
        optimizer = optimizers["model"]
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(model, batch, context=context)
        total = loss + extra_loss(model) if extra_loss is not None else loss
        total.backward()
        optimizer.step()
        return {"loss": float(loss.detach())}

    # ---- capabilities -----------------------------------------------------------------
    def require(self, capability: str) -> None:
        """Raise a clear :class:`UnsupportedError` if this task cannot run in ``capability``."""
        label = f"task '{self.name or type(self).__name__}'"
        if capability == "data_parallel" and not self.supports_data_parallel:
            raise UnsupportedError(f"{label} cannot run data-parallel: {self.data_parallel_reason}")
        if capability == "pipeline" and not self.pipeline_split_points:
            raise UnsupportedError(f"{label} cannot be pipelined: {self.pipeline_reason}")
        if capability == "vectorise" and not self.vectorisable:
            raise UnsupportedError(f"{label} cannot train vectorised clients")
        if capability in ("pipeline", "vectorise") and not self.has_separable_loss():
            what = "a pipeline's last stage" if capability == "pipeline" else "torch.func (vectorised clients)"
            raise UnsupportedError(f"{label} overrides Task.loss only; {what} needs the forward pass and the loss "
                                   "apart: define Task.output_loss(output, target) (and model_inputs if the model "
                                   "takes more than x) instead of loss")


def eval_loader(dataset: Dataset, batch_size: int) -> Iterable[Batch]:
    """``dataset``'s samples in order, ``batch_size`` at a time.

    A ``TensorDataset`` (or a ``Subset`` of one) is sliced: the same tensors ``DataLoader``'s default
    collate stacks row by row, without a Python call per sample (a 360-sample test set took 5 ms that
    way, as long as evaluating it). Anything else goes through ``DataLoader``.
    """
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        return TensorBatches(dataset.dataset, [int(i) for i in dataset.indices], batch_size)
    if isinstance(dataset, TensorDataset):
        return TensorBatches(dataset, list(range(len(dataset))), batch_size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


# Name -> "module:Class". Lazy so that listing tasks does not import every model.
TASKS: dict[str, str] = {
    "exam_net": "fedsim.tasks.part_a:ExamNetTask",
    "linear_ae": "fedsim.tasks.part_a:LinearAETask",
    "bn_cnn": "fedsim.tasks.part_a:BNConvNetTask",
    "gan": "fedsim.tasks.part_a:GANTask",
    "dual_head_vit": "fedsim.tasks.part_a:DualHeadViTTask",
    "mae": "fedsim.tasks.mae:MAETask",
    "fewshot_dc": "fedsim.tasks.fewshot:FewShotDCTask",
    "femnist_cnn": "fedsim.tasks.benchmark:FemnistCNNTask",
    "shakespeare_lstm": "fedsim.tasks.benchmark:ShakespeareLSTMTask",
    "cifar_cnn": "fedsim.tasks.benchmark:CifarCNNTask",
    "resnet18_gn": "fedsim.tasks.benchmark:ResNet18GNTask",
    "logreg": "fedsim.tasks.logreg:LogRegTask",
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

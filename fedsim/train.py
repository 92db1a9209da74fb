"""The one training loop every engine calls (central, DDP ranks, pipeline stages, federated clients).

Engines differ only in what they hand to :func:`fit`: which batches an epoch sees (a
``DistributedSampler`` shard, a client's partition), and what one step does. The default step is
:meth:`Task.train_step` (plain forward/backward); the pipeline engine passes its schedule step
instead — the loop's only branch, as in torchtitan's ``forward_backward_step``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedsim.config import TrainConfig
from fedsim.errors import RunFailedError
from fedsim.seeding import derive_seed, epoch_permutation, keyed_generator, seed_everything

Batch = tuple[torch.Tensor, torch.Tensor]
Optimizers = dict[str, torch.optim.Optimizer]
ExtraLoss = Callable[[nn.Module], torch.Tensor]
StepFn = Callable[[Batch, "TaskContext"], dict[str, float]]
EpochHook = Callable[["TrainState", dict[str, Any]], None]


@dataclass(frozen=True)
class TaskContext:
    """What an engine tells a task about where it runs, passed to the task's hooks (never set on it).

    The loop advances ``epoch``; engines fill in the rest. Re-exported as ``fedsim.tasks.TaskContext``.
    """

    epoch: int = 0
    """Epoch of the shared loop plus the engine's offset (a federated client adds the epochs of
    earlier rounds): tasks key per-sample random draws (MAE masks) by it."""
    run_dir: Path | None = None
    """The run's results folder where the task may write figures; None where nothing is written
    (ranks other than 0, federated clients)."""
    rank: int = 0
    """Rank of this process among ``world_size`` (data-parallel ranks, pipeline stages, gossip nodes)."""
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the model's parameters are."""

    def at_epoch(self, epoch: int) -> TaskContext:
        return dataclasses.replace(self, epoch=epoch)


class SteppedTask(Protocol):
    """What the loop needs of a task (:class:`fedsim.tasks.Task` provides it); the loop sits below
    the tasks, so it names the one method it calls rather than importing them."""

    def train_step(self, model: nn.Module, batch: Batch, optimizers: Optimizers,
                   extra_loss: ExtraLoss | None = None, *, context: TaskContext) -> dict[str, float]: ...

__all__ = [
    "TrainState", "fit", "train_one_epoch", "make_loader", "epoch_permutation", "seed_everything", "derive_seed",
    "keyed_generator", "resolve_device", "configure_torch", "build_schedulers", "torch_dtype", "TensorBatches",
    "ReusedOptimizers",
]


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



class TensorBatches:
    """Batches of a ``TensorDataset`` in a given order, by tensor indexing.

    Equal to ``DataLoader(dataset, batch_size, sampler=order)`` batch for batch, without fetching
    and collating one sample at a time (the digits data sets are tiny; per-sample overhead
    dominated every engine's step time).
    """

    def __init__(self, dataset: TensorDataset, order: list[int], batch_size: int) -> None:
        self.tensors = dataset.tensors
        self.order = torch.as_tensor(order, dtype=torch.long)
        self.batch_size = batch_size

    @property
    def num_samples(self) -> int:
        return len(self.order)

    def __len__(self) -> int:
        return (len(self.order) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self.order), self.batch_size):
            index = self.order[start : start + self.batch_size]
            yield tuple(tensor[index] for tensor in self.tensors)  # type: ignore[misc]


def make_loader(
    dataset: Dataset, batch_size: int, seed: int, epoch: int, shuffle: bool = True, indices: list[int] | None = None
) -> Iterable[Batch]:
    """Batches of ``dataset`` (or of ``indices`` into it) in the (seed, epoch) order."""
    order = indices if indices is not None else list(range(len(dataset)))  # type: ignore[arg-type]
    permuted = [order[i] for i in epoch_permutation(len(order), seed, epoch, shuffle)]
    if isinstance(dataset, TensorDataset):
        return TensorBatches(dataset, permuted, batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=permuted, drop_last=False)


# ---- devices ---------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from fedsim.errors import FedsimError

        raise FedsimError("train.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def configure_torch(train: TrainConfig) -> torch.device:
    """Threads and the device for a run."""
    # CPU kernels are deterministic for a fixed thread count; no torch.use_deterministic_algorithms
    # here (it imports torch._inductor: seconds per process, paid by every rank and Ray actor).
    if train.threads > 0:
        torch.set_num_threads(train.threads)
    return resolve_device(train.device)


# ---- state -----------------------------------------------------------------------------------
def build_schedulers(optimizers: dict[str, torch.optim.Optimizer], train: TrainConfig) -> dict[str, Any]:
    """Per-epoch learning-rate schedules from torch.optim.lr_scheduler."""
    schedulers: dict[str, Any] = {}
    for name, optimizer in optimizers.items():
        if train.schedule == "cosine":
            schedulers[name] = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(train.epochs, 1))
        elif train.schedule == "step":
            schedulers[name] = torch.optim.lr_scheduler.StepLR(optimizer, step_size=train.step_size, gamma=train.gamma)
    return schedulers


class ReusedOptimizers:
    """A task's optimizers for one model and training config, built once and reset before each use.

    A federated client trains with fresh optimizers in every round; building them (parameter groups,
    defaults, torch.optim's bookkeeping) costs more than a small client's training step. A torch.optim
    optimizer whose state is empty when built (SGD, Adam, ...; not Adagrad, which fills its sums at
    construction) is the same as a new one once its per-parameter state is cleared and each parameter
    group's settings are put back as they were built (LR schedulers change ``lr`` and add
    ``initial_lr``). Anything else (other classes, state at construction) is built anew every time.
    """

    def __init__(self) -> None:
        self._kept: tuple[TrainConfig, Optimizers, list[list[dict[str, Any]]]] | None = None

    def get(self, train: TrainConfig, build: Callable[[], Optimizers]) -> Optimizers:
        """The optimizers ``build()`` would return for ``train`` (the same model every call), as new."""
        kept = self._kept
        if kept is not None and kept[0] == train:
            _, optimizers, groups = kept
            for optimizer, built in zip(optimizers.values(), groups, strict=True):
                optimizer.state.clear()
                for group, settings in zip(optimizer.param_groups, built, strict=True):
                    for key in [key for key in group if key != "params" and key not in settings]:
                        del group[key]
                    group.update(settings)
            return optimizers
        optimizers = build()
        reusable = all(type(o).__module__.startswith("torch.optim.") and not o.state for o in optimizers.values())
        self._kept = (train, optimizers, [[{k: v for k, v in group.items() if k != "params"}
                                           for group in o.param_groups] for o in optimizers.values()]) \
            if reusable else None
        return optimizers


@dataclass
class TrainState:
    """What the loop advances. ``epoch`` and ``step`` count completed work."""

    model: nn.Module
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    step: int = 0

    def optimizer_states(self) -> dict[str, Any]:
        return {k: v.state_dict() for k, v in self.optimizers.items()}

    def scheduler_states(self) -> dict[str, Any]:
        return {k: v.state_dict() for k, v in self.schedulers.items()}

    def load(self, checkpoint: dict[str, Any], model: nn.Module | None = None) -> None:
        """Restore from a checkpoint dict (see :mod:`fedsim.checkpoint`)."""
        (model or self.model).load_state_dict(checkpoint["model"])
        for name, state in checkpoint["optimizers"].items():
            self.optimizers[name].load_state_dict(state)
        for name, state in checkpoint["schedulers"].items():
            self.schedulers[name].load_state_dict(state)
        self.epoch, self.step = checkpoint["epoch"], checkpoint["step"]


# ---- the loop --------------------------------------------------------------------------------
def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[status]}"), transient=True)


def train_one_epoch(
    state: TrainState,
    batches: Iterable[Batch],
    step_fn: Callable[[Batch], dict[str, float]],
    *,
    max_steps: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Run ``step_fn`` over ``batches``; return step metrics averaged with batch-size weights."""
    totals: dict[str, float] = {}
    seen = 0
    for index, batch in enumerate(batches):
        if max_steps and index >= max_steps:
            break
        size = len(batch[0])
        metrics = step_fn(batch)
        state.step += 1
        diverged = {k: v for k, v in metrics.items() if k.endswith("loss") and not math.isfinite(v)}
        if diverged:
            # Training on would only spread NaNs into checkpoints and averages: stop here, keeping the
            # epochs already logged and checkpointed.
            name, value = next(iter(diverged.items()))
            raise RunFailedError(f"the training {name} became {value} at step {state.step} (epoch {state.epoch + 1}); "
                                 "lower train.lr or check the data")
        seen += size
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value) * size
        if on_step is not None:
            on_step(state.step)
    return {key: value / max(seen, 1) for key, value in totals.items()}


def fit(
    task: SteppedTask,
    state: TrainState,
    train: TrainConfig,
    batches_for_epoch: Callable[[int], Iterable[Batch]],
    *,
    context: TaskContext,
    epochs: int | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    step_fn: StepFn | None = None,
    extra_loss: ExtraLoss | None = None,
    on_epoch_end: EpochHook | None = None,
    on_step: Callable[[int], None] | None = None,
    show_progress: bool | None = None,
    description: str = "train",
    epoch_offset: int = 0,
) -> list[dict[str, Any]]:
    """Train from ``state.epoch`` up to ``epochs`` (default ``train.epochs``); return per-epoch records.

    Parameters
    ----------
    batches_for_epoch: the batches of one epoch, given its index (engines choose shard/order).
    evaluate: metrics after each epoch (recorded with a ``test_`` prefix); None to skip.
    context: where the run is (run folder, rank, device); each epoch's steps get it with ``epoch``
        set to ``epoch_offset + epoch``. Required, so an engine cannot forget to tell the task.
    step_fn: replaces the default ``task.train_step`` (the pipeline schedule step); called as
        ``step_fn(batch, epoch_context)``.
    extra_loss: added to the task loss by the default step (FedProx's proximal term).
    on_epoch_end: called with the state and the epoch record (checkpointing, logging).
    epoch_offset: added to the epoch index in ``context.epoch`` (a federated client passes the
        epochs of earlier rounds so that per-epoch random draws differ from round to round).
    """
    epochs = train.epochs if epochs is None else epochs
    model = state.model

    def default_step(batch: Batch, epoch_context: TaskContext) -> dict[str, float]:
        model.train()
        return task.train_step(model, move_batch(batch, model), state.optimizers, extra_loss, context=epoch_context)

    step = step_fn or default_step
    history: list[dict[str, Any]] = []
    progress = _progress(train.progress if show_progress is None else show_progress)
    if progress is not None:
        progress.start()
    try:
        for epoch in range(state.epoch, epochs):
            started = time.perf_counter()
            epoch_context = context.at_epoch(epoch_offset + epoch)
            batches = batches_for_epoch(epoch)
            bar = None
            if progress is not None:
                total = min(len(batches), train.max_steps or len(batches)) if isinstance(batches, Sized) else None
                bar = progress.add_task(f"{description} epoch {epoch + 1}/{epochs}", total=total, status="")

            def advance(global_step: int, bar: Any = bar) -> None:
                if bar is not None:
                    progress.advance(bar)
                if on_step is not None:
                    on_step(global_step)

            train_metrics = train_one_epoch(state, batches, lambda batch, c=epoch_context: step(batch, c),
                                            max_steps=train.max_steps, on_step=advance)
            for scheduler in state.schedulers.values():
                scheduler.step()
            state.epoch = epoch + 1
            record: dict[str, Any] = {"epoch": state.epoch, "step": state.step}
            record.update({f"train_{k}": v for k, v in train_metrics.items()})
            record["epoch_time_s"] = time.perf_counter() - started
            if evaluate is not None:
                model.eval()
                with torch.no_grad():
                    record.update({f"test_{k}": v for k, v in evaluate().items()})
            lrs = [group["lr"] for opt in state.optimizers.values() for group in opt.param_groups]
            if lrs:
                record["lr"] = lrs[0]
            history.append(record)
            if bar is not None:
                progress.update(bar, status=_status(record))
                progress.remove_task(bar)
            if on_epoch_end is not None:
                on_epoch_end(state, record)
    finally:
        if progress is not None:
            progress.stop()
    return history


def _status(record: dict[str, Any]) -> str:
    keys = [k for k in record if k.startswith("test_")][:2] or [k for k in record if k.startswith("train_")][:1]
    return " ".join(f"{k}={record[k]:.4g}" for k in keys if isinstance(record[k], float))

"""What every engine does before training: build the task, its data and its model, or resume."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedsim.checkpoint import load_checkpoint, make_checkpoint, restore_rng, save_checkpoint
from fedsim.config import Experiment, RunConfig
from fedsim.data import DatasetSplit, load_dataset
from fedsim.results import RunDir
from fedsim.tasks import Task, TaskContext, make_task
from fedsim.train import TrainState, build_schedulers, configure_torch, seed_everything, torch_dtype


@dataclass
class RunContext:
    """Where a run comes from and where it writes.

    ``experiment`` and ``overrides`` let a launcher (torchrun, Ray) start the same run again in
    other processes; ``rank0`` is False on ranks that must not write.
    """

    out: RunDir
    experiment: Experiment | None = None
    overrides: tuple[str, ...] = ()
    resume: bool = False
    rank0: bool = True
    extras: dict[str, Any] = field(default_factory=dict)


class WarmHeap:
    """Python's cyclic garbage collector, run at round boundaries over what the round made, not over the whole
    heap in the middle of a round.

    Two things make the default collector costly for a simulation. Once a run's first round is over, what it
    keeps to the end is alive — torch and Flower with their imports (torch's first optimizer imports
    torch._dynamo and SymPy), the data, the clients' caches: some 300k objects that each full collection walks
    again (~90 ms on the development machine, more than a round of 100 small clients) without finding garbage
    among them. And a round's replies die in reference cycles: each view of a Flower ``RecordDict``
    (``array_records``, ``metric_records``, taken by strategies and fedsim alike) holds the record and itself,
    so a reply's arrays — a model copy each — stay until a collection reaches them, which for cycles that
    outlived a young generation is the next full one (several rounds later: ~10 copies of an 11M-parameter
    model were alive at the peak of a 5-client round).

    :meth:`round_done` collects after every round. After the first it collects the young generations (where
    the round's garbage is; a full collection would cost the ~150 ms it is meant to save) and freezes what
    survived (``gc.freeze``), so that every later, full collection walks only what the run made since: about
    a millisecond. Cycles that had already reached the old generation then stay until :meth:`release` gives
    the frozen objects back at the end of the rounds. The heap is not frozen if someone else froze it already.
    """

    def __init__(self) -> None:
        self.frozen = False

    def round_done(self) -> None:
        gc.collect(2 if self.frozen else 1)
        # get_freeze_count walks the frozen objects (~30 ms for 300k): asked only while nothing is frozen by us.
        if not self.frozen and gc.get_freeze_count() == 0:
            gc.freeze()
            self.frozen = True

    def release(self) -> None:
        if self.frozen:
            gc.unfreeze()
            self.frozen = False


def load_task_data(run: RunConfig) -> tuple[Task, DatasetSplit]:
    """The run's task (options validated) and its dataset, adapted by ``task.prepare_data``."""
    task = make_task(run.task, run.task_options, run.source)
    data = run.data
    split = load_dataset(data.name or task.default_dataset, test_fraction=data.test_fraction,
                         split_seed=data.split_seed, normalise=data.normalise, data_dir=data.data_dir, **data.options)
    return task, task.prepare_data(split)


def build_model(task: Task, split: DatasetSplit, run: RunConfig, device: torch.device) -> nn.Module:
    """Seeded model init (every rank/client/engine with the same seed starts from the same weights)."""
    seed_everything(run.train.seed)
    return task.build_model(split.info).to(device=device, dtype=torch_dtype(run.train.dtype))


@dataclass
class Prepared:
    task: Task
    split: DatasetSplit
    state: TrainState
    device: torch.device


def prepare(run: RunConfig, resume_from: RunDir | None = None) -> Prepared:
    """Task, data, model, optimizers and schedulers; restored from the checkpoint when resuming."""
    device = configure_torch(run.train)
    task, split = load_task_data(run)
    model = build_model(task, split, run, device)
    optimizers = task.build_optimizers(model, run.train)
    state = TrainState(model, optimizers, build_schedulers(optimizers, run.train))
    if resume_from is not None:
        checkpoint = load_checkpoint(resume_from.checkpoint_path)
        state.load(checkpoint)
        restore_rng(checkpoint["rng"])
    return Prepared(task, split, state, device)


def save_state(out: RunDir, engine: str, state: TrainState, model: nn.Module | None = None,
               engine_state: dict[str, Any] | None = None) -> None:
    """Checkpoint a TrainState in the shared format (``model`` = the unwrapped module)."""
    module = model or state.model
    save_checkpoint(out.checkpoint_path, make_checkpoint(
        engine, module.state_dict(), state.optimizer_states(), state.scheduler_states(),
        epoch=state.epoch, step=state.step, engine_state=engine_state))


def task_context(run_dir: RunDir | None, device: torch.device, *, rank: int = 0, world_size: int = 1) -> TaskContext:
    """What an engine tells the task's hooks; ``run_dir`` None where this process writes nothing."""
    return TaskContext(run_dir=run_dir.root if run_dir is not None else None, rank=rank, world_size=world_size,
                       device=device)


def last_test_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The last record's ``test_*`` metrics under their plain names (what a summary reports)."""
    if not history:
        return {}
    return {k[len("test_"):]: v for k, v in history[-1].items() if k.startswith("test_")}


def final_run_metrics(task: Task, model: nn.Module, split: DatasetSplit, run: RunConfig,
                      history: list[dict[str, Any]], *, context: TaskContext) -> dict[str, Any]:
    """A finished run's metrics, the same for every engine that trains one model with the shared loop:
    the last epoch's test metrics and training loss (or a fresh evaluation when no epoch ran), then
    the task's costly end-of-run metrics (probes, episodes, figures in ``context.run_dir``)."""
    model.eval()
    metrics = last_test_metrics(history)
    if history:
        metrics["train_loss"] = history[-1].get("train_loss")
    else:
        with torch.no_grad():
            metrics.update(task.evaluate(model, split.test, run.train.eval_batch_size))
    metrics.update(task.final_metrics(model, split, context=context))
    return metrics


def final_parameters(model: nn.Module) -> dict[str, list[float]]:
    """Not for summaries (too big): used by tests that compare engines."""
    return {k: v.detach().cpu().flatten().tolist() for k, v in model.state_dict().items()}

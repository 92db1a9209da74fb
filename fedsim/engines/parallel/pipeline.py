"""Pipeline model-parallel training with ``torch.distributed.pipelining`` (optionally dp x pp).

``build_pipeline`` is a function applied to a plain model (the torchtitan ``pipeline_llm``
pattern): the model is cut into ``stages x virtual_stages`` pieces at named split points
(:mod:`fedsim.engines.parallel.pipeline_split`), piece ``i`` becomes a :class:`PipelineStage` on pipeline
rank ``i % stages`` (``cuda:LOCAL_RANK`` or a CPU process over gloo), and a schedule (GPipe,
1F1B, interleaved 1F1B) drives the microbatches. With ``pipeline.dp > 1`` the job is a
``dp x stages`` device mesh: each stage is wrapped in ``DistributedDataParallel`` over the
replicas of that stage, which the pipelining stages know to synchronise once per step.

The shared loop :func:`fedsim.train.fit` is reused unchanged: the only thing this engine hands
it beyond the data is ``step_fn`` = one schedule step. The task's hooks are used as declared on
:class:`fedsim.tasks.Task`: the first stage is fed ``Task.model_inputs(model, batch, context)``
and the last stage's loss is ``Task.output_loss(output, target)`` (a task that overrides only
``Task.loss`` is refused by ``Task.require("pipeline")``). Microbatch losses are batch means and the schedules divide
gradients by the number of microbatches (``scale_grads``), so a pipelined step equals
single-process gradient accumulation over the same microbatches (tested to < 1e-5 in float64).

Every rank builds the whole model from the same seed (so every piece starts from the weights a
central run would have) and keeps only its pieces on its device. After each epoch the pieces'
weights are gathered on rank 0, which evaluates the assembled model with ``Task.evaluate`` and
writes the checkpoint (the full model in the shared format, per-stage optimizer states in
``engine_state``) and the metrics. The last incomplete batch of an epoch is dropped: a schedule's
shapes are fixed by its first microbatch.

Launch: under ``torchrun`` every rank runs this engine; plain ``fedsim run`` validates the run
and starts ``torchrun`` itself (:mod:`fedsim.engines.parallel.launch`).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from fedsim.checkpoint import capture_rng, load_checkpoint, make_checkpoint, restore_rng, save_checkpoint
from fedsim.config import RunConfig
from fedsim.engines.common import RunContext, build_model, final_run_metrics, load_task_data, task_context
from fedsim.engines.parallel.pipeline_split import (
    PipelinePiece,
    SplitPlan,
    check_schedule,
    make_pieces,
    plan_split,
)
from fedsim.errors import ConfigError, FedsimError
from fedsim.results import make_summary
from fedsim.tasks import Batch, Task, TaskContext
from fedsim.train import TensorBatches, TrainState, build_schedulers, configure_torch, fit, make_loader

__all__ = ["run_pipeline", "build_pipeline", "Pipeline", "SCHEDULES", "ideal_efficiency",
           "validate_run", "use_cuda"]

SCHEDULES: dict[str, str] = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
}
"""``pipeline.schedule`` -> class in ``torch.distributed.pipelining``."""


def ideal_efficiency(stages: int, microbatches: int) -> float:
    """Fraction of a GPipe/1F1B step spent computing when stages are equal: ``1 - (S-1)/(m+S-1)``."""
    return 1.0 - (stages - 1) / (microbatches + stages - 1)


def _to(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors take the model's dtype; integer ones (labels, indices) keep theirs."""
    return tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor.to(device)


def _as_tuple(value: Any) -> tuple[torch.Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def probe_boundaries(model: nn.Module, plan: SplitPlan, inputs: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """Example tensors at every piece boundary for one microbatch: ``[inputs, out_0, ..., out_last]``.

    Run on a deep copy with the RNG forked, so that the real model's BatchNorm statistics and the
    training random stream are untouched. The stages get these as static metadata; otherwise the
    schedule would infer it with a real forward of the live modules (updating running statistics
    an extra time) and a receiving stage would feed uninitialised buffers to its modules.
    """
    shadow = copy.deepcopy(model).train()
    pieces = make_pieces(shadow, plan)
    boundaries = [tuple(t.detach() for t in inputs)]
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        state: tuple[torch.Tensor, ...] = inputs
        for piece in pieces:
            state = _as_tuple(piece(*state))
            boundaries.append(state)
    return boundaries


def _example(tensors: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Empty tensors with the probed shape, dtype and requires_grad (what the stage metadata needs)."""
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=device).requires_grad_(t.requires_grad) for t in tensors)


# ---- the pipeline -----------------------------------------------------------------------------------
@dataclass
class Pipeline:
    """This rank's part of a pipelined model.

    Attributes
    ----------
    schedule: the ``torch.distributed.pipelining`` schedule (its ``step`` is one training step).
    pieces: the plain pieces this rank runs (parameters live here; stages may wrap them in DDP).
    piece_ids: global piece index of each local piece.
    has_first, has_last: whether this rank feeds the inputs / computes the loss.
    """

    plan: SplitPlan
    schedule: Any
    pieces: list[PipelinePiece]
    piece_ids: list[int]
    stages: list[Any]
    device: torch.device
    dtype: torch.dtype
    pp_rank: int
    dp_rank: int
    has_first: bool
    has_last: bool
    pp_group: Any = None
    dp_group: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

    def module(self) -> nn.ModuleList:
        return nn.ModuleList(self.pieces)

    def piece_state(self) -> dict[str, torch.Tensor]:
        """This rank's weights and buffers under the full model's keys, on the CPU."""
        return {k: v.detach().cpu().clone() for piece in self.pieces for k, v in piece.state_dict().items()}


def _mesh(dp: int, stages: int, device: torch.device) -> tuple[Any, Any, int, int]:
    """Process groups of a ``dp x stages`` job: rank ``d * stages + p`` is stage ``p`` of replica ``d``."""
    if dp == 1:
        return None, None, dist.get_rank(), 0  # the world is the pipeline: no extra groups
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dp, stages), mesh_dim_names=("dp", "pp"))
    return mesh.get_group("pp"), mesh.get_group("dp"), mesh.get_local_rank("pp"), mesh.get_local_rank("dp")


def build_pipeline(
    model: nn.Module,
    task: Task,
    run: RunConfig,
    example_inputs: tuple[torch.Tensor, ...],
    device: torch.device,
) -> Pipeline:
    """Apply pipeline (and, with ``pipeline.dp > 1``, data) parallelism to a plain model.

    Parameters
    ----------
    model: the whole model, identical on every rank (same seed), on the CPU.
    example_inputs: one microbatch of first-stage inputs (shapes for the stage metadata).
    device: this rank's device (``cuda:LOCAL_RANK`` or CPU).

    Every rank of the job must call this collectively.
    """
    from torch.distributed import pipelining
    from torch.nn.parallel import DistributedDataParallel

    cfg = run.pipeline
    check_schedule(run, dist.get_world_size())
    plan = plan_split(model, task, run)
    pp_group, dp_group, pp_rank, dp_rank = _mesh(cfg.dp, cfg.stages, device)
    dtype = next(model.parameters()).dtype
    boundaries = probe_boundaries(model, plan, example_inputs)
    all_pieces = make_pieces(model, plan)
    piece_ids = [i for i in range(plan.pieces) if i % cfg.stages == pp_rank]
    pieces = [all_pieces[i].to(device) for i in piece_ids]
    stages = []
    for i, piece in zip(piece_ids, pieces, strict=True):
        submodule: nn.Module = piece
        if cfg.dp > 1 and any(p.requires_grad for p in piece.parameters()):
            # DDP over this stage's replicas; the pipelining stage runs all but the last microbatch
            # under no_sync and lets the reducer all-reduce once per step.
            submodule = DistributedDataParallel(piece, process_group=dp_group,
                                                device_ids=[device.index] if device.type == "cuda" else None)
        stages.append(pipelining.PipelineStage(
            submodule, i, plan.pieces, device,
            input_args=_example(boundaries[i], device), output_args=_example(boundaries[i + 1], device),
            group=pp_group))
    loss_fn = task.output_loss  # the schedule calls loss_fn(last stage output, target microbatch)
    schedule_cls = getattr(pipelining, SCHEDULES[cfg.schedule])
    if cfg.schedule == "interleaved_1f1b":
        schedule = schedule_cls(stages, cfg.microbatches, loss_fn=loss_fn)
    else:
        schedule = schedule_cls(stages[0], cfg.microbatches, loss_fn=loss_fn)
    return Pipeline(plan=plan, schedule=schedule, pieces=pieces, piece_ids=piece_ids, stages=stages, device=device,
                    dtype=dtype, pp_rank=pp_rank, dp_rank=dp_rank, has_first=0 in piece_ids,
                    has_last=plan.pieces - 1 in piece_ids, pp_group=pp_group, dp_group=dp_group)


# ---- data ---------------------------------------------------------------------------------------------
class FullBatches:
    """The batches of a loader that have exactly ``size`` samples (drops the last incomplete one)."""

    def __init__(self, loader: TensorBatches | DataLoader, size: int) -> None:
        self.loader, self.size = loader, size

    def __len__(self) -> int:
        samples = self.loader.num_samples if isinstance(self.loader, TensorBatches) else len(self.loader.sampler)
        return samples // self.size  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            if len(batch[0]) == self.size:
                yield batch


# ---- validation (also in the launching process) ---------------------------------------------------
def validate_run(run: RunConfig) -> SplitPlan:
    """Every check that needs no process group: the schedule settings and the split against the
    task's model (built on the CPU). Raised before any worker starts, with the key and value."""
    check_schedule(run)
    task, split = load_task_data(run)
    model = build_model(task, split, run, torch.device("cpu"))
    return plan_split(model, task, run)


# ---- the engine -----------------------------------------------------------------------------------
def run_pipeline(run: RunConfig, ctx: RunContext) -> dict[str, Any]:
    """Train ``run`` pipelined: on this rank under torchrun, else by launching torchrun."""
    from fedsim.distributed import under_launcher

    if not under_launcher():
        validate_run(run)
        use_cuda(run, run.pipeline.dp * run.pipeline.stages)  # fail here, not in every worker
        from fedsim.engines.parallel.launch import launch_torchrun

        return launch_torchrun(ctx, run, run.pipeline.dp * run.pipeline.stages, timeout_s=run.pipeline.timeout_s)
    return _run_rank(run, ctx)


def use_cuda(run: RunConfig, local_processes: int) -> bool:
    """One GPU per stage process (nccl) when ``train.device`` allows CUDA and this node has a GPU for
    every process; ``train.device = "cuda"`` without enough GPUs is an error, ``auto`` falls back to CPU."""
    if run.train.device == "cpu":
        return False
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if run.train.device == "cuda" and gpus < local_processes:
        raise ConfigError(run.source, "train.device", run.train.device,
                          f"the pipeline puts each of its {local_processes} processes on this node on its own GPU "
                          f"(stage i on cuda:i) but {gpus} GPU(s) are visible; use train.device = \"cpu\" or fewer "
                          f"pipeline.stages x pipeline.dp")
    return gpus >= local_processes


def _run_rank(run: RunConfig, ctx: RunContext) -> dict[str, Any]:
    from fedsim.distributed import distributed_session, read_env

    env = read_env()
    env = read_env(use_cuda=use_cuda(run, env.local_world_size))
    with distributed_session(env, timeout_s=run.pipeline.timeout_s):
        return _train(run, ctx, env.device, env.rank)


def _train(run: RunConfig, ctx: RunContext, device: torch.device, rank: int) -> dict[str, Any]:
    started = time.time()
    cfg, train_cfg, out = run.pipeline, run.train, ctx.out
    check_schedule(run, dist.get_world_size())
    configure_torch(train_cfg)
    rank0 = rank == 0
    resume = ctx.resume and out.checkpoint_path.exists()
    if rank0 and not resume:
        out.reset_metrics()
    task, split = load_task_data(run)
    context = task_context(out if rank0 else None, device, rank=rank, world_size=dist.get_world_size())
    model = build_model(task, split, run, torch.device("cpu"))
    checkpoint = load_checkpoint(out.checkpoint_path) if resume else None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    # Rank 0 evaluates and checkpoints an assembled copy of the whole model.
    eval_model = copy.deepcopy(model).to(device) if rank0 else None
    micro = train_cfg.batch_size // cfg.microbatches
    first = next(iter(DataLoader(split.train, batch_size=micro)))
    first = (_to(first[0], torch.device("cpu"), _dtype(model)), first[1])
    example = tuple(task.model_inputs(model, first, context))
    pipe = build_pipeline(model, task, run, example, device)
    local = pipe.module()
    optimizers = task.build_optimizers(local, train_cfg)
    state = TrainState(local, optimizers, build_schedulers(optimizers, train_cfg))
    if checkpoint is not None:
        engine_state = checkpoint["engine_state"]
        if engine_state.get("split") != list(pipe.plan.split_points) or \
                len(engine_state.get("rank_rng", [])) != dist.get_world_size():
            raise FedsimError(f"{out.checkpoint_path}: written with split {engine_state.get('split')} on "
                              f"{len(engine_state.get('rank_rng', []))} ranks; this run splits at "
                              f"{list(pipe.plan.split_points)} on {dist.get_world_size()} ranks: cannot resume")
        for name, opt_state in engine_state["stage_optimizers"][pipe.pp_rank].items():
            state.optimizers[name].load_state_dict(opt_state)
        for name, sched_state in engine_state["stage_schedulers"][pipe.pp_rank].items():
            state.schedulers[name].load_state_dict(sched_state)
        state.epoch, state.step = checkpoint["epoch"], checkpoint["step"]
        restore_rng(engine_state["rank_rng"][dist.get_rank()])

    step_times: list[float] = []
    b, dp = train_cfg.batch_size, cfg.dp
    # Replica d takes every dp-th sample of the global batch (DistributedSampler's interleaving, as
    # the ddp engine): the replicas' k-th batches together are the central run's k-th batch.
    shard = slice(pipe.dp_rank, None, dp)

    def step_fn(batch: Batch, epoch_context: TaskContext) -> dict[str, float]:
        tick = time.perf_counter()
        x, y = batch[0][shard], batch[1][shard]
        model.train()  # the shared children of this rank's pieces, and the training flag tasks read
        for optimizer in state.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        target = _to(y, device, pipe.dtype) if pipe.has_last else None
        if pipe.has_first:
            inputs = task.model_inputs(model, (_to(x, device, pipe.dtype), _to(y, device, pipe.dtype)), epoch_context)
            pipe.schedule.step(*inputs, target=target, losses=losses)
        else:
            pipe.schedule.step(target=target, losses=losses)
        for optimizer in state.optimizers.values():
            optimizer.step()
        # The loss lives on the last stage; rank 0 records it (averaged over the dp replicas).
        value = torch.stack([loss.detach() for loss in losses]).mean().double() if pipe.has_last else \
            torch.zeros((), dtype=torch.float64, device=device)
        total = value.reshape(1).to(device)
        dist.all_reduce(total)
        step_times.append(time.perf_counter() - tick)
        return {"loss": float(total.item()) / dp}

    gathered: dict[str, Any] = {}
    epoch_start = [0]  # index in step_times where the current epoch's steps begin

    def gather() -> None:
        """Pieces' weights, optimizer states and RNG of every rank -> rank 0 (one collective)."""
        payload = {"rank": dist.get_rank(), "pp_rank": pipe.pp_rank, "dp_rank": pipe.dp_rank,
                   "weights": pipe.piece_state(),
                   "optimizers": _cpu(state.optimizer_states()), "schedulers": state.scheduler_states(),
                   "rng": capture_rng()}
        boxes: list[Any] = [None] * dist.get_world_size() if rank0 else []
        dist.gather_object(payload, boxes if rank0 else None, dst=0)
        if rank0:
            replica0 = sorted((p for p in boxes if p["dp_rank"] == 0), key=lambda p: p["pp_rank"])
            weights: dict[str, torch.Tensor] = {}
            for part in replica0:
                weights.update(part["weights"])
            eval_model.load_state_dict(weights)
            gathered.update(stage_optimizers=[p["optimizers"] for p in replica0],
                            stage_schedulers=[p["schedulers"] for p in replica0],
                            rank_rng=[p["rng"] for p in sorted(boxes, key=lambda p: p["rank"])])

    def evaluate() -> dict[str, float]:
        gather()
        if not rank0:
            return {}
        eval_model.eval()  # fit() switches the local pieces to eval mode, not this copy
        return task.evaluate(eval_model, split.test, train_cfg.eval_batch_size)

    def on_epoch_end(state_now: TrainState, record: dict[str, Any]) -> None:
        epoch_times = step_times[epoch_start[0]:]
        epoch_start[0] = len(step_times)
        if not rank0:
            return
        record["step_time_s"] = statistics.median(epoch_times) if epoch_times else None  # this epoch's median
        out.log(record)
        if train_cfg.checkpoint:
            save_checkpoint(out.checkpoint_path, make_checkpoint(
                "pipeline", {k: v.cpu() for k, v in eval_model.state_dict().items()}, {}, {},
                epoch=state_now.epoch, step=state_now.step,
                engine_state={**gathered, "split": list(pipe.plan.split_points)}))

    history = fit(
        task, state, train_cfg,
        lambda epoch: FullBatches(make_loader(split.train, b * dp, train_cfg.seed, epoch, train_cfg.shuffle), b * dp),
        context=context, evaluate=evaluate, step_fn=step_fn, on_epoch_end=on_epoch_end,
        show_progress=train_cfg.progress and rank0, description=f"{run.name} [pipeline rank {rank}]",
    )
    if not history:
        gather()  # zero epochs (or resumed at the end): rank 0 still needs the assembled model
    return _summarise(run, ctx, task, split, state, pipe, eval_model, history, step_times, started, resume, context)


def _summarise(run: RunConfig, ctx: RunContext, task: Task, split: Any, state: TrainState, pipe: Pipeline,
               eval_model: nn.Module | None, history: list[dict[str, Any]], step_times: list[float],
               started: float, resume: bool, context: TaskContext) -> dict[str, Any]:
    cfg = run.pipeline
    info = {
        "stages": cfg.stages, "dp": cfg.dp, "schedule": cfg.schedule, "microbatches": cfg.microbatches,
        "virtual_stages": cfg.virtual_stages, "split": list(pipe.plan.split_points), "pieces": pipe.plan.describe(),
        "ideal_efficiency": ideal_efficiency(cfg.stages, cfg.microbatches),
        "step_time_s": statistics.median(step_times) if step_times else None,
    }
    if eval_model is None:  # ranks > 0 write nothing
        return {"name": run.name, "mode": run.mode, "rank": dist.get_rank(), "metrics": {}, "pipeline": info}
    out = ctx.out
    eval_model.eval()
    if resume:
        history = out.read_metrics()
    metrics = final_run_metrics(task, eval_model, split, run, history, context=context)
    summary = make_summary(run, metrics, primary_metric=task.primary_metric, started=started, extra={
        "epochs": state.epoch, "steps": state.step, "history": history, "pipeline": info})
    out.write_summary(summary)
    summary["model"] = eval_model  # in-memory only
    return summary


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _cpu(obj: Any) -> Any:
    """Optimizer states to the CPU (so that rank 0 can pickle and load them anywhere)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj

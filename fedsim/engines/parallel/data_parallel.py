"""Data-parallel training: what one worker does, whoever started it (torchrun or Ray Train).

The engine for ``mode = "ddp"`` (:func:`fedsim.engines.parallel.ddp.run_ddp`) calls
:func:`train_data_parallel` inside a worker, or starts workers that call it.

Every rank walks the same (seed, epoch) permutation of the training set that the central engine
uses and takes every ``world``-th sample of it (``DistributedSampler``'s interleaving), so the
ranks' k-th batches together are exactly the central run's k-th batch of ``world * batch_size``
samples; with a batch-mean loss, DDP's gradient average then equals the large-batch gradient.
The shared loop :func:`fedsim.train.fit` runs unchanged on the wrapped model. Only rank 0 logs,
writes results and checkpoints; the other ranks receive rank 0's checkpoint on resume.

With ``train.dp`` (DP-SGD, :mod:`fedsim.privacy.dpsgd`) Opacus' ``DPDDP`` replaces DDP: each rank
Poisson-samples its share of the data, clips per sample, rank 0 adds the noise and the optimizer
all-reduces; the accountant's history travels in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from torch import nn

from fedsim.checkpoint import capture_rng, load_checkpoint, make_checkpoint, restore_rng, save_checkpoint
from fedsim.config import RunConfig
from fedsim.data import DatasetSplit
from fedsim.distributed import (
    DistEnv,
    all_reduce_mean,
    broadcast_object,
    parameters_in_sync,
    under_launcher,
    wrap_ddp,
)
from fedsim.engines.common import final_run_metrics, prepare, task_context
from fedsim.errors import ConfigError, FedsimError
from fedsim.results import RunDir, make_summary
from fedsim.seeding import strided_shard
from fedsim.tasks import Task, TaskContext, make_task
from fedsim.train import derive_seed, fit, make_loader

__all__ = ["train_data_parallel", "rank_shard", "validate_ddp", "wants_cuda", "summarise",
           "TorchrunSink", "EpochSink"]


# ---- checks ---------------------------------------------------------------------------------
def wants_cuda(run: RunConfig) -> bool | None:
    """GPU workers? True when asked for (``ddp.use_gpu`` or ``train.device = "cuda"``), False for
    ``train.device = "cpu"``, None (:func:`fedsim.distributed.read_env` decides: one GPU per local
    process, else CPU) for ``"auto"``."""
    if run.train.device == "cpu":
        return False
    if run.ddp.use_gpu or run.train.device == "cuda":
        return True
    return None


def validate_ddp(run: RunConfig, task: Task | None = None) -> Task:
    """Reject, with the file/key/value, what cannot run data-parallel; return the task."""
    import torch

    source, ddp = run.source, run.ddp
    if run.train.batch_size < 1:
        raise ConfigError(source, "train.batch_size", run.train.batch_size,
                          "the per-rank batch must hold at least 1 sample (train.batch_size is per rank)")
    for key in ("nproc", "nnodes"):
        if getattr(ddp, key) < 1:
            raise ConfigError(source, f"ddp.{key}", getattr(ddp, key), "must be at least 1")
    if ddp.max_restarts < 0:
        raise ConfigError(source, "ddp.max_restarts", ddp.max_restarts, "must be >= 0")
    if ddp.nnodes > 1 and not ddp.rdzv_endpoint and ddp.launcher == "torchrun" and not under_launcher():
        raise ConfigError(source, "ddp.rdzv_endpoint", ddp.rdzv_endpoint,
                          f"ddp.nnodes = {ddp.nnodes} needs a rendezvous endpoint HOST:PORT reachable by every node")
    if ddp.rdzv_endpoint:
        host, sep, port = ddp.rdzv_endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(source, "ddp.rdzv_endpoint", ddp.rdzv_endpoint, "expected HOST:PORT")
    # (Ray checks its cluster's GPUs itself: the driver's machine may have none.)
    if ddp.use_gpu and ddp.launcher == "torchrun" and not under_launcher():
        if not torch.cuda.is_available():
            raise ConfigError(source, "ddp.use_gpu", True, "CUDA is not available on this machine (use CPU workers)")
        gpus = torch.cuda.device_count()
        if ddp.nproc > gpus:
            raise ConfigError(source, "ddp.nproc", ddp.nproc,
                              f"more processes than GPUs ({gpus}) with ddp.use_gpu = true; one GPU per process")
    task = task or make_task(run.task, run.task_options, source)
    task.require("data_parallel")
    return task


def rank_shard(n: int, world: int, rank: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Sample indices of ``rank`` in ``epoch``: every ``world``-th entry of the (seed, epoch) permutation.

    As ``DistributedSampler(drop_last=True)``: the last ``n % world`` samples of the permutation
    are left out so every rank has ``n // world`` samples and the same number of steps. Batches of
    ``b`` over these shards, taken together across ranks, are the central run's batches of
    ``world * b`` over the same permutation.
    """
    if n // world == 0:
        raise FedsimError(f"per-rank share of the training set is 0 samples ({n} samples over {world} ranks)")
    return strided_shard(n, world, rank, seed, epoch, shuffle, drop_last=True)


# ---- where results go ------------------------------------------------------------------------
class EpochSink(Protocol):
    """Where a data-parallel run keeps its checkpoints and records (torchrun: a RunDir; Ray: Ray)."""

    summarises: bool
    """Whether rank 0 computes and hands over the summary (False: the Ray driver does it)."""

    def resume_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint to continue from (asked on rank 0 only), or None for a fresh start."""

    def end_epoch(self, record: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        """Called on every rank after each epoch; ``checkpoint`` is given on rank 0 only."""

    def finish(self, summary: dict[str, Any]) -> None:
        """Called on rank 0 with the final summary."""


class TorchrunSink:
    """Rank 0 writes ``metrics.jsonl``, ``checkpoint.pt`` and ``summary.json`` into the run folder."""

    summarises = True

    def __init__(self, out: RunDir, env: DistEnv, *, resume: bool, checkpoint: bool) -> None:
        self.out, self.env, self.resume, self.checkpoint = out, env, resume, checkpoint

    def resume_checkpoint(self) -> dict[str, Any] | None:
        # A torchrun restart (restart_count > 0) resumes by itself: that is the point of --max-restarts.
        wanted = self.resume or self.env.restart_count > 0
        if wanted and self.out.checkpoint_path.exists():
            return load_checkpoint(self.out.checkpoint_path)
        if not wanted:  # a fresh run: a restart must never pick up an older run's checkpoint
            self.out.checkpoint_path.unlink(missing_ok=True)
        return None

    def end_epoch(self, record: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        if checkpoint is None:
            return
        if self.checkpoint:
            save_checkpoint(self.out.checkpoint_path, checkpoint)
        self.out.log(record)

    def finish(self, summary: dict[str, Any]) -> None:
        self.out.write_summary(summary)


# ---- the training function (torchrun workers and Ray Train workers) ----------------------------
def summarise(run: RunConfig, task: Task, split: DatasetSplit, model: nn.Module, history: list[dict[str, Any]],
              *, started: float, extra: dict[str, Any], context: TaskContext,
              private_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary of a finished run, as the central engine writes it (rank 0 / the Ray driver);
    ``private_metrics`` (DP-SGD's ``dp_epsilon``, ``dp_delta``) join the final metrics."""
    metrics = final_run_metrics(task, model, split, run, history, context=context)
    metrics.update(private_metrics or {})
    return make_summary(run, metrics, primary_metric=task.primary_metric, started=started, extra={"history": history, **extra})


def _fault_injector(run: RunConfig, env: DistEnv, resumed: bool,
                    before_marker: Callable[[], None] | None = None) -> Callable[[int], None] | None:
    """``ddp.fail_at_step``: rank ``fail_rank`` SIGKILLs itself at that global step, on a fresh first
    attempt only (a restarted or resumed attempt must get past the step).

    With ``ddp.fault_marker`` the rank (every rank for ``fail_rank = -1``) instead reports where it
    is and waits to be killed from outside (a worker process, or its whole node); ``before_marker``
    runs first (Ray Train: wait until the last checkpoint is registered).
    """
    ddp = run.ddp
    every_rank = ddp.fail_rank < 0 and bool(ddp.fault_marker)  # fault tests that pick the victim themselves
    if ddp.fail_at_step < 0 or (env.rank != ddp.fail_rank and not every_rank) or env.restart_count > 0 or resumed:
        return None

    def maybe_fail(step: int) -> None:
        if step == ddp.fail_at_step and ddp.fault_marker:
            marker = f"{ddp.fault_marker}.rank{env.rank}" if every_rank else ddp.fault_marker
            if before_marker is not None:  # e.g. Ray Train: the last checkpoint must be registered first
                before_marker()
            _await_external_kill(marker, env.rank, step)
        elif step == ddp.fail_at_step:
            print(f"fedsim: rank {env.rank} killing itself at step {step} (ddp.fail_at_step)", file=sys.stderr,
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return maybe_fail


def node_ip() -> str:
    """This worker's node address: Ray's node IP under Ray (127.0.0.x on a local cluster), else the host name."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    except ImportError:
        pass
    import socket

    return socket.gethostname()


def _await_external_kill(marker: str, rank: int, step: int, wait_s: float = 120.0) -> None:
    """``ddp.fault_marker``: say where this rank is (pid, node) and wait to be killed from outside.

    Fault tests kill this process (or its whole node) once the marker exists, at a known step;
    if nobody does within ``wait_s`` the rank carries on.
    """
    from pathlib import Path

    from fedsim.checkpoint import atomic_write_json

    print(f"fedsim: rank {rank} waiting to be killed at step {step} (ddp.fault_marker)", file=sys.stderr, flush=True)
    atomic_write_json(Path(marker), {"rank": rank, "pid": os.getpid(), "node_ip": node_ip(), "step": step})
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.1)


def train_data_parallel(run: RunConfig, env: DistEnv, sink: EpochSink, *, launcher: str = "torchrun",
                        started: float | None = None) -> dict[str, Any]:
    """Train this rank's share of ``run`` in an initialised process group; return the summary.

    Called on every rank (torchrun workers, or Ray Train workers); rank 0's return value is the
    run's summary, the other ranks return a stub naming their rank.
    """
    import torch.distributed as dist

    started = time.time() if started is None else started
    world, rank = env.world_size, env.rank
    # The model goes to this rank's device; "cuda" is the current device set by init_distributed.
    local_run = dataclasses.replace(run, train=dataclasses.replace(run.train, device=env.device.type))
    prepared = prepare(local_run)
    task, split, state = prepared.task, prepared.split, prepared.state
    validate_ddp(run, task)
    train_cfg = run.train
    n = len(split.train)  # type: ignore[arg-type]
    if n // world == 0:
        raise ConfigError(run.source, "ddp.nproc", run.ddp.nproc,
                          f"per-rank batch of 0: {n} training samples cannot be shared by {world} ranks")
    module = state.model

    checkpoint = sink.resume_checkpoint() if env.is_rank0 else None
    checkpoint = broadcast_object(checkpoint, device=env.device if env.backend == "nccl" else None)
    history: list[dict[str, Any]] = []
    if checkpoint is not None:
        state.load(checkpoint, model=module)
        engine_state = checkpoint.get("engine_state", {})
        history = list(engine_state.get("history", []))
        rngs = engine_state.get("rank_rng", [])
        if len(rngs) == world:
            restore_rng(rngs[rank])
        else:  # a different world size: a fresh per-rank stream keyed by where we are
            import torch

            torch.manual_seed(derive_seed(train_cfg.seed, "ddp-rank", rank, "epoch", state.epoch))
    else:
        import torch

        # Model init was seeded identically on every rank; dropout (etc.) must differ per rank.
        torch.manual_seed(derive_seed(train_cfg.seed, "ddp-rank", rank))
    if env.is_rank0 and isinstance(sink, TorchrunSink):
        sink.out.reset_metrics()
        for record in history:  # the resumed history, without records past the checkpoint
            sink.out.log(record)

    writes = env.is_rank0 and isinstance(sink, TorchrunSink)
    context = task_context(sink.out if writes else None, env.device, rank=rank, world_size=world)
    private = None
    if train_cfg.dp.enabled:  # DP-SGD: Opacus' DPDDP, GradSampleModule and DistributedDPOptimizer
        from fedsim.privacy.dpsgd import make_private

        private = make_private(run, task, state, split.train, device=env.device, rank=rank, world_size=world,
                               distributed=True)
        if checkpoint is not None:
            private.restore(checkpoint)
    else:
        state.model = wrap_ddp(module, env, sync_bn=run.ddp.sync_bn)
        module = state.model.module  # the BatchNorm-converted plain module (same parameters)

    def batches_for_epoch(epoch: int) -> Any:
        if private is not None:
            return private.batches_for_epoch(epoch)
        shard = rank_shard(n, world, rank, train_cfg.seed, epoch, train_cfg.shuffle)
        return make_loader(split.train, train_cfg.batch_size, train_cfg.seed, epoch, shuffle=False, indices=shard)

    def evaluate() -> dict[str, float]:
        # Rank 0 evaluates the plain module on the whole test set; the others need not repeat it.
        return task.evaluate(module, split.test, train_cfg.eval_batch_size) if env.is_rank0 else {}

    def on_epoch_end(state_now: Any, record: dict[str, Any]) -> None:
        train_keys = sorted(k for k in record if k.startswith("train_"))
        record.update(all_reduce_mean({k: record[k] for k in train_keys}, env.device))
        if private is not None:
            record.update(private.epoch_metrics())
        if not parameters_in_sync(module):
            raise FedsimError(f"task '{run.task}': parameters differ across ranks after epoch {record['epoch']}; "
                              "its train step must run the model through model(...) so that DDP averages "
                              "the gradients")
        record["world_size"] = world
        history.append(dict(record))
        rngs: list[Any] | None = [None] * world if env.is_rank0 else None
        dist.gather_object(capture_rng(), rngs, dst=0)
        ckpt = None
        if env.is_rank0:
            ckpt = make_checkpoint(
                "ddp", module.state_dict(), state_now.optimizer_states(), state_now.scheduler_states(),
                epoch=state_now.epoch, step=state_now.step, rng=rngs[0] if rngs else None,
                engine_state={"history": history, "rank_rng": rngs, "world_size": world,
                              **({"dp": private.state_dict()} if private is not None else {})})
        sink.end_epoch(dict(record), ckpt)

    fit(task, state, train_cfg, batches_for_epoch, context=context, evaluate=evaluate, on_epoch_end=on_epoch_end,
        step_fn=private.step_fn(task, state) if private is not None else None,
        on_step=_fault_injector(run, env, resumed=checkpoint is not None,
                                before_marker=getattr(sink, "before_fault", None)),
        show_progress=train_cfg.progress and env.is_rank0 and launcher == "torchrun",
        description=f"{run.name} [ddp x{world}]")
    state.model.eval()
    if not (env.is_rank0 and sink.summarises):
        return {"name": run.name, "rank": rank}
    extra = {"epochs": state.epoch, "steps": state.step, "world_size": world, "backend": env.backend,
             "global_batch_size": world * train_cfg.batch_size, "launcher": launcher,
             "restart_count": env.restart_count, "resumed_from_epoch": checkpoint["epoch"] if checkpoint else None}
    if private is not None:
        extra["privacy"] = private.privacy_record()
    summary = summarise(run, task, split, module, history, started=started, extra=extra, context=context,
                        private_metrics=private.summary_metrics() if private is not None else None)
    sink.finish(summary)
    summary["model"] = module  # in-memory only, as the central engine
    return summary

"""``launcher = "ray"``: the data-parallel training function on Ray Train's ``TorchTrainer``.

Ray starts ``ddp.nproc * ddp.nnodes`` workers (``ScalingConfig``: ``num_workers``, ``use_gpu``,
``resources_per_worker``), sets up the process group (gloo, or nccl with GPUs) and the
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables, and each worker runs
:func:`fedsim.engines.parallel.data_parallel.train_data_parallel`, the function torchrun workers run. Only the sink
differs: each epoch every worker calls ``ray.train.report`` and rank 0 attaches the checkpoint
(``ray.train.Checkpoint``); a restarted worker group (``FailureConfig(max_failures =
ddp.max_restarts)``) resumes from ``ray.train.get_checkpoint()``.

The driver (this process) then writes the run folder from the last checkpoint: ``checkpoint.pt``,
``metrics.jsonl`` (the history kept in the checkpoint) and ``summary.json``, so workers never need
the driver's filesystem (on a multi-node cluster, Ray's ``storage_path`` must be shared storage).
``ddp.ray_address`` names an existing cluster; empty starts a local Ray for this run and shuts it
down afterwards.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedsim.checkpoint import load_checkpoint, save_checkpoint
from fedsim.config import RunConfig, from_dict, to_dict
from fedsim.engines.common import RunContext, build_model, load_task_data, task_context
from fedsim.errors import ConfigError, FedsimError
from fedsim.ops.ray_session import ray_session

__all__ = ["run_ray_train", "RaySink"]

CHECKPOINT_FILE = "checkpoint.pt"


class RaySink:
    """Checkpoints and per-epoch metrics through ``ray.train.report`` (see the module docstring)."""

    summarises = False  # the driver writes the summary from the last checkpoint

    def __init__(self, initial: dict[str, Any] | None = None) -> None:
        self.initial = initial
        """The run folder's checkpoint when the driver was asked to ``--resume`` (rank 0 only)."""

    def resume_checkpoint(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()  # set when Ray restarted a failed worker group
        if checkpoint is None:
            return self.initial
        with checkpoint.as_directory() as folder:
            return load_checkpoint(Path(folder) / CHECKPOINT_FILE)

    def before_fault(self, timeout_s: float = 60.0) -> None:
        """Fault tests (``ddp.fault_marker``): wait until Ray Train has registered a checkpoint.

        The controller collects reported checkpoints when it polls the workers (every 2 s); a
        worker killed before that poll loses the checkpoint it just reported, and the restarted
        group would begin again from the one before. The snapshot file is Ray Train's own record.
        """
        import json

        import ray.train

        try:
            folder = Path(ray.train.get_context().get_storage().experiment_fs_path)
        except Exception:  # noqa: BLE001 - best effort: no storage context, nothing to wait for
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                snapshot = json.loads((folder / "checkpoint_manager_snapshot.json").read_text())
                if snapshot.get("checkpoint_results"):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)

    def end_epoch(self, record: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        import ray.train

        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float, str, bool))}
        if checkpoint is None:
            ray.train.report(metrics)  # every worker reports each epoch (it is a barrier in Ray Train)
            return
        with tempfile.TemporaryDirectory(prefix="fedsim-ckpt-") as folder:
            save_checkpoint(Path(folder) / CHECKPOINT_FILE, checkpoint)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def finish(self, summary: dict[str, Any]) -> None:
        pass


def _worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    import torch

    from fedsim.distributed import read_env
    from fedsim.engines.parallel.data_parallel import train_data_parallel

    run = from_dict(RunConfig, config["run"], config["run"].get("source", "<ray>"))
    env = read_env(use_cuda=config["use_gpu"])  # Ray Train sets the torchrun variables
    _record_worker(Path(config["workers_dir"]), env.rank)
    if env.device.type == "cuda":
        import dataclasses

        import ray.train.torch

        # Ray assigns each worker its GPU(s) and sets CUDA_VISIBLE_DEVICES (shared by the workers of
        # a node); its get_device() maps this worker's GPU id into that list, LOCAL_RANK may not.
        env = dataclasses.replace(env, device=ray.train.torch.get_device())
        torch.cuda.set_device(env.device)
    initial = config.get("resume_checkpoint") if env.is_rank0 else None
    train_data_parallel(run, env, RaySink(initial), launcher="ray", started=config["started"])


def _record_worker(folder: Path, rank: int) -> None:
    """Where this worker runs (rank, pid, node IP, visible GPUs): one file per worker and attempt.

    The driver lists them in the summary (``workers``), so a run shows which node each rank ran
    on and, after a restart, where the new worker group went. The folder is under the driver's
    results folder: on a real multi-node cluster that needs shared storage (as ``storage_path``).
    """
    from fedsim.checkpoint import atomic_write_json
    from fedsim.engines.parallel.data_parallel import node_ip

    try:
        import ray.train

        attempt_of = ray.train.get_context().get_world_size()
    except Exception:  # noqa: BLE001 - informational only
        attempt_of = -1
    atomic_write_json(folder / f"rank{rank}-pid{os.getpid()}.json", {
        "rank": rank, "pid": os.getpid(), "node_ip": node_ip(), "world_size": attempt_of, "started": time.time(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")})


def _workers(folder: Path) -> list[dict[str, Any]]:
    import json

    records = [json.loads(p.read_text()) for p in folder.glob("rank*-pid*.json")]
    return sorted(records, key=lambda r: (r["started"], r["rank"]))


def _fit(trainer: Any, timeout_s: float) -> Any:
    """``trainer.fit()`` under a wall-clock limit (the caller shuts Ray down on timeout)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="fedsim-ray-fit", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise FedsimError(f"Ray Train did not finish within {timeout_s:g} s (ddp.timeout_s)")
    if "error" in box:
        raise box["error"]
    return box["result"]


def run_ray_train(run: RunConfig, ctx: RunContext) -> dict[str, Any]:
    """Train ``run`` on Ray Train workers; write the run folder from the final checkpoint."""
    from fedsim.engines.parallel.data_parallel import summarise

    started = time.time()
    ddp = run.ddp
    workers = ddp.nproc * ddp.nnodes
    # Logical CPUs of a local Ray: a 2-core box still schedules 2 workers (+ Ray Train's controller).
    cpus = max(os.cpu_count() or 1, math.ceil(workers * ddp.cpus_per_worker)) + 1
    with ray_session(ddp.ray_address, num_cpus=cpus, log_to_driver=True, env_vars={"OMP_NUM_THREADS": "1"}):
        checkpoint, storage, workers_dir, use_gpu = _train_on_ray(run, ctx, started, workers)
    save_checkpoint(ctx.out.checkpoint_path, checkpoint)
    history = checkpoint["engine_state"].get("history", [])
    ctx.out.reset_metrics()
    for record in history:
        ctx.out.log(record)
    task, split = load_task_data(run)
    import torch

    model = build_model(task, split, run, torch.device("cpu"))
    model.load_state_dict(checkpoint["model"])
    extra = {"epochs": checkpoint["epoch"], "steps": checkpoint["step"], "world_size": workers,
             "backend": "nccl" if use_gpu else "gloo", "global_batch_size": workers * run.train.batch_size,
             "launcher": "ray", "ray_address": ddp.ray_address or "local", "ray_storage": str(storage),
             "workers": _workers(workers_dir)}
    summary = summarise(run, task, split, model, history, started=started, extra=extra,
                        context=task_context(ctx.out, torch.device("cpu")))
    ctx.out.write_summary(summary)
    print(f"fedsim: Ray Train run '{run.name}' finished with {workers} workers", file=sys.stderr)
    summary["model"] = model
    return summary


def _train_on_ray(run: RunConfig, ctx: RunContext, started: float, workers: int) -> tuple[dict[str, Any], Path, Path, bool]:
    """Ray Train's TorchTrainer over ``workers`` workers; the final checkpoint and where things went."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ddp = run.ddp
    storage = ctx.out.root.resolve() / "ray_train"
    name = f"{run.name}-s{run.train.seed}"
    resume_from = None
    if ctx.resume and ctx.out.checkpoint_path.exists():
        # Shipped inside the train-loop config (Ray Train 2.55 refuses resume_from_checkpoint), not as
        # a path, so that workers on other machines receive it.
        resume_from = load_checkpoint(ctx.out.checkpoint_path)
    else:
        # Ray Train restores a run of the same name from its storage folder: a fresh run must not.
        shutil.rmtree(storage / name, ignore_errors=True)
    # GPU workers when asked for, or when train.device allows CUDA and the cluster has a GPU per worker.
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    use_gpu = ddp.use_gpu or (run.train.device != "cpu" and gpus >= workers)
    if ddp.use_gpu and gpus < workers:
        raise ConfigError(run.source, "ddp.use_gpu", True,
                          f"{workers} Ray workers need {workers} GPUs; the cluster has {gpus:g}")
    resources: dict[str, float] = {"CPU": ddp.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    workers_dir = ctx.out.root.resolve() / "ray_workers"
    if workers_dir.exists():  # a fresh list per run (files of an earlier run would mislead)
        for stale in workers_dir.glob("rank*-pid*.json"):
            stale.unlink()
    # nnodes > 1: spread the workers over the cluster's nodes (one per node when each node has
    # room for one), instead of packing them onto the first node with free CPUs.
    placement = "SPREAD" if ddp.nnodes > 1 else "PACK"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"run": to_dict(run), "use_gpu": use_gpu, "started": started,
                           "workers_dir": str(workers_dir), "resume_checkpoint": resume_from},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=ddp.timeout_s),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=placement),
        run_config=RayRunConfig(name=name, storage_path=str(storage),
                                failure_config=FailureConfig(max_failures=ddp.max_restarts),
                                checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = _fit(trainer, ddp.timeout_s)
    if result.error is not None:
        raise FedsimError(f"Ray Train run '{run.name}' failed: {result.error}")
    if result.checkpoint is None:
        raise FedsimError(f"Ray Train run '{run.name}' reported no checkpoint (train.epochs = {run.train.epochs})")
    with result.checkpoint.as_directory() as folder:
        checkpoint = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
    return checkpoint, storage, workers_dir, use_gpu

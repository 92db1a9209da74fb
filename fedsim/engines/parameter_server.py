"""Parameter server on Ray actors: one server holds the parameters and the optimizer, W workers
pull parameters, compute gradients of the task's loss on their shard, and push them back.

* ``variant = "sync"``: every server step waits for all W gradients and applies their
  sample-weighted mean, so with ``shards = "strided"`` (worker k takes every W-th sample of the
  epoch's shared order, as ``DistributedSampler``) W workers with batch b take exactly the steps
  of central training with batch W*b on a task without BatchNorm.
* ``variant = "async"``: the server applies each gradient as it arrives (Hogwild-style
  asynchronous SGD); a gradient computed on version v and applied at version t has staleness
  t - v, logged per step in ``metrics.jsonl`` and summarised in ``summary.json``.

The server's ``optimizer.step()`` is the one place where parameters change; workers only run
forward/backward of ``task.loss`` on a model built by :func:`fedsim.engines.common.build_model`.
BatchNorm running statistics, which no gradient carries, are pushed with the gradient: the sync
server averages them (sample-weighted), the async server takes the arriving worker's.

The engine owns its Ray session: it starts a local Ray (or connects to ``ray_address``) and
shuts it down at the end, so it never shares a session with Flower's ``run_simulation``.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from fedsim.config import RunConfig
from fedsim.engines.common import (
    RunContext,
    build_model,
    last_test_metrics,
    load_task_data,
    prepare,
    save_state,
    task_context,
)
from fedsim.errors import FedsimError, UnsupportedError
from fedsim.ops.ray_session import ray_session
from fedsim.results import RunDir, make_summary
from fedsim.seeding import derive_seed, epoch_permutation, strided_shard
from fedsim.tasks import Task, TaskContext, make_task, move_batch
from fedsim.train import configure_torch

__all__ = ["run_parameter_server", "ParameterServer", "GradientWorker", "worker_indices", "state_bytes"]


# ---- data shards ------------------------------------------------------------------------------
def worker_indices(run: RunConfig, labels: torch.Tensor, worker: int, workers: int) -> list[int] | None:
    """Worker ``worker``'s fixed shard, or None for ``strided`` (a new strided shard every epoch)."""
    cfg = run.parameter_server
    if cfg.shards == "strided":
        return None
    from fedsim.data.partition import partition, partition_labels

    return partition(partition_labels(labels), workers, cfg.shards, seed=run.train.seed, alpha=cfg.alpha)[worker].tolist()


def _batch_stream(run: RunConfig, n_train: int, labels: torch.Tensor, worker: int, workers: int,
                  start: int) -> Iterator[tuple[int, list[int]]]:
    """(epoch, sample indices) of the worker's successive batches, from its ``start``-th batch on.

    Strided: batch j of epoch e is ``perm_e[worker::W][j*b:(j+1)*b]`` with ``perm_e`` the shared
    (seed, epoch) order of :func:`fedsim.train.epoch_permutation`, so the union of the W workers'
    batch j is exactly batch j of a central run with batch W*b. A shorter shard yields an empty
    last batch (weight 0) so that all workers step ceil(N / (W*b)) times per epoch.
    """
    train, b = run.train, run.train.batch_size
    fixed = worker_indices(run, labels, worker, workers)
    if fixed is None:
        per_epoch = math.ceil(n_train / (workers * b))
    else:
        per_epoch = max(1, math.ceil(len(fixed) / b))
    count = start
    while True:
        epoch, j = divmod(count, per_epoch)
        if fixed is None:
            shard = strided_shard(n_train, workers, worker, train.seed, epoch, train.shuffle)
        else:
            order = epoch_permutation(len(fixed), derive_seed(train.seed, "ps-worker", worker), epoch, train.shuffle)
            shard = [fixed[i] for i in order]
        yield epoch, shard[j * b:(j + 1) * b]
        count += 1


def state_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _require_single_loss(task: Task, optimizers: dict[str, Any] | None = None) -> None:
    """The server averages gradients of one loss under one optimizer; multi-player tasks cannot."""
    if type(task).train_step is not Task.train_step or (optimizers is not None and set(optimizers) != {"model"}):
        raise UnsupportedError(
            f"task '{task.name}' has its own train step (several players or optimizers); the parameter server "
            "averages gradients of one loss under one optimizer")


# ---- actors (plain classes; the engine wraps them with ray.remote) -------------------------------
class ParameterServer:
    """Holds the model, its optimizer and schedulers; applies pushed gradients."""

    def __init__(self, run: RunConfig, out_root: str, resume: bool) -> None:
        self.run = run
        self.out = RunDir(out_root)
        prepared = prepare(run, resume_from=self.out if resume else None)
        self.task, self.split, self.state = prepared.task, prepared.split, prepared.state
        self.device = prepared.device
        _require_single_loss(self.task, self.state.optimizers)
        self.model = self.state.model
        self.optimizer = self.state.optimizers["model"]
        self.version = self.state.step  # completed server steps = gradient applications

    def info(self) -> dict[str, Any]:
        labels = self.split.train.tensors[1]
        model_state = self.model.state_dict()
        params = dict(self.model.named_parameters())
        return {"n_train": len(self.split.train), "labels": labels, "version": self.version,
                "epoch": self.state.epoch, "state_bytes": state_bytes(model_state),
                "param_bytes": state_bytes(params), "buffer_bytes": state_bytes(_float_buffers(self.model))}

    def pull(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The current version and parameters+buffers (what a worker loads)."""
        return self.version, {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def apply(self, *pushes: dict[str, Any]) -> dict[str, Any]:
        """One optimizer step with the sample-weighted mean of ``pushes`` (all W in sync, one in async)."""
        version = self.version
        live = [p for p in pushes if p["n"] > 0]
        total = sum(p["n"] for p in live)
        if total:
            self.optimizer.zero_grad(set_to_none=True)
            for name, param in self.model.named_parameters():
                grads = [p["grads"][name] for p in live if p["grads"][name] is not None]
                if grads:
                    weights = [p["n"] / total for p in live if p["grads"][name] is not None]
                    param.grad = sum(w * g.to(param.device) for w, g in zip(weights, grads, strict=True))
            self.optimizer.step()  # the one place parameters change
            buffers = dict(self.model.named_buffers())
            for name in live[0]["buffers"]:
                buffers[name].copy_(sum(p["n"] / total * p["buffers"][name] for p in live))
        self.version += 1
        self.state.step = self.version
        return {
            "step": self.version,
            "loss": sum(p["n"] * p["loss"] for p in live) / total if total else float("nan"),
            "samples": total,
            "staleness": [version - p["version"] for p in pushes],
            "workers": [p["worker"] for p in pushes],
        }

    def end_epoch(self, checkpoint: bool, engine_state: dict[str, Any]) -> dict[str, Any]:
        """Step the per-epoch schedules, evaluate, checkpoint; return the test metrics."""
        for scheduler in self.state.schedulers.values():
            scheduler.step()
        self.state.epoch += 1
        metrics = self.evaluate()
        if checkpoint:
            save_state(self.out, "parameter_server", self.state, engine_state=engine_state)
        return metrics

    def evaluate(self) -> dict[str, Any]:
        self.model.eval()
        with torch.no_grad():
            return self.task.evaluate(self.model, self.split.test, self.run.train.eval_batch_size)

    def final(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        self.model.eval()
        metrics = self.task.final_metrics(self.model, self.split, context=task_context(self.out, self.device))
        return metrics, {k: v.detach().cpu() for k, v in self.model.state_dict().items()}


def _float_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """BatchNorm running mean/var (not ``num_batches_tracked``, which every worker advances alike)."""
    return {k: v for k, v in model.named_buffers() if v.is_floating_point()}


class GradientWorker:
    """Pulls parameters, computes the gradient of ``task.loss`` on its next batch, pushes it."""

    def __init__(self, run: RunConfig, worker: int, workers: int, server: Any, start: int,
                 n_train: int, labels: torch.Tensor) -> None:
        self.device = configure_torch(run.train)
        self.task, self.split = load_task_data(run)
        self.model = build_model(self.task, self.split, run, self.device)
        self.worker, self.workers, self.server = worker, workers, server
        self.seed, self.count = run.train.seed, start
        self.batches = _batch_stream(run, n_train, labels, worker, workers, start)

    def ready(self) -> bool:
        return True

    def compute(self) -> dict[str, Any]:
        import ray

        version, state = ray.get(self.server.pull.remote())
        self.model.load_state_dict(state)
        epoch, indices = next(self.batches)
        self.count += 1
        torch.manual_seed(derive_seed(self.seed, "ps-worker", self.worker, self.count))  # dropout keyed by batch
        grads: dict[str, torch.Tensor | None] = {k: None for k, _ in self.model.named_parameters()}
        push = {"worker": self.worker, "version": version, "n": len(indices), "loss": 0.0, "grads": grads,
                "buffers": {}}
        if not indices:
            return push
        x, y = self.split.train[indices]
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        # The epoch of this batch in the context: per-epoch draws (MAE masks) change every pass, as in
        # the central run, and equal its draws for the same (seed, sample, epoch).
        context = TaskContext(epoch=epoch, rank=self.worker, world_size=self.workers, device=self.device)
        loss = self.task.loss(self.model, move_batch((x, y), self.model), context=context)
        loss.backward()
        push["loss"] = float(loss.detach())
        push["grads"] = {k: None if p.grad is None else p.grad.detach().cpu() for k, p in self.model.named_parameters()}
        push["buffers"] = {k: v.detach().cpu().clone() for k, v in _float_buffers(self.model).items()}
        return push


def _placement(cfg: Any, timeout_s: float = 60.0) -> Any:
    """A placement group with one bundle per worker, or a clear error when the cluster cannot hold W."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    resources = ray.cluster_resources()
    need = {"CPU": cfg.workers * cfg.cpus_per_worker, "GPU": cfg.workers * cfg.gpus_per_worker}
    for kind, amount in need.items():
        if amount > resources.get(kind, 0.0) + 1e-9:
            raise FedsimError(
                f"parameter_server.workers = {cfg.workers} with {cfg.cpus_per_worker} CPU / {cfg.gpus_per_worker} GPU "
                f"per worker needs {amount:g} {kind} but the Ray cluster has {resources.get(kind, 0.0):g}; lower "
                f"'parameter_server.workers' or the per-worker resources"
                + ("" if cfg.ray_address else ", or raise 'parameter_server.ray_num_cpus'"))
    bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})}
    group = placement_group([bundle] * cfg.workers, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise FedsimError(
            f"Ray could not place {cfg.workers} workers of {bundle} within {timeout_s:g} s (no node has room for a "
            "bundle, or the cluster is busy); lower 'parameter_server.workers' or the per-worker resources")
    return group


# ---- the engine -------------------------------------------------------------------------------
def run_parameter_server(run: RunConfig, ctx: RunContext) -> dict[str, Any]:
    """Train ``run`` with a Ray parameter server; log per step and per epoch; write the summary."""
    started = time.time()
    cfg = run.parameter_server
    task = make_task(run.task, run.task_options, run.source)
    _require_single_loss(task)  # fail fast, before starting Ray
    out = ctx.out
    resume = ctx.resume and out.checkpoint_path.exists()
    if not resume:
        out.reset_metrics()
    with ray_session(cfg.ray_address, num_cpus=cfg.ray_num_cpus or os.cpu_count() or 1):
        return _train(run, task, ctx, started, resume)


def _train(run: RunConfig, task: Task, ctx: RunContext, started: float, resume: bool) -> dict[str, Any]:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cfg, out = run.parameter_server, ctx.out
    group = _placement(cfg)
    spawned: list[Any] = []  # every actor this run created, killed whatever happens
    try:
        # The server needs no reserved CPU: it only sums tensors, and reserving one would take a core
        # away from the W workers on small machines.
        server = ray.remote(num_cpus=0)(ParameterServer).remote(run, str(out.root), resume)
        spawned.append(server)
        info = ray.get(server.info.remote())
        n_train, workers = info["n_train"], cfg.workers
        per_epoch = math.ceil(n_train / (workers * run.train.batch_size))  # server steps per pass (sync)
        pass_len = per_epoch if cfg.variant == "sync" else per_epoch * workers  # applications per pass
        total = cfg.steps or run.train.epochs * pass_len
        engine_state: dict[str, Any] = {}
        starts = [info["version"]] * workers
        if resume:
            checkpoint_state = torch.load(out.checkpoint_path, weights_only=False)["engine_state"]
            starts = checkpoint_state.get("worker_batches", starts)
        actors = [
            ray.remote(GradientWorker).options(
                num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=k),
            ).remote(run, k, workers, server, starts[k], n_train, info["labels"])
            for k in range(workers)
        ]
        spawned.extend(actors)
        # Start the clock only when every worker is up: a worker still importing torch would otherwise
        # leave the others alone for the first steps (no overlap, no staleness, skewed shards).
        ray.get([actor.ready.remote() for actor in actors])
        ready_s = time.time() - started
        batches_done = list(starts)
        history: list[dict[str, Any]] = []
        staleness: Counter[int] = Counter()
        window: list[int] = []  # staleness values since the last evaluation
        losses: list[tuple[float, int]] = []
        applied = info["version"]

        def record_step(result: dict[str, Any]) -> None:
            for worker in result["workers"]:
                batches_done[worker] += 1
            staleness.update(result["staleness"])
            window.extend(result["staleness"])
            losses.append((result["loss"], result["samples"]))
            out.log({"kind": "step", "step": result["step"], "train_loss": result["loss"], "samples": result["samples"],
                     "staleness": result["staleness"] if cfg.variant == "sync" else result["staleness"][0],
                     "worker": result["workers"] if cfg.variant == "sync" else result["workers"][0],
                     "time_s": time.time() - started})

        def end_of_pass() -> None:
            engine_state["worker_batches"] = list(batches_done)
            metrics = ray.get(server.end_epoch.remote(run.train.checkpoint, dict(engine_state)))
            seen = sum(n for _, n in losses)
            record = {"kind": "epoch", "epoch": len(history) + 1 + (info["epoch"] if resume else 0), "step": applied,
                      "train_loss": sum(v * n for v, n in losses if n) / seen if seen else float("nan"),
                      "staleness_mean": sum(window) / len(window) if window else 0.0,
                      "staleness_max": max(window, default=0), "time_s": time.time() - started}
            record.update({f"test_{k}": v for k, v in metrics.items()})
            out.log(record)
            history.append(record)
            window.clear()
            losses.clear()

        if cfg.variant == "sync":
            while applied < total:
                pushes = [actor.compute.remote() for actor in actors]
                record_step(ray.get(server.apply.remote(*pushes)))  # Ray resolves all W pushes first
                applied += 1
                if applied % pass_len == 0 or applied == total:
                    end_of_pass()
        else:
            inflight = {actors[k].compute.remote(): k for k in range(min(workers, total - applied))}
            while inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                worker = inflight.pop(ready[0])
                record_step(ray.get(server.apply.remote(ready[0])))
                applied += 1
                if applied + len(inflight) < total:  # never dispatch work that would be thrown away
                    inflight[actors[worker].compute.remote()] = worker
                if applied % pass_len == 0 or applied == total:
                    end_of_pass()

        final_metrics, model_state = ray.get(server.final.remote())
    finally:
        from ray.util.placement_group import remove_placement_group

        for actor in spawned:
            ray.kill(actor)
        remove_placement_group(group)

    if resume:
        history = [r for r in out.read_metrics() if r.get("kind") == "epoch"]
    metrics: dict[str, Any] = last_test_metrics(history)
    metrics["train_loss"] = history[-1]["train_loss"] if history else float("nan")
    metrics.update(final_metrics)
    stale = sorted(staleness.elements())
    # Every step each worker pulls the model (parameters + buffers) and pushes gradients + float buffers.
    per_round = info["state_bytes"] + info["param_bytes"] + info["buffer_bytes"]
    rounds_per_worker = total / workers if cfg.variant == "async" else total
    summary = make_summary(run, metrics, primary_metric=task.primary_metric, started=started, extra={
        "variant": cfg.variant, "workers": workers, "steps": applied, "epochs": len(history),
        "startup_s": ready_s, "train_time_s": time.time() - started - ready_s,
        "staleness": {
            "mean": sum(stale) / len(stale) if stale else 0.0,
            "median": stale[len(stale) // 2] if stale else 0,
            "p90": stale[min(len(stale) - 1, int(0.9 * len(stale)))] if stale else 0,
            "max": stale[-1] if stale else 0,
            "histogram": {str(k): staleness[k] for k in sorted(staleness)},
        },
        "communication": {"round": "server step (one pull + one push per worker)",
                          "bytes_per_round_per_node": per_round, "rounds_per_node": rounds_per_worker,
                          "bytes_per_node": per_round * rounds_per_worker},
        "history": history,
    })
    out.write_summary(summary)
    model = build_model(*load_task_data(run), run, torch.device("cpu"))
    model.load_state_dict(model_state)
    model.eval()
    summary["model"] = model  # in-memory only, as the central engine does
    return summary

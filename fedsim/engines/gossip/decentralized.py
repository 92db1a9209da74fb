"""Decentralized (serverless) gossip training, as in D-PSGD (Lian et al., 2017).

Every node keeps its own model and trains it on its own partition with the shared loop
(:func:`fedsim.train.fit`, i.e. ``task.train_step``), then replaces its model with a weighted
average of its own and its neighbours' models, weights from the doubly stochastic mixing matrix
``W`` of :mod:`fedsim.engines.gossip.topology` (adapt-then-combine)::

    x_i <- sum_j W[i, j] * x_j        (j = i and the neighbours of i, in ascending order)

There is no server. Two backends run the same node code:

* ``inprocess``: all nodes in this process (many simulated nodes, no processes to start);
* ``torch_distributed``: one process per node under torchrun (gloo); each round a node sends its
  model to each neighbour and receives theirs with point-to-point ``isend``/``irecv``.

Both sum the same terms in the same order, so they reach the same parameters. Per round the
engine logs the mean of the nodes' test metrics, the metrics of the averaged model
``x_bar = mean_i x_i`` and the consensus distance ``mean_i ||theta_i - theta_bar||`` (parameters
only), plus the bytes each node sent and received.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from fedsim.config import RunConfig
from fedsim.data import DatasetSplit
from fedsim.engines.common import RunContext, build_model, last_test_metrics, load_task_data, task_context
from fedsim.engines.gossip.topology import adjacency, mixing_matrix, neighbours
from fedsim.errors import FedsimError
from fedsim.results import make_summary
from fedsim.tasks import Batch, Task, TaskContext, model_device
from fedsim.train import TrainState, build_schedulers, configure_torch, derive_seed, fit, make_loader

__all__ = ["run_decentralized", "GossipNode", "node_partitions", "flat_state", "load_flat_state",
           "consensus_distance", "mix"]


# ---- model <-> one flat vector ----------------------------------------------------------------
def _float_keys(model: nn.Module) -> list[str]:
    """State entries that gossip averages: parameters and float buffers (BatchNorm running stats)."""
    return [k for k, v in model.state_dict().items() if v.is_floating_point()]


def flat_state(model: nn.Module) -> torch.Tensor:
    """Every float state entry of ``model`` concatenated in ``state_dict`` order (what a node sends)."""
    state = model.state_dict()
    return torch.cat([state[k].detach().reshape(-1) for k in _float_keys(model)])


def load_flat_state(model: nn.Module, flat: torch.Tensor) -> None:
    """Inverse of :func:`flat_state`."""
    state = model.state_dict()
    offset = 0
    with torch.no_grad():
        for key in _float_keys(model):
            numel = state[key].numel()
            state[key].copy_(flat[offset:offset + numel].view_as(state[key]))
            offset += numel


def _param_mask(model: nn.Module) -> torch.Tensor:
    """Which entries of :func:`flat_state` are parameters (consensus distance is over parameters)."""
    params = {k for k, _ in model.named_parameters()}
    state = model.state_dict()
    return torch.cat([torch.full((state[k].numel(),), k in params, dtype=torch.bool) for k in _float_keys(model)])


def mix(weights: np.ndarray, node: int, states: dict[int, torch.Tensor]) -> torch.Tensor:
    """``sum_j W[node, j] * x_j`` over ``states`` (self and neighbours), in ascending j.

    One order for both backends, so they add the same floats in the same sequence.
    """
    total = None
    for j in sorted(states):
        term = float(weights[node, j]) * states[j]
        total = term if total is None else total + term
    assert total is not None
    return total


def consensus_distance(params: list[torch.Tensor]) -> float:
    """``mean_i ||theta_i - theta_bar||`` of flat parameter vectors."""
    mean = torch.stack(params).mean(dim=0)
    return float(torch.stack([torch.linalg.vector_norm(p - mean) for p in params]).mean())


# ---- nodes ------------------------------------------------------------------------------------
def node_partitions(run: RunConfig, split: DatasetSplit) -> list[list[int]]:
    """Training-sample indices of each node, from the federated partitioners (seeded by ``train.seed``)."""
    from fedsim.data.partition import partition, partition_labels

    cfg = run.decentralized
    labels = partition_labels(split.train.tensors[1])  # type: ignore[attr-defined]
    parts = partition(labels, cfg.nodes, cfg.partition, seed=run.train.seed, alpha=cfg.alpha)
    return [p.tolist() for p in parts]


@dataclass
class GossipNode:
    """One node: its model, optimizer state and an endless stream of batches of its partition."""

    index: int
    state: TrainState
    indices: list[int]
    passes: int = 0
    """Completed passes over the partition (the stream's position, for resume)."""
    position: int = 0
    """Batches already taken from the current pass."""

    def batches(self, split: DatasetSplit, run: RunConfig) -> list[Batch]:
        """The next ``local_steps`` batches (0 = the rest of the current pass), in a (seed, node, pass) order."""
        steps = run.decentralized.local_steps
        taken: list[Batch] = []
        if not self.indices:  # an empty partition trains nothing (and must not loop forever)
            return taken
        while True:
            loader = make_loader(split.train, run.train.batch_size, derive_seed(run.train.seed, "node", self.index),
                                 self.passes, run.train.shuffle, indices=self.indices)
            per_pass = len(loader)
            for position, batch in enumerate(loader):
                if position < self.position:
                    continue
                taken.append(batch)
                self.position = position + 1
                if steps and len(taken) == steps:
                    break
            if self.position >= per_pass:
                self.passes, self.position = self.passes + 1, 0
            if not steps or len(taken) == steps:
                return taken

    def train_round(self, task: Task, split: DatasetSplit, run: RunConfig) -> dict[str, Any]:
        """Local training with the shared loop: one ``fit`` epoch made of this round's batches."""
        # Dropout/mask draws keyed by (seed, node, round): the same on both backends and after a resume.
        torch.manual_seed(derive_seed(run.train.seed, "node", self.index, "round", self.state.epoch))
        batches = self.batches(split, run)
        # max_steps is a per-epoch cap of the central loop; here the round's batches already are the cap.
        train_cfg = replace(run.train, max_steps=0)
        context = TaskContext(rank=self.index, world_size=run.decentralized.nodes,
                              device=model_device(self.state.model))
        history = fit(task, self.state, train_cfg, lambda epoch: batches, context=context,
                      epochs=self.state.epoch + 1, show_progress=False, description=f"node {self.index}")
        return {"train_loss": history[-1].get("train_loss", float("nan")),
                "samples": sum(len(b[0]) for b in batches)}

    def engine_state(self) -> dict[str, Any]:
        return {"model": self.state.model.state_dict(), "optimizers": self.state.optimizer_states(),
                "schedulers": self.state.scheduler_states(), "epoch": self.state.epoch, "step": self.state.step,
                "passes": self.passes, "position": self.position}

    def restore(self, saved: dict[str, Any]) -> None:
        self.state.load(saved)
        self.passes, self.position = saved["passes"], saved["position"]


def _make_node(index: int, task: Task, split: DatasetSplit, run: RunConfig, device: torch.device,
               indices: list[int]) -> GossipNode:
    # Every node starts from the same seeded weights (D-PSGD's common initial point).
    model = build_model(task, split, run, device)
    optimizers = task.build_optimizers(model, run.train)
    # Schedules step once per round (one fit epoch per round), so a cosine spans the rounds.
    schedules = build_schedulers(optimizers, replace(run.train, epochs=run.decentralized.rounds))
    return GossipNode(index, TrainState(model, optimizers, schedules), indices)


def _validate(run: RunConfig) -> np.ndarray:
    cfg = run.decentralized
    if cfg.nodes < 1 or cfg.rounds < 0 or cfg.local_steps < 0:
        raise FedsimError(f"{run.source}: decentralized needs nodes >= 1, rounds >= 0, local_steps >= 0 (got "
                          f"nodes={cfg.nodes}, rounds={cfg.rounds}, local_steps={cfg.local_steps})")
    try:
        return mixing_matrix(adjacency(cfg.topology, cfg.nodes, degree=cfg.degree, seed=run.train.seed), cfg.mixing)
    except FedsimError as exc:
        raise FedsimError(f"{run.source}: key 'decentralized.topology' = {cfg.topology!r}: {exc}") from exc


def _round_record(round_index: int, node_metrics: list[dict[str, float]], avg_metrics: dict[str, float],
                  distance: float, train: list[dict[str, Any]], samples: int, started: float,
                  bytes_per_node: float) -> dict[str, Any]:
    record: dict[str, Any] = {"round": round_index, "epoch": round_index, "samples": samples}
    losses = [t["train_loss"] for t in train if not math.isnan(t["train_loss"])]
    record["train_loss"] = sum(losses) / len(losses) if losses else float("nan")
    for key in node_metrics[0]:
        values = [m[key] for m in node_metrics]
        record[f"test_{key}"] = sum(values) / len(values)  # mean node metric
        record[f"test_{key}_min"] = min(values)
    record.update({f"avg_model_test_{k}": v for k, v in avg_metrics.items()})
    record["consensus_distance"] = distance
    record["bytes_per_node"] = bytes_per_node
    record["time_s"] = time.time() - started
    return record


def _summary(run: RunConfig, task: Task, started: float, history: list[dict[str, Any]], final: dict[str, float],
             per_round_bytes: float, weights: np.ndarray) -> dict[str, Any]:
    metrics = last_test_metrics(history)
    if history:
        last = history[-1]
        metrics.update({k.replace("_test_", "_"): v for k, v in last.items() if k.startswith("avg_model_test_")})
        metrics["consensus_distance"] = last["consensus_distance"]
        metrics["train_loss"] = last["train_loss"]
    metrics.update(final)
    cfg = run.decentralized
    degrees = [len(neighbours(weights, i)) for i in range(cfg.nodes)]
    return make_summary(run, metrics, primary_metric=task.primary_metric, started=started, extra={
        "rounds": len(history), "nodes": cfg.nodes, "topology": cfg.topology, "backend": cfg.backend,
        "degree_mean": sum(degrees) / len(degrees),
        "communication": {"round": "gossip round (send to and receive from every neighbour)",
                          "bytes_per_round_per_node": per_round_bytes, "rounds_per_node": len(history),
                          "bytes_per_node": per_round_bytes * len(history)},
        "history": history,
    })


# ---- in-process backend ---------------------------------------------------------------------------
def _run_inprocess(run: RunConfig, ctx: RunContext, weights: np.ndarray, started: float) -> dict[str, Any]:
    cfg, out = run.decentralized, ctx.out
    device = configure_torch(run.train)
    task, split = load_task_data(run)
    parts = node_partitions(run, split)
    nodes = [_make_node(i, task, split, run, device, parts[i]) for i in range(cfg.nodes)]
    scratch = build_model(task, split, run, device)  # holds the averaged model for evaluation
    mask = _param_mask(scratch)
    history: list[dict[str, Any]] = []
    start_round, samples = 0, 0
    resume = ctx.resume and out.checkpoint_path.exists()
    if resume:
        checkpoint = load_checkpoint(out.checkpoint_path)
        for node, saved in zip(nodes, checkpoint["engine_state"]["nodes"], strict=True):
            node.restore(saved)
        start_round, samples = checkpoint["round"], checkpoint["engine_state"]["samples"]
        history = [r for r in out.read_metrics() if r.get("round", 0) <= start_round]
    else:
        out.reset_metrics()
    state_bytes = flat_state(scratch).numel() * flat_state(scratch).element_size()
    per_round_bytes = float(np.mean([2 * len(neighbours(weights, i)) * state_bytes for i in range(cfg.nodes)]))
    eval_bs = run.train.eval_batch_size
    for round_index in range(start_round + 1, cfg.rounds + 1):
        train = [node.train_round(task, split, run) for node in nodes]
        samples += sum(t["samples"] for t in train)
        states = [flat_state(node.state.model) for node in nodes]
        for i, node in enumerate(nodes):  # every node mixes the pre-gossip states (synchronous gossip)
            load_flat_state(node.state.model, mix(weights, i, {j: states[j] for j in range(cfg.nodes)
                                                               if weights[i, j] != 0}))
        states = [flat_state(node.state.model) for node in nodes]
        load_flat_state(scratch, torch.stack(states).mean(dim=0))
        node_metrics = [_evaluate(task, node.state.model, split, eval_bs) for node in nodes]
        record = _round_record(round_index, node_metrics, _evaluate(task, scratch, split, eval_bs),
                               consensus_distance([s[mask.to(s.device)] for s in states]), train, samples, started,
                               per_round_bytes * round_index)
        out.log(record)
        history.append(record)
        if run.train.checkpoint or round_index == cfg.rounds:
            _checkpoint(out, scratch, round_index, samples, [node.engine_state() for node in nodes])
    scratch.eval()
    final = task.final_metrics(scratch, split, context=task_context(out, device, world_size=cfg.nodes))
    summary = _summary(run, task, started, history, final, per_round_bytes, weights)
    out.write_summary(summary)
    summary["model"] = scratch  # the averaged model, in memory only
    summary["node_models"] = [node.state.model for node in nodes]
    return summary


def _evaluate(task: Task, model: nn.Module, split: DatasetSplit, batch_size: int) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        return task.evaluate(model, split.test, batch_size)


def _checkpoint(out: Any, averaged: nn.Module, round_index: int, samples: int, nodes: list[dict[str, Any]]) -> None:
    """The shared format: the averaged model as ``model``, every node's full state in ``engine_state``."""
    save_checkpoint(out.checkpoint_path, make_checkpoint(
        "decentralized", averaged.state_dict(), round=round_index, epoch=round_index,
        engine_state={"nodes": nodes, "samples": samples}))


# ---- torch.distributed backend -----------------------------------------------------------------------
def _run_node(run: RunConfig, ctx: RunContext, weights: np.ndarray, started: float) -> dict[str, Any]:
    """This process is node ``RANK`` of a torchrun job; neighbours exchange models point-to-point."""
    import torch.distributed as dist

    from fedsim.distributed import distributed_session, read_env

    cfg, out = run.decentralized, ctx.out
    env = read_env()
    if env.world_size != cfg.nodes:
        raise FedsimError(f"{run.source}: decentralized.nodes = {cfg.nodes} but torchrun started {env.world_size} "
                          "processes; one process per node is needed")
    rank = env.rank
    with distributed_session(env, float(cfg.timeout_s)):
        device = configure_torch(run.train)
        task, split = load_task_data(run)
        node = _make_node(rank, task, split, run, device, node_partitions(run, split)[rank])
        scratch = build_model(task, split, run, device)
        mask = _param_mask(scratch)
        history: list[dict[str, Any]] = []
        if rank == 0:
            out.reset_metrics()
        peers = neighbours(weights, rank)
        flat = flat_state(node.state.model)
        state_bytes = flat.numel() * flat.element_size()
        per_round_bytes = float(np.mean([2 * len(neighbours(weights, i)) * state_bytes for i in range(cfg.nodes)]))
        samples = 0
        for round_index in range(1, cfg.rounds + 1):
            train = node.train_round(task, split, run)
            # gloo moves CPU tensors: exchange CPU copies (a no-op on CPU), mix in the same order as in-process.
            mine = flat_state(node.state.model).detach().cpu().contiguous()
            received = {j: torch.empty_like(mine) for j in peers}
            ops = [dist.P2POp(dist.isend, mine, j) for j in peers]
            ops += [dist.P2POp(dist.irecv, received[j], j) for j in peers]
            if ops:
                for request in dist.batch_isend_irecv(ops):
                    request.wait()
            load_flat_state(node.state.model, mix(weights, rank, {rank: mine, **received}))
            mixed = flat_state(node.state.model).detach().cpu()
            # Metrics only (not part of the algorithm): the average model, the spread, the mean test metrics.
            average = mixed.clone()
            dist.all_reduce(average)
            average /= cfg.nodes
            load_flat_state(scratch, average)
            distance = torch.tensor([float(torch.linalg.vector_norm((mixed - average)[mask]))], dtype=torch.float64)
            dist.all_reduce(distance)
            metrics = _evaluate(task, node.state.model, split, run.train.eval_batch_size)
            gathered: list[Any] = [None] * cfg.nodes
            dist.all_gather_object(gathered, (metrics, train))
            samples += sum(t["samples"] for _, t in gathered)
            if rank == 0:
                record = _round_record(round_index, [m for m, _ in gathered],
                                       _evaluate(task, scratch, split, run.train.eval_batch_size),
                                       float(distance) / cfg.nodes, [t for _, t in gathered], samples, started,
                                       per_round_bytes * round_index)
                out.log(record)
                history.append(record)
            if run.train.checkpoint or round_index == cfg.rounds:
                states: list[Any] = [None] * cfg.nodes
                dist.all_gather_object(states, _cpu(node.engine_state()))
                if rank == 0:
                    _checkpoint(out, scratch, round_index, samples, states)
        scratch.eval()
        final = task.final_metrics(scratch, split, context=task_context(out, device, world_size=cfg.nodes)) \
            if rank == 0 else {}
        summary = _summary(run, task, started, history, final, per_round_bytes, weights)
        if rank == 0:
            out.write_summary(summary)
        summary["model"] = scratch
        return summary


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


# ---- the engine ------------------------------------------------------------------------------------
def run_decentralized(run: RunConfig, ctx: RunContext) -> dict[str, Any]:
    """Gossip-train ``run``: in this process, or one torchrun process per node."""
    started = time.time()
    weights = _validate(run)
    if run.decentralized.backend == "inprocess":
        return _run_inprocess(run, ctx, weights, started)
    from fedsim.distributed import under_launcher

    if under_launcher():
        return _run_node(run, ctx, weights, started)
    if ctx.resume:
        raise FedsimError(f"{run.source}: --resume is supported by the inprocess gossip backend only")
    from fedsim.engines.parallel.launch import launch_torchrun

    return launch_torchrun(ctx, run, run.decentralized.nodes, timeout_s=run.decentralized.timeout_s)

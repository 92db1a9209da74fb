"""fedsim as a Flower App: the ClientApp every SuperNode runs and the ServerApp around the round loop.

Clients are stateless: every message carries the run's config (``fedsim-run``), and a client
builds the task, its data and its partition from it (cached per process), trains with the shared
loop (:func:`fedsim.train.fit`) on its partition and replies with arrays, example counts and
metrics. Per-partition state that a real client would keep (SCAFFOLD's ``c_i``) travels with
the message under ``client-state`` and is kept and checkpointed by the server.

Entry points:

* :data:`clientapp` and :data:`serverapp` — the components named in ``pyproject.toml``
  (``flwr run . --stream``); the ServerApp reads ``[tool.flwr.app.config]``;
* :func:`make_server_app` — a ServerApp bound to one fedsim run (``fedsim run``, through
  ``flwr.simulation.run_simulation`` or fedsim's local grid).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import itertools
import json
import logging
import random
import time
import traceback
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp import Grid, ServerApp
from torch import nn
from torch.utils.data import Subset

from fedsim.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from fedsim.config import RunConfig, TrainConfig, from_dict, to_dict
from fedsim.data import ClientShard, DatasetSplit, NaturalClients, Population
from fedsim.data.partition import lazy_partition, partition_labels, split_holdout
from fedsim.engines.common import WarmHeap, build_model, last_test_metrics, load_task_data, task_context
from fedsim.engines.federated import fewshot as fed_fewshot
from fedsim.engines.federated.devices import Devices
from fedsim.engines.federated.fedbuff import BufferedServer
from fedsim.engines.federated.rounds import (
    CLIENT_STATE_KEY,
    FAIL_KEY,
    LOCAL_EPOCHS_KEY,
    LOCAL_STEPS_KEY,
    RUN_KEY,
    ClockSetup,
    NodeMap,
    RoundLoop,
    connect_nodes,
    evaluation_cohort,
    num_sampled,
    run_json,
)
from fedsim.engines.federated.secagg import secagg_client_mod
from fedsim.errors import FedsimError
from fedsim.privacy import dp_fedavg
from fedsim.results import RunDir, make_summary
from fedsim.tasks import Batch, Task, TaskContext, model_device
from fedsim.train import ReusedOptimizers, TrainState, build_schedulers, derive_seed, fit, make_loader
from fedsim.wire.array_codec import record_to_numpy, record_to_tensors, tensors_to_record
from fedsim.wire.flower_private import KEY_CLIPPING_NORM
from strategies import (
    StrategyContext,
    get_strategy_state,
    make_strategy,
    set_strategy_state,
    uses_client_state,
)
from strategies.client import client_algorithm
from strategies.scaffold import to_record

log = logging.getLogger("fedsim.federated")

__all__ = ["clientapp", "serverapp", "make_server_app", "FederatedJob", "serve", "client_partition",
           "SimulatedDropout"]


class SimulatedDropout(RuntimeError):
    """Raised by a client the round loop chose to fail (``federated.dropout_fraction``)."""


# ---- client side ---------------------------------------------------------------------------------
class _Groups(Protocol):
    num_clients: int

    def indices(self, k: int) -> np.ndarray: ...

    def sizes(self) -> np.ndarray: ...


class _ListGroups:
    """Partitions already listed (a Flower Datasets partitioner's, built once per run)."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts, self.num_clients = parts, len(parts)

    def indices(self, k: int) -> np.ndarray:
        return self.parts[k]

    def sizes(self) -> np.ndarray:
        return np.array([len(p) for p in self.parts], dtype=np.int64)


class _NaturalGroups:
    def __init__(self, clients: NaturalClients) -> None:
        self.clients, self.num_clients = clients, clients.num_clients

    def indices(self, k: int) -> np.ndarray:
        return self.clients.train_indices(k)

    def sizes(self) -> np.ndarray:
        return np.diff(self.clients.train_offsets)


@dataclass
class PartitionPopulation:
    """Clients as index groups of the loaded split, resolved when a client is asked for (O(its size)).

    Natural clients keep their own test samples, as the data split them (LEAF's per-user train/test);
    other partitions hold out a seeded ``holdout`` fraction of each client's partition.
    """

    split: DatasetSplit
    groups: _Groups
    holdout: float
    seed: int
    natural: bool = False

    @property
    def num_clients(self) -> int:
        return self.groups.num_clients

    def sizes(self) -> np.ndarray:
        """Every client's partition size (its training samples number at least one when this does)."""
        return self.groups.sizes()

    def client(self, k: int) -> ClientShard:
        indices = self.groups.indices(k)
        if self.natural and self.split.clients is not None:
            return ClientShard(self.split.train, indices, self.split.test, self.split.clients.test_indices(k))
        kept, held = split_holdout(indices, self.holdout, self.seed, k)
        return ClientShard(self.split.train, kept, self.split.train, held)


def client_population(run: RunConfig, task: Task, split: DatasetSplit) -> Population:
    """The clients of ``run``: a generated population (``natural`` on e.g. Synthetic(alpha, beta)), the data's
    own clients (``natural``: LEAF users, a client column), a Flower Datasets partitioner's partitions
    (``flwr``), or fedsim's seeded partitioners in their lazy form (one permutation or one CSR array,
    each client's rows cut out when it is sampled)."""
    fed = run.federated
    if fed.partition == "natural":
        if split.population is not None:
            return split.population
        if split.clients is None:
            raise FedsimError(f"{run.source}: federated.partition = 'natural' needs data that come with their "
                              f"clients (leaf, or hf with a client_column); '{split.info.name}' has none")
        return PartitionPopulation(split, _NaturalGroups(split.clients), 0.0, run.train.seed, natural=True)
    if fed.partition == "flwr":
        from fedsim.data.flwr_partitions import flwr_partition

        parts = flwr_partition(split, fed.partitioner, dict(fed.partitioner_options), fed.num_clients, run.train.seed)
        return PartitionPopulation(split, _ListGroups(parts), fed.client_test_fraction, run.train.seed)
    labels = partition_labels(split.train.tensors[1])  # type: ignore[attr-defined]
    if fed.partition in ("dirichlet", "shards") and not labels.any() and split.info.num_classes == 0:
        raise FedsimError(f"{run.source}: federated.partition = '{fed.partition}' needs class labels; "
                          f"task '{run.task}' has none (use iid or quantity_skew)")
    groups = lazy_partition(labels, fed.num_clients, fed.partition, seed=run.train.seed, alpha=fed.alpha,
                            shards_per_client=fed.shards_per_client)
    return PartitionPopulation(split, groups, fed.client_test_fraction, run.train.seed)


def client_partition(run: RunConfig, task: Task, split: DatasetSplit) -> list[np.ndarray]:
    """Every client's training-split partition, listed (the partitions report, small populations)."""
    population = client_population(run, task, split)
    if not isinstance(population, PartitionPopulation):
        raise FedsimError(f"{run.source}: '{split.info.name}' generates its clients on demand; they have no "
                          "partition of a loaded split to list")
    return [population.groups.indices(k) for k in range(population.num_clients)]


@dataclass
class ClientData:
    """What one client process keeps between messages of a run (rebuilt when the run changes): the
    task, the data, a model to load arrays into, and the clients, resolved as they are sampled."""

    run: RunConfig
    task: Task
    split: DatasetSplit
    model: nn.Module
    population: Population
    _shards: OrderedDict[int, ClientShard] = field(default_factory=OrderedDict)
    optimizers: ReusedOptimizers = field(default_factory=ReusedOptimizers)
    """The model's optimizers, built once and reset for each call."""

    def shard(self, partition_id: int) -> ClientShard:
        """Client ``partition_id``'s data; the last few are kept (a round asks for them twice at most)."""
        if partition_id in self._shards:
            self._shards.move_to_end(partition_id)
            return self._shards[partition_id]
        shard = self.population.client(partition_id)
        self._shards[partition_id] = shard
        if len(self._shards) > _SHARDS_KEPT:
            self._shards.popitem(last=False)
        return shard


_SHARDS_KEPT = 256


_CACHE: dict[str, ClientData] = {}


def _data_key(run: RunConfig) -> str:
    fed = run.federated
    return json.dumps([run.task, run.task_options, to_dict(run.data), run.train.seed, run.train.dtype, fed.num_clients,
                       fed.partition, fed.partitioner, fed.partitioner_options, fed.alpha, fed.shards_per_client,
                       fed.client_test_fraction],
                      sort_keys=True, default=str)


_LAST_RUN: list[tuple[RunConfig, str]] = []
"""The last run config seen and its data key: every call of a run brings the same (lru-cached) object,
and its key (a JSON dump of the data settings) costs ~60 us, a tenth of a small client's call."""


def client_data(run: RunConfig) -> ClientData:
    """Task, data, partitions and a model to load arrays into, cached per process and run."""
    if _LAST_RUN and _LAST_RUN[0][0] is run:
        key = _LAST_RUN[0][1]
    else:
        key = _data_key(run)
        _LAST_RUN[:] = [(run, key)]
    if key not in _CACHE:
        if len(_CACHE) >= 4:
            _CACHE.clear()
        task, split = load_task_data(run)
        model = build_model(task, split, run, torch.device("cpu"))
        _CACHE[key] = ClientData(run, task, split, model, client_population(run, task, split))
    return _CACHE[key]


@functools.lru_cache(maxsize=16)
def run_from_json(text: str) -> RunConfig:
    """The run config a message carries (parsed once per process: every round sends the same text)."""
    return from_dict(RunConfig, json.loads(text), "<fedsim-run message>")


def _seed_client(seed: int) -> None:
    """Seed python, numpy and torch's CPU generator (clients train on CPU).

    ``torch.manual_seed`` would also touch the lazily initialised CUDA/XPU/MTIA generators, which
    costs milliseconds per call — more than a small client's whole round.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


def _partition_id(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise FedsimError("this node has no partition-id in its node config; start SuperNodes with "
                          "--node-config 'partition-id=P num-partitions=N'") from exc


def _threads(run: RunConfig) -> None:
    # One client = federated.cpus_per_client cores; more torch threads than that oversubscribes the box.
    wanted = run.train.threads or max(1, int(run.federated.cpus_per_client))
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


def _load(model: nn.Module, arrays: ArrayRecord | dict[str, np.ndarray]) -> None:
    """Copy received arrays into ``model``'s parameters and buffers (casting dtypes, as load_state_dict does).

    ``load_state_dict`` walks the module tree with hooks and per-module bookkeeping, which costs
    more than a small client's whole training step; for fedsim's plain models a copy per tensor is
    the same thing. Anything unusual (missing or extra names, other shapes) goes through
    ``load_state_dict`` so its error message is the one users see.
    """
    tensors = record_to_tensors(arrays)  # views of the message's bytes; copied below
    targets = model.state_dict(keep_vars=True)
    if tensors.keys() != targets.keys() or any(targets[k].shape != v.shape for k, v in tensors.items()):
        model.load_state_dict(tensors, strict=True)
        return
    with torch.no_grad():
        for name, value in tensors.items():
            targets[name].copy_(value)


@functools.lru_cache(maxsize=16)
def _local_train_config(train: TrainConfig, epochs: int, max_steps: int) -> TrainConfig:
    """The run's training settings for one client call (the same few every round: made once)."""
    return dataclasses.replace(train, epochs=epochs, progress=False, checkpoint=False, max_steps=max_steps)


def _counted(batches: Any, counter: list[int]) -> Iterator[Batch]:
    for batch in batches:
        counter[0] += len(batch[0])
        yield batch


def dp_clipping_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``fixedclipping_mod`` for training messages of client-side DP runs (their config carries the
    clipping norm, written by ``DifferentialPrivacyClientSideFixedClipping``); every other message passes
    through untouched."""
    config = msg.content["config"] if "config" in msg.content else {}
    if msg.metadata.message_type == MessageType.TRAIN and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


# SecAgg+ outermost: its layout adapter hands the DP clipping mod and train fedsim's own layout; both mods pass
# every other message through untouched.
clientapp = ClientApp(mods=[secagg_client_mod, dp_clipping_mod])


@clientapp.query()
def query(msg: Message, context: Context) -> Message:
    """The node's partition id (the server learns the partition -> node mapping from this)."""
    pid, count = _partition_id(context)
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid, "num-partitions": count})}),
                   reply_to=msg)


@clientapp.train()
def train(msg: Message, context: Context) -> Message:
    """Local training on this node's partition with the shared loop; reply arrays + counts + metrics."""
    config = msg.content["config"]
    run = run_from_json(str(config[RUN_KEY]))
    pid, _ = _partition_id(context)
    server_round = int(config.get("server-round", 0))
    if config.get(FAIL_KEY, False):
        raise SimulatedDropout(f"client {pid} dropped out in round {server_round} (simulated)")
    _threads(run)
    data = client_data(run)
    model, task, fed = data.model, data.task, run.federated
    global_params = record_to_numpy(msg.content["arrays"])  # decoded once: loaded here, read by FedProx/SCAFFOLD
    _load(model, global_params)
    state_in = msg.content[CLIENT_STATE_KEY] if CLIENT_STATE_KEY in msg.content else None
    algorithm = client_algorithm(msg.content, model, global_params, state_in)  # type: ignore[arg-type]
    seed = derive_seed(run.train.seed, "client", server_round, pid)
    _seed_client(seed)  # dropout masks, augmentations: keyed by (seed, round, partition)
    # A straggler doing partial work (federated.straggler_work = "partial") is told how much to do.
    local_steps = int(config.get(LOCAL_STEPS_KEY, fed.local_steps)) if fed.local_steps > 0 else 0
    local_epochs = 1 if fed.local_steps > 0 else int(config.get(LOCAL_EPOCHS_KEY, fed.local_epochs))
    local_cfg = _local_train_config(run.train, local_epochs, 0 if fed.local_steps > 0 else run.train.max_steps)
    optimizers = data.optimizers.get(local_cfg, lambda: task.build_optimizers(model, local_cfg))
    state = TrainState(model, optimizers, build_schedulers(optimizers, local_cfg))
    shard = data.shard(pid)
    indices = shard.train_idx.tolist()
    counter = [0]

    def batches_for_epoch(epoch: int) -> Iterator[Batch]:
        if local_steps > 0:  # K steps, cycling through local epochs as needed
            endless = itertools.chain.from_iterable(
                make_loader(shard.train, local_cfg.batch_size, seed, e, local_cfg.shuffle, indices=indices)
                for e in itertools.count())
            return _counted(itertools.islice(endless, local_steps), counter)
        return _counted(make_loader(shard.train, local_cfg.batch_size, seed, epoch, local_cfg.shuffle,
                                    indices=indices), counter)

    # Epochs of earlier rounds offset the context's epoch, so per-epoch draws (MAE masks) change every
    # round. A client writes nothing (no run folder); the server writes the run's figures.
    history = fit(task, state, local_cfg, batches_for_epoch, context=TaskContext(device=model_device(model)),
                  extra_loss=algorithm.extra_loss, show_progress=False,
                  epoch_offset=max(server_round - 1, 0) * (1 if fed.local_steps > 0 else fed.local_epochs))
    extra_records, state_out = algorithm.finish(state.step, run.train.lr)
    for optimizer in optimizers.values():  # the gradients are done with: free them before the reply is built
        optimizer.zero_grad(set_to_none=True)
    metrics: dict[str, Any] = {"num-examples": len(indices), "samples": counter[0], "local-steps": state.step}
    if history and "train_loss" in history[-1]:
        metrics["loss"] = float(history[-1]["train_loss"])
    content = RecordDict({"arrays": tensors_to_record(model.state_dict()), "metrics": MetricRecord(metrics)})
    for key, record in extra_records.items():
        content[key] = record
    if state_out is not None:
        content[CLIENT_STATE_KEY] = state_out
    return Message(content, reply_to=msg)


@clientapp.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received arrays on this node's own held-out samples."""
    config = msg.content["config"]
    run = run_from_json(str(config[RUN_KEY]))
    pid, _ = _partition_id(context)
    _threads(run)
    data = client_data(run)
    _load(data.model, msg.content["arrays"])
    shard = data.shard(pid)
    held = shard.held_idx.tolist()
    metrics: dict[str, Any] = {"num-examples": len(held)}
    if held:
        data.model.eval()
        with torch.no_grad():
            scores = data.task.evaluate(data.model, Subset(shard.held, held), run.train.eval_batch_size)
        metrics.update({k: float(v) for k, v in scores.items()})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@clientapp.query(fed_fewshot.ACTION)
def base_statistics(msg: Message, context: Context) -> Message:
    """Sufficient statistics of this node's base-class features under the received backbone."""
    run = run_from_json(str(msg.content["config"][RUN_KEY]))
    pid, _ = _partition_id(context)
    _threads(run)
    data = client_data(run)
    _load(data.model, msg.content["arrays"])
    # The client's whole partition, every sample once (held-out samples count when they are rows of
    # the same data set: natural clients' test samples are not).
    shard = data.shard(pid)
    held = shard.held_idx.tolist() if shard.held is shard.train else []
    indices = sorted(shard.train_idx.tolist() + held)
    x, y = shard.train.tensors
    return fed_fewshot.client_reply(msg, data.task, data.model, x[indices], y[indices], data.split.info.num_classes)


# ---- server side ---------------------------------------------------------------------------------
@dataclass
class FederatedJob:
    """One fedsim run for a ServerApp to execute (and where its result goes).

    ``stop_after_round`` > 0 ends the run after that round's checkpoint without a summary: tests
    use it to interrupt a run and resume it.
    """

    run: RunConfig
    out: RunDir
    resume: bool = False
    stop_after_round: int = 0
    result: dict[str, Any] | None = None
    error: BaseException | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def client_distribution(client_metrics: dict[int, dict[str, float]], metric: str, higher: bool) -> dict[str, float]:
    """What the summary keeps of the evaluated clients' ``metric``: how many, mean, quantiles (10/50/90 %)
    and the mean of the worst 10 %."""
    values = [m[metric] for m in client_metrics.values() if metric in m]
    if not values:
        return {}
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return {f"client_{metric}_mean": float(np.mean(values)), f"client_{metric}_p10": float(p10),
            f"client_{metric}_p50": float(p50), f"client_{metric}_p90": float(p90),
            f"client_{metric}_worst10": _worst_fraction(values, 0.1, higher), "clients_evaluated": len(values)}


def _worst_fraction(values: list[float], fraction: float, higher_is_better: bool) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values, reverse=not higher_is_better)
    count = max(1, int(np.ceil(fraction * len(ordered))))
    return float(np.mean(ordered[:count]))


@dataclass
class _Progress:
    """Where a run stands: the global arrays, the per-round log and the last completed round."""

    arrays: ArrayRecord
    history: list[dict[str, Any]]
    round: int = 0
    resumed: bool = False


def _restore(job: FederatedJob, strategy: Any, loop: RoundLoop, server: BufferedServer | None) -> _Progress:
    """Global arrays, strategy state, client state, totals and history from the run's checkpoint."""
    checkpoint = load_checkpoint(job.out.checkpoint_path)
    if checkpoint.get("engine") != "federated":
        raise FedsimError(f"{job.out.checkpoint_path} was written by engine '{checkpoint.get('engine')}', "
                          "not federated")
    state = checkpoint["engine_state"]
    try:
        set_strategy_state(strategy, state["strategy"])
    except ValueError as exc:
        raise FedsimError(f"{job.out.checkpoint_path}: {exc} (was it written with another strategy?)") from exc
    loop.client_state = {int(p): to_record(s) for p, s in state["client_state"].items()}
    loop.totals = {"sim_time_s": 0.0, **state["totals"]}
    if server is not None:
        if "fedbuff" not in state:
            raise FedsimError(f"{job.out.checkpoint_path} was not written by a FedBuff run (federated.system.server)")
        server.restore(state["fedbuff"])
    progress = _Progress(ArrayRecord({k: v.clone() for k, v in checkpoint["model"].items()}), list(state["history"]),
                         int(checkpoint["round"]), resumed=True)
    job.out.reset_metrics()  # rewrite the log from the checkpoint: rounds after it are redone
    for record in progress.history:
        job.out.log(record)
    return progress


def _save(job: FederatedJob, strategy: Any, loop: RoundLoop, progress: _Progress,
          server: BufferedServer | None) -> None:
    """Checkpoint after a round, in the shared format (atomic)."""
    engine_state = {
        "strategy": get_strategy_state(strategy),
        "client_state": {p: {k: v.numpy() for k, v in s.items()} for p, s in loop.client_state.items()},
        "totals": dict(loop.totals), "history": progress.history,
        **({"fedbuff": server.state()} if server is not None else {}),
    }
    save_checkpoint(job.out.checkpoint_path, make_checkpoint(
        "federated", progress.arrays.to_torch_state_dict(), round=progress.round, engine_state=engine_state))


def _summary_metrics(task: Task, history: list[dict[str, Any]], client_metrics: dict[int, dict[str, float]],
                     loop: RoundLoop) -> dict[str, Any]:
    """Final and best test metrics, per-client spread, traffic, budget and failures."""
    primary = task.primary_metric
    higher = primary not in task.lower_is_better
    metrics: dict[str, Any] = last_test_metrics(history)
    curve = [h[f"test_{primary}"] for h in history if f"test_{primary}" in h and h["round"] > 0]
    if curve:
        metrics[f"best_{primary}"] = max(curve) if higher else min(curve)
    metrics.update(client_distribution(client_metrics, primary, higher))
    metrics["bytes_total"] = float(loop.totals["bytes"])
    metrics["samples_total"] = float(loop.totals["samples"])
    metrics["sim_time_s"] = float(loop.totals.get("sim_time_s", 0.0))
    metrics["failed_client_rounds"] = sum(len(h.get("failed", [])) for h in history)
    return metrics


def _write_client_metrics(out: RunDir, client_metrics: dict[int, dict[str, float]]) -> None:
    """One JSON line per evaluated client (``{"client": k, ...metrics}``), gzip-compressed, atomically."""
    lines = "".join(json.dumps({"client": p, **m}) + "\n" for p, m in client_metrics.items())
    atomic_write_bytes(out.path("client_metrics.jsonl.gz"), gzip.compress(lines.encode(), mtime=0))


def clock_setup(run: RunConfig) -> ClockSetup:
    """The virtual clock of ``run``: device profiles and availability (traces read relative to the working
    folder), and each client's training-sample count as its ClientApp will see it."""
    fed = run.federated
    data = client_data(run)
    return ClockSetup(Devices(fed.system, fed.num_clients, run.train.seed, base_dir=Path.cwd()), fed.system,
                      lambda p: len(data.shard(p).train_idx), run.train.batch_size)


def serve(grid: Grid, job: FederatedJob, nodes: NodeMap | None = None) -> dict[str, Any]:
    """The ServerApp's main: fedsim's round loop (:class:`RoundLoop`) for ``job.run`` on ``grid``;
    ``nodes`` is the partition <-> node map when the caller already has it (no second discovery)."""
    started = time.time()
    run, out = job.run, job.out
    fed = run.federated
    k = num_sampled(fed.num_clients, fed.clients_per_round, fed.fraction_fit)
    if run.train.threads > 0:
        torch.set_num_threads(run.train.threads)
    task, split = load_task_data(run)
    model = build_model(task, split, run, torch.device("cpu"))  # the initial global model (seeded)
    trainable = tuple(name for name, _ in model.named_parameters())
    strategy = make_strategy(fed.strategy, fed.strategy_options,
                             StrategyContext(fed.num_clients, trainable, run.train.momentum), file=run.source)

    def evaluate(arrays: ArrayRecord) -> dict[str, float]:
        _load(model, arrays)
        model.eval()
        with torch.no_grad():
            return {k: float(v) for k, v in task.evaluate(model, split.test, run.train.eval_batch_size).items()}

    # User-level DP: the strategy behind Flower's DP wrapper; sigma resolved from a target epsilon now.
    ledger = dp_fedavg.PrivacyLedger.resolve(fed.dp, fed.num_clients, k, fed.rounds) if fed.dp.enabled else None
    private = dp_fedavg.make_private(strategy, fed.dp, k, ledger.noise_multiplier, run.train.seed) if ledger else None
    loop = RoundLoop(private or strategy, fed.num_clients, k, run.train.seed, run_json(to_dict(run)), evaluate,
                     fed.dropout_fraction, fed.straggler_fraction, timeout=fed.reply_timeout_s,
                     straggler_work=fed.straggler_work, local_epochs=fed.local_epochs, local_steps=fed.local_steps,
                     uses_client_state=uses_client_state(strategy), clock=clock_setup(run),
                     secure_aggregation=fed.secure_aggregation)
    server = BufferedServer(loop, concurrency=k) if fed.system.server == "fedbuff" else None
    if job.resume and out.checkpoint_path.exists():
        progress = _restore(job, strategy, loop, server)
        if private is not None and progress.history[-1].get("dp_clipping_norm"):  # adaptive clipping's bound
            private.wrapper.clipping_norm = float(progress.history[-1]["dp_clipping_norm"])  # type: ignore[attr-defined]
    else:
        # Straight into progress: a local name would keep the initial arrays alive for the whole run.
        progress = _Progress(tensors_to_record(model.state_dict()), [])
        record = {"round": 0, **{f"test_{k}": v for k, v in evaluate(progress.arrays).items()},
                  "bytes_total": 0.0, "samples_total": 0.0, "sim_time_s": 0.0}
        progress.history.append(record)
        out.reset_metrics()
        out.log(record)
    if nodes is not None and nodes.num_partitions == fed.num_clients:
        loop.nodes = nodes
    else:
        loop.connect(grid)
    heap = WarmHeap()
    try:
        for server_round in range(progress.round + 1, fed.rounds + 1):
            # A marker fault tests (and operators) can wait on: the round's messages go out next.
            atomic_write_json(out.path("round_started.json"), {"round": server_round, "time": time.time()})
            bound_before = private.clipping_norm if private is not None else 0.0
            result = (server.step(grid, server_round, progress.arrays) if server is not None
                      else loop.round(grid, server_round, progress.arrays))
            every = fed.evaluate_clients_every
            if every and server_round % every == 0 and server_round < fed.rounds:
                cohort = evaluation_cohort(run.train.seed, server_round, fed.num_clients, fed.evaluate_clients)
                result.record.update(client_distribution(loop.evaluate_clients(grid, result.arrays, server_round, cohort),
                                                         task.primary_metric, task.primary_metric not in task.lower_is_better))
            if ledger is not None and private is not None:
                ledger.record(result.record, progress.history, private, bound_before)
            progress.arrays, progress.round = result.arrays, server_round
            progress.history.append(result.record)
            out.log(result.record)
            log.info("round %d/%d: %s", server_round, fed.rounds,
                     " ".join(f"{k}={v:.4g}" for k, v in result.record.items() if k.startswith("test_")))
            if run.train.checkpoint:
                _save(job, strategy, loop, progress, server)
            if job.stop_after_round and server_round >= job.stop_after_round:
                return {"interrupted_after_round": server_round}
            heap.round_done()  # the round's garbage now; after the first round, the heap the run keeps frozen
    finally:
        heap.release()
    cohort = evaluation_cohort(run.train.seed, fed.rounds + 1, fed.num_clients, fed.evaluate_clients)
    client_metrics = loop.evaluate_clients(grid, progress.arrays, fed.rounds + 1, cohort)
    if fed.client_metrics_file:
        _write_client_metrics(out, client_metrics)
    _load(model, progress.arrays)
    model.eval()
    metrics = _summary_metrics(task, progress.history, client_metrics, loop)
    if fed_fewshot.applies(task):  # base statistics merged from the clients, not pooled features
        metrics.update(fed_fewshot.federated_fewshot_metrics(grid, loop, task, model, split, progress.arrays,
                                                             fed.rounds + 2))
    else:
        metrics.update(task.final_metrics(model, split, context=task_context(out, torch.device("cpu"))))
    privacy: dict[str, Any] = {}
    if ledger is not None:
        dp_metrics, privacy = ledger.summary(progress.history)
        metrics.update(dp_metrics)
    summary = make_summary(run, metrics, primary_metric=task.primary_metric, started=started, extra={
        "rounds": fed.rounds, "history": progress.history, "engine": fed.engine, "clients_per_round": k,
        "resumed": progress.resumed,
        "startup_s": job.extras.get("startup_s", 0.0),
        **({"privacy": privacy} if privacy else {}),
    })
    out.write_summary(summary)
    if run.train.progress:
        primary = task.primary_metric
        print(f"fedsim: federated run {run.name} (seed {run.train.seed}): {primary} = "
              f"{metrics.get(primary, float('nan')):.4f} after {fed.rounds} rounds, {summary['wall_time_s']:.1f} s",
              flush=True)
    summary["model"] = model  # in-memory only, like the central engine (tests compare parameters)
    return summary


def make_server_app(jobs: FederatedJob | list[FederatedJob]) -> ServerApp:
    """A ServerApp that runs each job in turn on the same grid, leaving summaries (or exceptions) on them."""
    todo = [jobs] if isinstance(jobs, FederatedJob) else list(jobs)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # Start-up (Ray actors coming up, each loading the ClientApp) is paid once here, not by
        # the first run's wall time: every node answers a partition query before any run starts.
        started = time.perf_counter()
        try:
            nodes = connect_nodes(grid, todo[0].run.federated.num_clients, 300.0)  # no message on fedsim's grid
        except Exception as exc:  # noqa: BLE001 - reported as every job's error below
            for job in todo:
                job.error = exc
            return
        todo[0].extras["startup_s"] = time.perf_counter() - started
        for job in todo:
            try:
                job.result = serve(grid, job, nodes)
            except Exception as exc:  # re-raised by the caller with its type (FedsimError -> its exit code)
                job.error = exc
                if not isinstance(exc, FedsimError):  # a FedsimError's message says it all; keep bugs' tracebacks
                    log.error("federated run '%s' failed: %s\n%s", job.run.name, exc, traceback.format_exc())
                break  # the caller stops at this run: later runs would be computed for nothing

    return app


# ---- the App of `flwr run .` -----------------------------------------------------------------------
APP_CONFIG_DEFAULTS: dict[str, Any] = {
    "experiment": "experiments/flower_app.toml",
    "run": "",
    "seed": -1,
    "out": "results",
    "overrides": "",
}
"""``[tool.flwr.app.config]`` keys the ServerApp reads (``--run-config`` overrides them)."""


def job_from_run_config(run_config: dict[str, Any]) -> FederatedJob:
    """The fedsim run a ``flwr run`` invocation asks for: a run of an experiment file (+ overrides)."""
    from fedsim.config import load_experiment, run_with_seed

    cfg = {**APP_CONFIG_DEFAULTS, **run_config}
    path = Path(str(cfg["experiment"]))
    if not path.is_absolute():
        candidates = [Path.cwd() / path, Path(__file__).resolve().parents[2] / path]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    overrides = [o.strip() for o in str(cfg["overrides"]).split(";") if o.strip()]
    experiment = load_experiment(path, overrides)
    federated = [r for r in experiment.runs if r.mode == "federated"]
    wanted = str(cfg["run"])
    chosen = [r for r in federated if r.name == wanted] if wanted else federated[:1]
    if not chosen:
        raise FedsimError(f"{path}: no federated run named '{wanted}' (run-config key 'run')")
    run = chosen[0]
    seed = int(cfg["seed"])
    if seed < 0 and experiment.seeds:
        seed = experiment.seeds[0]
    if seed >= 0:
        run = run_with_seed(run, seed)
    folder = f"{run.name}-seed{run.train.seed}"
    return FederatedJob(run, RunDir(Path(str(cfg["out"])) / experiment.name / folder))


def _federation_size(grid: Grid, timeout: float = 300.0) -> int:
    """How many partitions the federation's SuperNodes hold (asked of the first node to connect)."""
    deadline = time.monotonic() + timeout
    while not (nodes := sorted(grid.get_node_ids())):
        if time.monotonic() > deadline:
            raise FedsimError(f"no SuperNode connected within {timeout:.0f} s")
        time.sleep(0.1)
    message = Message(RecordDict({"config": ConfigRecord({})}), nodes[0], MessageType.QUERY, group_id="size")
    reply = next(iter(grid.send_and_receive([message], timeout=timeout)), None)
    if reply is None or reply.has_error():
        raise FedsimError(f"SuperNode {nodes[0]} did not report its partition count")
    return int(reply.content["metrics"]["num-partitions"])


serverapp = ServerApp()


@serverapp.main()
def flwr_main(grid: Grid, context: Context) -> None:
    """``flwr run .``: the run named by the app config, on whatever SuperNodes the federation has."""
    job = job_from_run_config(dict(context.run_config))
    nodes = _federation_size(grid)
    fed = job.run.federated
    if nodes != fed.num_clients:  # the federation's SuperNodes are the clients
        log.warning("fedsim: %d SuperNodes in this federation; using num_clients = %d (experiment: %d)",
                    nodes, nodes, fed.num_clients)
        fed = dataclasses.replace(fed, num_clients=nodes, clients_per_round=min(fed.clients_per_round, nodes))
        job.run = dataclasses.replace(job.run, federated=fed)
    summary = serve(grid, job)
    log.warning("fedsim federated run '%s' finished: %s (results in %s)", job.run.name,
                {k: round(v, 4) for k, v in summary["metrics"].items() if isinstance(v, float)}, job.out.root)
    print(f"fedsim: final {json.dumps({k: v for k, v in summary['metrics'].items() if isinstance(v, float)})}",
          flush=True)

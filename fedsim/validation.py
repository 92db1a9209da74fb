"""The checks of an experiment that need more than its config: registries, the task, the data.

:func:`fedsim.config.experiment_from_dict` already applied the rules that read only the config
(ranges, ``clients_per_round <= num_clients``, ...). :func:`validate_experiment` adds, for every
run (and every seed where the answer depends on it), before the first run starts:

* the mode, the task and its options, the strategy and its options, partition and topology names;
* what the task must support in the run's mode (data-parallel, a pipeline split of its model,
  vectorised clients);
* the data: every federated client, gossip node, data-parallel rank and parameter-server worker
  gets at least one training sample (the data set is loaded once per distinct task and data).

Each problem is a :class:`ConfigError` naming the file, the key and the value (exit code 2); a
task that cannot run in a mode is an :class:`UnsupportedError` (exit code 2 as well).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fedsim.config import (
    NUM_CLIENTS_FROM_DATA,
    Experiment,
    RunConfig,
    data_fixes_num_clients,
    run_violations,
    run_with_seed,
    to_dict,
)
from fedsim.data import DatasetSplit
from fedsim.engines import ENGINES
from fedsim.errors import ConfigError, FedsimError, UnsupportedError
from fedsim.tasks import Task, make_task, task_class

__all__ = ["validate_experiment", "validate_run"]

DataLoader = Callable[[RunConfig], tuple[Task, DatasetSplit]]

# Modes whose checks need the training split (central runs load their data themselves, once).
_DATA_MODES = ("federated", "decentralized", "parameter_server", "ddp", "pipeline")


def validate_experiment(experiment: Experiment, runs: Sequence[RunConfig] | None = None) -> list[RunConfig]:
    """Check ``runs`` (default: every run of ``experiment``) for each of the experiment's seeds; return
    them resolved (natural partitions: ``federated.num_clients`` as the data say).

    Raises
    ------
    ConfigError: the first problem found, naming the file, the key and the value.
    UnsupportedError: a task that cannot run in its run's mode.
    """
    runs = experiment.runs if runs is None else runs
    loaded: dict[str, tuple[Task, DatasetSplit]] = {}

    def load(run: RunConfig) -> tuple[Task, DatasetSplit]:
        key = json.dumps([run.task, run.task_options, to_dict(run.data)], sort_keys=True, default=str)
        if key not in loaded:
            loaded[key] = _load(run)
        return loaded[key]

    return [validate_run(run, experiment.seeds or (run.train.seed,), load, several=len(experiment.runs) > 1)
            for run in runs]


def validate_run(run: RunConfig, seeds: Sequence[int] = (), load: DataLoader | None = None,
                 several: bool = False) -> RunConfig:
    """Check one run for each of ``seeds`` (default: its own ``train.seed``); ``load`` gives its task
    and data (default: load them). ``several`` names the run in messages. Returns the run, resolved:
    a natural partition's number of clients comes from the data."""
    seeds = tuple(seeds) or (run.train.seed,)
    err = _Errors(run, several)
    for key, value, reason in run_violations(run):  # runs built in code did not go through the loader
        raise err(key, value, reason)
    if run.mode not in ENGINES:
        raise err("mode", run.mode, f"unknown mode; known: {', '.join(sorted(ENGINES))}")
    _task(run, err)  # the name and the options, for every mode
    _names(run, err)
    if run.train.dp.enabled:  # DP-SGD: a model Opacus can wrap, a reachable target epsilon
        from fedsim.engines.common import build_model
        from fedsim.privacy.dpsgd import check_dpsgd

        task, split = (load or _load)(run)
        try:
            check_dpsgd(run, task, build_model(task, split, run, torch.device("cpu")), population=len(split.train))
        except ConfigError as exc:
            raise err(exc.key, exc.value, exc.reason) from exc
        except UnsupportedError as exc:  # a model Opacus cannot train: named on the key that asked for DP
            dp = run.train.dp
            key, value = ("train.dp.epsilon", dp.epsilon) if dp.epsilon is not None else \
                ("train.dp.noise_multiplier", dp.noise_multiplier)
            raise err(key, value, str(exc)) from exc
    if run.mode not in _DATA_MODES:
        return run
    task, split = (load or _load)(run)
    n = len(split.train)  # type: ignore[arg-type]
    if run.mode == "ddp":
        task.require("data_parallel")
        world = run.ddp.nproc * run.ddp.nnodes
        if n < world:
            raise err("ddp.nproc", run.ddp.nproc,
                      f"{world} ranks ({run.ddp.nproc} x {run.ddp.nnodes} nodes) but the training split has {n} "
                      f"samples: rank {n} would get none")
    elif run.mode == "pipeline":
        _pipeline(run, task, split)
    elif run.mode == "federated":
        if run.federated.vectorise and run.federated.engine == "local":
            task.require("vectorise")
        run = _natural_clients(run, task, split, err)
        for seed in seeds:
            _federated(run_with_seed(run, seed), task, split, err)
    elif run.mode == "decentralized":
        for seed in seeds:
            _decentralized(run_with_seed(run, seed), split, err)
    elif run.mode == "parameter_server":
        for seed in seeds:
            _parameter_server(run_with_seed(run, seed), split, err)
    return run


def _natural_clients(run: RunConfig, task: Task, split: DatasetSplit, err: _Errors) -> RunConfig:
    """A partition the data fix (LEAF users, a client column, NaturalIdPartitioner) sets the number of
    clients: taken from the data when the file leaves it out; a different explicit number is an error."""
    fed = run.federated
    if not data_fixes_num_clients(fed):
        return run
    from fedsim.engines.federated.flower_app import client_population

    try:
        count = client_population(run, task, split).num_clients
    except FedsimError as exc:
        raise err("federated.partition", fed.partition, str(exc).split(": ", 1)[-1]) from exc
    if fed.num_clients not in (NUM_CLIENTS_FROM_DATA, count):
        raise err("federated.num_clients", fed.num_clients,
                  f"the data come with {count} clients (federated.partition = '{fed.partition}'); leave "
                  f"num_clients out or set it to {count}")
    resolved = dataclasses.replace(run, federated=dataclasses.replace(fed, num_clients=count))
    for key, value, reason in run_violations(resolved):  # cohort sizes against the real count
        raise err(key, value, reason)
    return resolved


class _Errors:
    """ConfigErrors for one run: its file, and its name when the experiment has several runs."""

    def __init__(self, run: RunConfig, several: bool) -> None:
        self.file = run.source
        self.where = f" (run '{run.name}')" if several else ""

    def __call__(self, key: str, value: Any, reason: str) -> ConfigError:
        return ConfigError(self.file, key, value, reason + self.where)


# ---- names and the task --------------------------------------------------------------------------
def _task(run: RunConfig, err: _Errors) -> Task:
    try:
        task_class(run.task)
    except FedsimError as exc:
        raise err("task", run.task, str(exc)) from exc
    try:
        return make_task(run.task, run.task_options, run.source)
    except ConfigError as exc:
        if exc.file == run.source:
            raise
        # Tasks name their own file "<task_options>" (or "<task_options.backbone_options>" for a
        # wrapped task's options): put the run's file and the key's full path instead.
        table = exc.file.strip("<>") if exc.file.startswith("<task_options") else "task_options"
        key = table + exc.key[len("task_options"):] if exc.key.startswith("task_options") else exc.key
        raise err(key, exc.value, exc.reason) from exc
    except UnsupportedError:
        raise
    except FedsimError as exc:
        raise err("task_options", run.task_options, str(exc)) from exc


def _names(run: RunConfig, err: _Errors) -> None:
    """Registry names: partitions, strategies and their options (topologies: per seed, with the data)."""
    from fedsim.data.partition import PARTITIONERS

    fed, gossip, ps = run.federated, run.decentralized, run.parameter_server
    for key, value, allowed in (("federated.partition", fed.partition, (*PARTITIONERS, "natural", "flwr")),
                                ("decentralized.partition", gossip.partition, PARTITIONERS),
                                ("parameter_server.shards", ps.shards, ("strided", *PARTITIONERS))):
        if value not in allowed:
            raise err(key, value, f"unknown partition; known: {', '.join(allowed)}")
    if run.mode == "federated":
        from strategies import StrategyContext, make_strategy

        try:
            make_strategy(fed.strategy, fed.strategy_options, StrategyContext(fed.num_clients), file=run.source)
        except ConfigError as exc:
            raise err(exc.key, exc.value, exc.reason) from exc


# ---- the data ------------------------------------------------------------------------------------
def _load(run: RunConfig) -> tuple[Task, DatasetSplit]:
    from fedsim.engines.common import load_task_data

    try:
        return load_task_data(run)
    except TypeError as exc:  # a loader keyword it does not take
        raise ConfigError(run.source, "data.options", run.data.options, str(exc)) from exc


def _partition_error(exc: FedsimError, section: str, count_key: str, count: int, n: int,
                     err: _Errors, value_of: Callable[[str], Any]) -> ConfigError:
    """A partitioner's FedsimError as a ConfigError on the key it is about."""
    text = str(exc)
    if "alpha" in text:
        key = f"{section}.alpha"
    elif "shards_per_client" in text:
        key = f"{section}.shards_per_client"
    elif "class labels" in text or "unknown partition" in text:
        key = f"{section}.partition" if section != "parameter_server" else "parameter_server.shards"
    else:
        key = count_key
    return err(key, value_of(key), f"{text} ({count} parts of a training split of {n} samples)")


def _empty(count_key: str, count: int, what: str, n: int, sizes: Sequence[int] | np.ndarray, seed: int,
           err: _Errors) -> None:
    empty = np.flatnonzero(np.asarray(sizes) == 0).tolist()  # vectorised: a million clients at once
    if not empty:
        return
    more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
    raise err(count_key, count,
              f"{count} {what}s but the training split has {n} samples: {what} {empty[0]}{more} would get no "
              f"training sample (train.seed = {seed})")


def _every_part_trains(section: str, count_key: str, what: str, run: RunConfig, n: int,
                       parts: Callable[[], Any], err: _Errors) -> None:
    """``parts()`` (the sizes of the engine's own parts of the training samples, for ``run``'s seed)
    leaves no part without a training sample; a partitioner's error becomes a ConfigError on the key it
    is about."""
    config = getattr(run, section)
    count, seed = getattr(config, count_key.split(".")[1]), run.train.seed
    value_of = lambda key: getattr(config, key.split(".")[1], None)  # noqa: E731
    if n < count:
        _empty(count_key, count, what, n, [1] * n + [0] * (count - n), seed, err)
    try:
        sizes = np.asarray(parts())
    except FedsimError as exc:
        raise _partition_error(exc, section, count_key, count, n, err, value_of) from exc
    _empty(count_key, count, what, n, sizes, seed, err)


def _federated(run: RunConfig, task: Task, split: DatasetSplit, err: _Errors) -> None:
    """Every client keeps at least one training sample, derived exactly as the ClientApp does; the
    device and availability traces read; a deadline some client can meet."""
    from fedsim.engines.federated.flower_app import client_population

    try:
        population: Any = client_population(run, task, split)
    except FedsimError:
        population = None  # the partitioner's error, raised below on the key it is about
    sizes = population.sizes() if hasattr(population, "sizes") else None
    if population is None or sizes is not None:  # generated clients have samples by construction
        _every_part_trains("federated", "federated.num_clients", "client", run, len(split.train),  # type: ignore[arg-type]
                           lambda: sizes if population is not None else client_population(run, task, split).sizes(),
                           err)
    _system(run, task, split, population, sizes, err)
    if run.federated.dp.enabled:
        _user_level_dp(run, task, split, err)


def _user_level_dp(run: RunConfig, task: Task, split: DatasetSplit, err: _Errors) -> None:
    """Flower's DP wrappers clip and noise every array of the model: running statistics and counters
    (BatchNorm's buffers) would be clipped as if they were weights, and an integer counter cannot take
    Gaussian noise. A target epsilon must be reachable."""
    from fedsim.engines.common import build_model
    from fedsim.engines.federated.rounds import num_sampled
    from fedsim.privacy.dp_fedavg import noise_for_epsilon

    model = build_model(task, split, run, torch.device("cpu"))
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        shown = ", ".join(buffers[:3]) + (f" and {len(buffers) - 3} more" if len(buffers) > 3 else "")
        raise err("federated.dp.clipping", run.federated.dp.clipping,
                  f"task '{run.task}' has buffers ({shown}: BatchNorm statistics) that DP clipping and noise would "
                  "treat as weights; use a task without BatchNorm (GroupNorm keeps no statistics)")
    fed, dp = run.federated, run.federated.dp
    if dp.epsilon is not None:
        k = num_sampled(fed.num_clients, fed.clients_per_round, fed.fraction_fit)
        delta = dp.delta if dp.delta is not None else 1.0 / fed.num_clients
        try:
            noise_for_epsilon(fed.num_clients, k, fed.rounds, delta, dp.epsilon)
        except ValueError as exc:
            raise err("federated.dp.epsilon", dp.epsilon, str(exc)) from exc


def _train_sizes(run: RunConfig, population: Any, sizes: np.ndarray | None) -> np.ndarray:
    """Every client's training samples, as :func:`fedsim.data.partition.split_holdout` leaves them (1 for
    generated clients: a lower bound)."""
    from fedsim.data.partition import held_out_count

    if sizes is None:
        return np.ones(run.federated.num_clients, dtype=np.int64)
    n = np.asarray(sizes, dtype=np.int64)
    fraction = 0.0 if getattr(population, "natural", False) else run.federated.client_test_fraction
    return n - held_out_count(n, fraction)


def _system(run: RunConfig, task: Task, split: DatasetSplit, population: Any, sizes: np.ndarray | None,
            err: _Errors) -> None:
    """The traces (their own file, line and value on error) and the deadline: the fastest client of the
    population must be able to download the model, train its least work and upload the reply in time."""
    from fedsim.engines.common import build_model
    from fedsim.engines.federated.clock import work_samples
    from fedsim.engines.federated.devices import Devices
    from fedsim.wire.array_codec import npy_size

    fed, system = run.federated, run.federated.system
    devices = Devices(system, fed.num_clients, run.train.seed, base_dir=".")
    if system.deadline_s <= 0:
        return
    model = build_model(task, split, run, torch.device("cpu"))
    size = sum(npy_size(str(v.dtype).replace("torch.", ""), tuple(v.shape)) for v in model.state_dict().values())
    compute, down, up = devices.profiles(np.arange(fed.num_clients))
    n = _train_sizes(run, population, sizes)
    units = 1 if system.late_work == "partial" else (fed.local_steps or fed.local_epochs)
    samples = work_samples(n, run.train.batch_size, units, fed.local_steps > 0)
    times = size * 8 / (down * 1e6) + samples / compute + size * 8 / (up * 1e6)
    fastest = int(np.argmin(times))
    if times[fastest] > system.deadline_s:
        work = f"{units} local step(s)" if fed.local_steps > 0 else f"{units} local epoch(s)"
        raise err("federated.system.deadline_s", system.deadline_s,
                  f"no client can meet it: the fastest of the {fed.num_clients} (client {fastest}) needs "
                  f"{times[fastest]:.4g} s to download the model ({size} bytes), train {work} on "
                  f"{int(samples[fastest])} samples and upload its reply")


def _decentralized(run: RunConfig, split: DatasetSplit, err: _Errors) -> None:
    """Every gossip node gets a training sample (the engine's own node partitions), and the
    topology exists for this seed (random_regular draws its graph from it)."""
    from fedsim.engines.gossip.decentralized import node_partitions
    from fedsim.engines.gossip.topology import topology_matrix

    cfg = run.decentralized
    try:
        topology_matrix(cfg.topology, cfg.nodes, degree=cfg.degree, seed=run.train.seed, weights=cfg.mixing)
    except FedsimError as exc:
        raise err("decentralized.topology", cfg.topology, str(exc)) from exc
    _every_part_trains("decentralized", "decentralized.nodes", "node", run, len(split.train),  # type: ignore[arg-type]
                       lambda: [len(part) for part in node_partitions(run, split)], err)


def _parameter_server(run: RunConfig, split: DatasetSplit, err: _Errors) -> None:
    """Every worker's fixed shard (``shards`` other than strided) holds a training sample, as the
    workers draw them (:func:`fedsim.engines.parameter_server.worker_indices`)."""
    from fedsim.engines.parameter_server import worker_indices

    cfg, labels = run.parameter_server, split.train.tensors[1]  # type: ignore[attr-defined]
    _every_part_trains("parameter_server", "parameter_server.workers", "worker", run, len(labels),
                       lambda: [] if cfg.shards == "strided" else
                       [len(worker_indices(run, labels, k, cfg.workers) or []) for k in range(cfg.workers)], err)


def _pipeline(run: RunConfig, task: Task, split: DatasetSplit) -> None:
    """The split against the task's model (built on the CPU), as the engine checks it before launching."""
    from fedsim.engines.common import build_model
    from fedsim.engines.parallel.pipeline_split import plan_split

    plan_split(build_model(task, split, run, torch.device("cpu")), task, run)

"""Experiments as TOML files loaded into frozen dataclasses.

An experiment file holds experiment keys (``name``, ``description``, ``seeds``, ``runs``,
``report``) and, at top level, defaults for every run (any :class:`RunConfig` field). Each
``[[runs]]`` table overrides those defaults. Unknown keys, wrong types and missing files raise
:class:`ConfigError` naming the file, the key and the value (the CLI exits 2).
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from fedsim.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class DataConfig:
    """Which data set and how it is split."""

    name: str = ""
    """Registered dataset name or ``module:attribute``; empty = the task's default dataset."""
    data_dir: str = "data"
    """Folder holding torchvision-format files (mnist, fashion_mnist, cifar10)."""
    test_fraction: float = 0.2
    """Fraction held out as the test split (stratified) for data sets without an official split."""
    split_seed: int = 0
    """Seed of the train/test split; fixed so every training seed sees the same test set."""
    normalise: bool = True
    """Standardise inputs with train-split statistics."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the loader (e.g. synthetic ``n_samples``, ``shape``)."""


@dataclass(frozen=True)
class TrainConfig:
    """The shared training loop's settings (every engine reads these)."""

    epochs: int = 1
    """Passes over the (local) training data."""
    batch_size: int = 32
    """Batch size (per rank under DDP, per client under federated)."""
    optimizer: Literal["sgd", "adam", "adagrad"] = "sgd"
    """Optimizer from torch.optim."""
    lr: float = 0.05
    """Learning rate."""
    momentum: float = 0.0
    """SGD momentum."""
    weight_decay: float = 0.0
    """L2 penalty."""
    schedule: Literal["constant", "cosine", "step"] = "constant"
    """Learning-rate schedule, stepped once per epoch."""
    step_size: int = 1
    """Epochs between decays for ``schedule = "step"``."""
    gamma: float = 0.5
    """Decay factor for ``schedule = "step"``."""
    max_steps: int = 0
    """If > 0, stop each epoch after this many steps (few-step equivalence tests, smoke runs)."""
    seed: int = 0
    """Seed of model init, shuffling, dropout and masks; same seed -> identical metrics on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` takes CUDA when available."""
    dtype: Literal["float32", "float64"] = "float32"
    """Parameter dtype; float64 where exactness is the claim."""
    threads: int = 0
    """If > 0, ``torch.set_num_threads`` (1 in equivalence tests)."""
    shuffle: bool = True
    """Shuffle the training data each epoch (order keyed by seed and epoch)."""
    checkpoint: bool = True
    """Write a checkpoint after each epoch (atomically)."""
    eval_batch_size: int = 512
    """Batch size for evaluation."""
    progress: bool = True
    """Show a rich progress bar."""


@dataclass(frozen=True)
class DDPConfig:
    """Data-parallel training (torchrun or Ray Train)."""

    nproc: int = 2
    """Processes per node (one per GPU, or per CPU worker)."""
    nnodes: int = 1
    """Nodes in the job."""
    launcher: Literal["torchrun", "ray"] = "torchrun"
    """Who starts the workers when ``fedsim run`` is not already under torchrun."""
    sync_bn: bool = False
    """BatchNorm statistics over the global batch."""
    use_gpu: bool = False
    """Ask for one GPU per worker (nccl)."""
    max_restarts: int = 0
    """torchrun ``--max-restarts`` / Ray Train ``FailureConfig(max_failures)``."""
    rdzv_endpoint: str = ""
    """``HOST:PORT`` for multi-node c10d rendezvous; empty = standalone."""
    ray_address: str = ""
    """Existing Ray cluster address; empty = a local Ray."""
    cpus_per_worker: float = 1.0
    """Ray resources per worker."""
    timeout_s: int = 900
    """Wall-clock limit of a launched job."""
    fail_at_step: int = -1
    """Fault injection: rank ``fail_rank`` kills itself at this global step on the first attempt."""
    fail_rank: int = 1
    """Which rank the injected fault kills."""
    fault_marker: str = ""
    """Fault tests: instead of killing itself at ``fail_at_step``, rank ``fail_rank`` writes
    ``{rank, pid, node_ip, step}`` to this file and waits (at most 120 s) to be killed from outside;
    with ``fail_rank = -1`` every rank does so, each to ``<fault_marker>.rank<r>``."""


@dataclass(frozen=True)
class PipelineConfig:
    """Pipeline model-parallel training with torch.distributed.pipelining."""

    stages: int = 2
    """Pipeline stages S (ranks per pipeline)."""
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "gpipe"
    """Pipeline schedule."""
    microbatches: int = 4
    """Microbatches per batch."""
    split: list[str] = field(default_factory=list)
    """Split points (child-module names where a new stage starts); empty = task default; ["balanced"] = by params."""
    virtual_stages: int = 1
    """Stages per rank for interleaved schedules."""
    dp: int = 1
    """Data-parallel replicas of the pipeline (2-D parallelism: world = dp x stages)."""
    timeout_s: int = 900
    """Wall-clock limit of a launched job."""


@dataclass(frozen=True)
class FederatedConfig:
    """Federated rounds (Flower ServerApp/ClientApp and strategies)."""

    engine: Literal["flower", "local"] = "flower"
    """``flower`` = Flower's run_simulation; ``local`` = fedsim's in-process Grid."""
    num_clients: int = 10
    """Number of clients (partitions / SuperNodes)."""
    clients_per_round: int = 0
    """Clients sampled per round; 0 = use ``fraction_fit``."""
    fraction_fit: float = 1.0
    """Fraction of clients sampled per round when ``clients_per_round`` is 0."""
    rounds: int = 5
    """Server rounds."""
    local_epochs: int = 1
    """Local epochs per round (ignored when ``local_steps`` > 0)."""
    local_steps: int = 0
    """If > 0, local SGD steps per round instead of epochs."""
    strategy: str = "fedavg"
    """Strategy name from the ``strategies`` registry."""
    strategy_options: dict[str, Any] = field(default_factory=dict)
    """Strategy keyword arguments (e.g. ``proximal_mu``, ``server_learning_rate``)."""
    partition: str = "iid"
    """iid | dirichlet | shards | quantity_skew."""
    alpha: float = 1.0
    """Dirichlet concentration (smaller = more skew)."""
    shards_per_client: int = 2
    """Classes per client for ``shards``."""
    client_test_fraction: float = 0.2
    """Fraction of each client's partition held out for per-client accuracy."""
    dropout_fraction: float = 0.0
    """Seeded fraction of sampled clients that fail each round (simulated dropouts)."""
    straggler_fraction: float = 0.0
    """Seeded fraction of sampled clients dropped as too slow each round."""
    num_cpus: float = 1.0
    """Flower client resources: CPUs per simulated client."""
    num_gpus: float = 0.0
    """Flower client resources: GPUs per simulated client."""
    workers: int = 0
    """Local engine: worker processes (0 = sequential in-process)."""
    vectorise: bool = False
    """Local engine: train sampled clients at once with torch.func (tasks that allow it)."""
    reply_timeout_s: float = 600.0
    """Seconds the server waits for a round's replies; a client silent that long counts as failed."""
    ray_address: str = ""
    """engine = "flower": attach the simulation to this Ray cluster (``fedsim cluster up --ray``); empty = a local Ray."""


@dataclass(frozen=True)
class ParameterServerConfig:
    """Parameter server on Ray actors."""

    variant: Literal["sync", "async"] = "sync"
    """sync = average all W gradients per step; async = apply each on arrival."""
    workers: int = 2
    """Worker actors W."""
    steps: int = 50
    """Server steps (sync) or total gradient applications (async); 0 = ``train.epochs`` passes over the data."""
    ray_address: str = ""
    """Existing Ray cluster; empty = local Ray."""
    cpus_per_worker: float = 1.0
    """Ray resources per worker."""
    gpus_per_worker: float = 0.0
    """Ray GPUs per worker (gradients are computed on the worker's device)."""
    num_cpus: int = 0
    """CPUs of the local Ray the engine starts; 0 = every core (ignored with ``ray_address``)."""
    shards: str = "strided"
    """strided = worker k takes every W-th sample of each epoch's shared order (DistributedSampler; sync
    equals large-batch central); or a partitioner (iid, dirichlet, shards, quantity_skew): fixed shards."""
    alpha: float = 1.0
    """Dirichlet concentration for ``shards = "dirichlet"``."""


@dataclass(frozen=True)
class DecentralizedConfig:
    """Serverless gossip averaging (D-PSGD)."""

    topology: str = "ring"
    """ring | torus | random_regular | complete | exponential."""
    degree: int = 3
    """Degree d of ``random_regular``."""
    nodes: int = 8
    """Number of nodes."""
    rounds: int = 10
    """Gossip rounds."""
    local_steps: int = 1
    """Local SGD steps between averaging steps (0 = one pass over the node's partition)."""
    backend: Literal["inprocess", "torch_distributed"] = "inprocess"
    """Simulated nodes in one process, or one torch.distributed process per node."""
    partition: str = "iid"
    """Partitioner (as in federated)."""
    alpha: float = 1.0
    """Dirichlet concentration."""
    mixing: Literal["metropolis", "uniform"] = "metropolis"
    """Gossip weights: Metropolis-Hastings or uniform (max-degree); both doubly stochastic."""
    timeout_s: int = 900
    """Wall-clock limit of the torchrun job (``backend = "torch_distributed"``)."""


@dataclass(frozen=True)
class RunConfig:
    """One training run: a task, a mode, and the settings of each part."""

    name: str = ""
    """Run name (folder under results/<experiment>/)."""
    task: str = "bn_cnn"
    """Task name from ``fedsim list`` or ``module:attribute``."""
    mode: str = "central"
    """central | ddp | pipeline | federated | parameter_server | decentralized."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Options of the task (validated against the task's Options dataclass)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    parameter_server: ParameterServerConfig = field(default_factory=ParameterServerConfig)
    decentralized: DecentralizedConfig = field(default_factory=DecentralizedConfig)
    source: str = "<code>"
    """File this run came from (filled in by the loader; error messages name it)."""


@dataclass(frozen=True)
class Experiment:
    """A named list of runs, each repeated for every seed."""

    name: str
    runs: tuple[RunConfig, ...]
    description: str = ""
    seeds: tuple[int, ...] = ()
    report: dict[str, Any] = field(default_factory=dict)
    source: str = "<code>"
    path: str = ""


EXPERIMENT_KEYS = {"name", "description", "seeds", "runs", "report"}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, file: str, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (int->float, list->tuple...)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(file, key, value, f"expected a table ({_type_name(tp)})")
        return from_dict(tp, value, file, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(file, key, value, f"expected one of {', '.join(repr(a) for a in args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, file, key)
            except ConfigError as exc:
                errors.append(exc.reason)
        raise ConfigError(file, key, value, " or ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(file, key, value, f"expected a list ({_type_name(tp)})")
        item_type = args[0] if args else Any
        items = [_coerce(item_type, v, file, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(file, key, value, "expected a table")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(file, key, value, "expected a number (float)")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(file, key, value, "expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(file, key, value, "expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(file, key, value, "expected a string")
        return value
    raise TypeError(f"config annotation {tp!r} at {key} is not supported")  # programming error


def from_dict(cls: type[T], data: dict[str, Any], file: str = "<code>", prefix: str = "") -> T:
    """Build frozen dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(file, dotted, value, f"unknown key; allowed keys: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(hints[key], value, file, dotted)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict view of a config dataclass (for summaries and for shipping to workers)."""
    return dataclasses.asdict(obj)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge nested tables; ``override`` wins. Neither input is modified."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in ("task_options",):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str, file: str = "--set") -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value) with value read as a TOML value (bare words = strings)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(file, text, text, "expected KEY=VALUE (e.g. train.epochs=2)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _set_path(table: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        table = table.setdefault(part, {})
    table[path[-1]] = value


def experiment_from_dict(
    raw: dict[str, Any], file: str = "<code>", overrides: list[str] | tuple[str, ...] = (), default_name: str = ""
) -> Experiment:
    """Validate a parsed experiment table (see module docstring) and apply ``--set`` overrides."""
    raw = copy.deepcopy(raw)
    run_overrides: dict[str, Any] = {}
    for text in overrides:
        path, value = parse_override(text)
        _set_path(raw if path[0] in EXPERIMENT_KEYS else run_overrides, path, value)
    defaults = {k: v for k, v in raw.items() if k not in EXPERIMENT_KEYS}
    from_dict(RunConfig, defaults, file)  # top-level mistakes are reported under their own key
    run_tables = raw.get("runs", [{}])
    if not isinstance(run_tables, list) or not all(isinstance(r, dict) for r in run_tables):
        raise ConfigError(file, "runs", run_tables, "expected an array of tables ([[runs]])")
    name = raw.get("name", default_name or "experiment")
    runs = []
    for index, table in enumerate(run_tables):
        merged = deep_merge(deep_merge(defaults, table), run_overrides)
        merged.setdefault("name", table.get("name") or (name if len(run_tables) == 1 else f"run{index}"))
        merged["source"] = file
        runs.append(from_dict(RunConfig, merged, file, f"runs[{index}]" if "runs" in raw else ""))
    seeds = _coerce(tuple[int, ...], raw.get("seeds", []), file, "seeds")
    for key in ("name", "description"):
        if key in raw and not isinstance(raw[key], str):
            raise ConfigError(file, key, raw[key], "expected a string")
    report = _coerce(dict[str, Any], raw.get("report", {}), file, "report")
    run_names = [r.name for r in runs]
    duplicates = sorted({n for n in run_names if run_names.count(n) > 1})
    if duplicates:
        raise ConfigError(file, "runs.name", duplicates[0], "run names must be unique")
    return Experiment(name=name, runs=tuple(runs), description=raw.get("description", ""), seeds=seeds,
                      report=report, source=file)


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Read and validate an experiment TOML file."""
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise ConfigError(file, "<file>", file, "file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "<syntax>", str(exc), "not valid TOML") from exc
    experiment = experiment_from_dict(raw, file, overrides, default_name=path.stem)
    return dataclasses.replace(experiment, path=str(path.resolve()))


def run_with_seed(run: RunConfig, seed: int) -> RunConfig:
    """The same run with ``train.seed`` replaced (experiments repeated over seeds)."""
    return dataclasses.replace(run, train=dataclasses.replace(run.train, seed=seed))

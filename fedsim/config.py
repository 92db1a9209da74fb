"""Experiments as TOML files loaded into frozen dataclasses.

An experiment file holds experiment keys (``name``, ``description``, ``seeds``, ``runs``,
``report``) and, at top level, defaults for every run (any :class:`RunConfig` field). Each
``[[runs]]`` table overrides those defaults. Unknown keys, wrong types and missing files raise
:class:`ConfigError` naming the file, the key and the value (the CLI exits 2).

Every run is then checked against the range and cross-field rules of :func:`run_violations` (counts
>= 1, fractions in [0, 1], finite positive learning rates, ``clients_per_round <= num_clients``, ...)
before anything runs; the rules that need the task or the data live in :mod:`fedsim.validation`.
Renamed keys (:data:`RENAMED_KEYS`) are still read, with a one-line warning on stderr.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import tomllib
import types
import typing
from collections.abc import Iterator
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
class DPSGDConfig:
    """Differentially private SGD (Abadi et al. 2016) with Opacus: per-sample gradients clipped to
    ``max_grad_norm``, Gaussian noise of ``noise_multiplier * max_grad_norm``, Poisson-sampled batches of
    expected size ``train.batch_size`` (``train.dp``; central and DDP runs). Off unless ``epsilon`` or
    ``noise_multiplier`` is given (exactly one of them)."""

    epsilon: float | None = None
    """Target epsilon for the whole run; the noise multiplier is resolved from it (the accountant below)
    before training starts."""
    noise_multiplier: float | None = None
    """sigma, instead of a target epsilon; epsilon is then what the accountant reports."""
    delta: float | None = None
    """delta of (epsilon, delta); default 1 / (training samples)."""
    max_grad_norm: float = 1.0
    """Per-sample gradient clipping bound C."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Opacus' accountant: Renyi DP (Mironov 2017) or the PRV accountant (Gopi et al. 2021)."""

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None or self.noise_multiplier is not None


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
    dp: DPSGDConfig = field(default_factory=DPSGDConfig)
    """Differentially private SGD with Opacus (``[train.dp]``; central and DDP runs)."""


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
class SystemConfig:
    """Devices, their availability and the server's waiting policy on fedsim's virtual clock.

    Every federated run keeps a simulated clock: a client's time in a round is download(model bytes) +
    compute(samples / compute speed) + upload(reply bytes), from its device profile; the round ends when
    the server stops waiting (all replies, the K-th of an over-selected cohort, or a deadline). The clock
    never reads the host's time: same seed, same clock. Defaults (log-normal spreads of 10x in compute and
    100x in bandwidth between the 5th and 95th percentile, after FedScale's device and network traces;
    every client always available; wait for every reply) leave which clients train and what they compute
    unchanged, so results do not move; the clock only measures them.
    """

    compute_sps_median: float = 100.0
    """Median training speed of a client device, samples per second (log-normal across clients)."""
    compute_sps_sigma: float = 0.7
    """Log-normal sigma of compute speed (0.7: the 95th percentile device is 10x the 5th)."""
    down_mbps_median: float = 20.0
    """Median download bandwidth, Mbit/s (log-normal)."""
    down_mbps_sigma: float = 1.4
    """Log-normal sigma of download bandwidth (1.4: 100x between the 5th and 95th percentile)."""
    up_mbps_median: float = 5.0
    """Median upload bandwidth, Mbit/s (log-normal)."""
    up_mbps_sigma: float = 1.4
    """Log-normal sigma of upload bandwidth."""
    device_trace: str = ""
    """CSV of device profiles, header ``client_id,compute_sps,down_mbps,up_mbps``; the clients it lists take
    its values, the others draw from the distributions above. Empty = distributions only."""
    availability: Literal["always", "daily"] = "always"
    """``always``: every client can be sampled at any time. ``daily``: each client is online one window a
    day (charging, on Wi-Fi), starting at a seeded hour around ``online_start_hour`` and lasting a
    log-normal number of hours (median ``online_hours_median``)."""
    online_start_hour: float = 22.0
    """``daily``: mean hour (0-24) at which clients come online (night: phones charge)."""
    online_start_hours_std: float = 3.0
    """``daily``: standard deviation of the start hour, hours (normal, wrapped around the day)."""
    online_hours_median: float = 6.0
    """``daily``: median length of a client's daily online window, hours (log-normal)."""
    online_hours_sigma: float = 0.5
    """``daily``: log-normal sigma of the window length."""
    availability_trace: str = ""
    """CSV of online intervals, header ``client_id,start_s,end_s`` (seconds of a simulated day, 0-86400,
    repeating every day; several rows per client allowed). Listed clients are online only in their
    intervals, the others follow ``availability``. Empty = none."""
    over_selection: float = 0.0
    """Over-selection o: sample ceil((1 + o) K) available clients, aggregate the first K to reply (0 = off)."""
    deadline_s: float = 0.0
    """Round deadline, simulated seconds: replies later than this are late (``late_work``); 0 = no deadline."""
    late_work: Literal["drop", "partial"] = "drop"
    """With a deadline: ``drop`` = late replies are discarded; ``partial`` = a client that would be late
    trains the local epochs (steps) that fit before the deadline, at least one, and is aggregated
    (FedProx-style partial work); one that cannot fit one is dropped."""
    server: Literal["sync", "fedbuff"] = "sync"
    """``sync``: rounds (the strategy's configure/aggregate). ``fedbuff``: asynchronous buffered
    aggregation (Nguyen et al., AISTATS 2022): ``clients_per_round`` clients train concurrently on the
    clock, the server updates the model every ``buffer_size`` arrivals; ``rounds`` counts updates."""
    buffer_size: int = 10
    """FedBuff: arrivals per server update (M); at most ``clients_per_round`` (the concurrency)."""
    staleness_exponent: float = 0.5
    """FedBuff: an update computed on a model ``tau`` versions old is weighted ``(1 + tau) ** -a``
    (a = 0.5: FedBuff's 1/sqrt(1 + tau)); 0 = no staleness weighting."""
    server_learning_rate: float = 1.0
    """FedBuff: the server's step size on the buffered mean update (eta_g)."""
    buffer_weights: Literal["uniform", "examples"] = "uniform"
    """FedBuff: weight updates equally (the paper's 1/M) or by their clients' example counts (FedAvg's)."""


@dataclass(frozen=True)
class FederatedDPConfig:
    """User-level differential privacy for FedAvg-family runs (``federated.dp``): each client's model
    update is clipped to L2 norm ``clipping_norm`` and the server adds Gaussian noise of std
    ``noise_multiplier * clipping_norm / K`` to the mean of the K sampled updates (Flower's DP strategy
    wrappers; McMahan et al. 2018's DP-FedAvg with uniform weights and a fixed denominator). Privacy is
    accounted for K clients sampled without replacement from N each round (replace-one neighbours, RDP)."""

    clipping: Literal["off", "server", "client", "adaptive"] = "off"
    """``server``: the server clips each update (``DifferentialPrivacyServerSideFixedClipping``); ``client``:
    each client clips its own (``DifferentialPrivacyClientSideFixedClipping`` + ``fixedclipping_mod``);
    ``adaptive``: server-side clipping whose bound tracks a quantile of the update norms (Andrew et al. 2021,
    ``DifferentialPrivacyServerSideAdaptiveClipping``); ``off``: no DP."""
    clipping_norm: float = 1.0
    """The clipping bound C (the initial bound for ``adaptive``)."""
    noise_multiplier: float | None = None
    """sigma; give it or a target ``epsilon``, not both."""
    epsilon: float | None = None
    """Target epsilon after ``federated.rounds`` rounds: sigma is resolved from it before the run starts."""
    delta: float | None = None
    """delta of (epsilon, delta); default 1 / num_clients."""
    target_quantile: float = 0.5
    """``adaptive``: the fraction of updates the bound should leave unclipped."""
    clip_learning_rate: float = 0.2
    """``adaptive``: the geometric step size of the bound's update."""
    clipped_count_stddev: float | None = None
    """``adaptive``: noise std of the count of clipped updates (default K / 20, Flower's); it spends part of the
    budget, so the update noise is raised to keep the total noise multiplier (Andrew et al. 2021, Thm 1),
    which needs noise_multiplier < 2 x clipped_count_stddev."""

    @property
    def enabled(self) -> bool:
        return self.clipping != "off"


@dataclass(frozen=True)
class FederatedConfig:
    """Federated rounds (Flower ServerApp/ClientApp and strategies)."""

    engine: Literal["flower", "local"] = "local"
    """``local`` (default) = fedsim's in-process Grid: the same ServerApp/ClientApp and strategies with
    no Ray, proven equal to Flower's simulation (tests/test_local_grid_equality.py); ``flower`` =
    Flower's own ``run_simulation`` (Ray actors, ``cpus_per_client`` / ``gpus_per_client`` each)."""
    num_clients: int = 10
    """Number of clients (partitions / SuperNodes). With ``partition = "natural"`` (and Flower Datasets'
    ``NaturalIdPartitioner``) the data fix it: leave it out (it is read from the data before the run
    starts) or give the same number."""
    clients_per_round: int = 0
    """Clients sampled per round; 0 = use ``fraction_fit``."""
    fraction_fit: float = 1.0
    """Fraction of clients sampled per round when ``clients_per_round`` is 0."""
    rounds: int = 5
    """Server rounds."""
    local_epochs: int = 1
    """Local epochs (passes over the client's training samples) per round; ignored when ``local_steps`` > 0."""
    local_steps: int = 0
    """Local SGD steps per round; 0 = count whole passes instead (``local_epochs`` of them), as
    ``decentralized.local_steps``, where 0 is one pass."""
    strategy: str = "fedavg"
    """Strategy name from the ``strategies`` registry."""
    strategy_options: dict[str, Any] = field(default_factory=dict)
    """Strategy keyword arguments (e.g. ``proximal_mu``, ``server_learning_rate``)."""
    partition: str = "iid"
    """iid | dirichlet | shards | quantity_skew (fedsim's seeded partitioners); natural (the data's own
    clients: LEAF users, an ``hf`` client column); flwr (a Flower Datasets partitioner, below)."""
    partitioner: str = ""
    """``partition = "flwr"``: the class in ``flwr_datasets.partitioner`` (e.g. "DirichletPartitioner",
    "IidPartitioner", "NaturalIdPartitioner"); ``num_partitions`` is ``num_clients``."""
    partitioner_options: dict[str, Any] = field(default_factory=dict)
    """``partition = "flwr"``: the partitioner's keyword arguments (e.g. ``{ alpha = 0.5,
    partition_by = "label" }``); ``seed`` defaults to ``train.seed``."""
    alpha: float = 1.0
    """Dirichlet concentration (smaller = more skew)."""
    shards_per_client: int = 2
    """Classes per client for ``shards``."""
    client_test_fraction: float = 0.2
    """Fraction of each client's partition held out for per-client accuracy."""
    evaluate_clients: int | float = 1000
    """Clients that score the global model on their own held-out data: a count (an integer), or a
    fraction of the population (a float in (0, 1]); all clients when it covers them, else a seeded
    sample (keyed by seed and round). The default keeps every client of small populations and caps
    large ones at 1000."""
    evaluate_clients_every: int = 0
    """Also evaluate such a cohort every k rounds (0 = only at the end)."""
    client_metrics_file: bool = False
    """Write each evaluated client's metrics to ``client_metrics.jsonl.gz`` (the summary keeps their
    distribution: mean, quantiles, worst 10 %)."""
    dropout_fraction: float = 0.0
    """Seeded fraction of sampled clients that fail each round (simulated dropouts)."""
    straggler_fraction: float = 0.0
    """Seeded fraction of sampled clients that are stragglers each round (what they do: ``straggler_work``)."""
    straggler_work: Literal["drop", "partial"] = "drop"
    """What a straggler contributes. ``drop`` = it trains but its reply comes too late and is discarded
    (FedAvg in FedProx's experiments). ``partial`` = it trains a seeded random number of local epochs,
    uniform in ``[1, local_epochs]`` and keyed by (seed, round, partition) (``[1, local_steps]`` steps when
    ``local_steps`` > 0), and its reply is aggregated like any other (FedProx's systems heterogeneity,
    Li et al. 2020, section 5.2)."""
    cpus_per_client: float = 1.0
    """CPUs per simulated client (Flower's ``client_resources``; also the client's torch threads when
    ``train.threads`` is 0). Was ``num_cpus``."""
    gpus_per_client: float = 0.0
    """GPUs per simulated client (Flower's ``client_resources``). Was ``num_gpus``."""
    worker_processes: int = 0
    """Local engine: client worker processes (0 = sequential in this process). Was ``workers``."""
    vectorise: bool = False
    """Local engine: train sampled clients at once with torch.func (tasks that allow it)."""
    reply_timeout_s: float = 600.0
    """Seconds the server waits for a round's replies; a client silent that long counts as failed."""
    ray_address: str = ""
    """engine = "flower": attach the simulation to this Ray cluster (``fedsim cluster up --ray``); empty = a local Ray."""
    system: SystemConfig = field(default_factory=SystemConfig)
    """Device profiles, availability, deadlines, over-selection and asynchronous aggregation on the
    virtual clock (``[federated.system]``)."""
    dp: FederatedDPConfig = field(default_factory=FederatedDPConfig)
    """User-level differential privacy (``[federated.dp]``)."""
    secure_aggregation: bool = False
    """Aggregate with Flower's SecAgg+ (the server sees only the sum of the clients' updates)."""


@dataclass(frozen=True)
class ParameterServerConfig:
    """Parameter server on Ray actors."""

    variant: Literal["sync", "async"] = "sync"
    """sync = average all W gradients per step; async = apply each on arrival."""
    workers: int = 2
    """Worker actors W (Ray actors, one gradient each per step)."""
    steps: int = 50
    """Server steps (sync) or total gradient applications (async); 0 = ``train.epochs`` passes over the data."""
    ray_address: str = ""
    """Existing Ray cluster; empty = local Ray."""
    cpus_per_worker: float = 1.0
    """Ray resources per worker."""
    gpus_per_worker: float = 0.0
    """Ray GPUs per worker (gradients are computed on the worker's device)."""
    ray_num_cpus: int = 0
    """Total CPUs of the local Ray the engine starts; 0 = every core (ignored with ``ray_address``).
    Was ``num_cpus``."""
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
    """Local SGD steps between averaging steps; 0 = count whole passes instead (one pass over the
    node's partition per round), as ``federated.local_steps``."""
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


# ---- renamed keys -------------------------------------------------------------------------------
RENAMED_KEYS: dict[type, dict[str, tuple[str, str]]] = {
    FederatedConfig: {
        "num_cpus": ("cpus_per_client", "CPUs of each simulated client, not of the whole run"),
        "num_gpus": ("gpus_per_client", "GPUs of each simulated client"),
        "workers": ("worker_processes", "client processes of the local engine; parameter_server.workers are Ray actors"),
    },
    ParameterServerConfig: {
        "num_cpus": ("ray_num_cpus", "total CPUs of the local Ray; federated.cpus_per_client is per client"),
    },
}
"""Section -> old key -> (new key, what the new name says). The old names are still read: from
experiment files, dicts and ``--set`` with a warning (:func:`experiment_from_dict`), silently from
code and from old ``summary.json`` files (:func:`from_dict`)."""


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def rename_deprecated(cls: type, table: dict[str, Any], file: str = "<code>", prefix: str = "",
                      warn: bool = False) -> dict[str, Any]:
    """A copy of ``table`` (a ``cls`` table, sub-tables included) with renamed keys under their new names.

    With ``warn``, each old name prints one line on stderr (``DeprecationWarning`` is hidden by default
    and ``warnings.warn`` takes two lines). Old and new name together are a :class:`ConfigError`.
    """
    if not dataclasses.is_dataclass(cls) or not isinstance(table, dict):
        return table
    hints = typing.get_type_hints(cls)
    renames = RENAMED_KEYS.get(cls, {})
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in renames:
            new, meaning = renames[key]
            if new in table:
                raise ConfigError(file, _join(prefix, key), value,
                                  f"renamed to '{_join(prefix, new)}', which is also given; keep only the new name")
            if warn:
                print(f"fedsim: warning: {file}: key '{_join(prefix, key)}' is deprecated; use "
                      f"'{_join(prefix, new)}' ({meaning})", file=sys.stderr)
            key = new
        tp = hints.get(key)
        if tp is not None and dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = rename_deprecated(tp, value, file, _join(prefix, key), warn)
        out[key] = value
    return out


def from_dict(cls: type[T], data: dict[str, Any], file: str = "<code>", prefix: str = "") -> T:
    """Build frozen dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError.

    Renamed keys (:data:`RENAMED_KEYS`) are read under their new names without a warning (code and
    old ``summary.json`` files); :func:`experiment_from_dict` warns about them in experiment files.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    data = rename_deprecated(cls, data, file, prefix) if cls in RENAMED_KEYS else data
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(file, dotted, value, f"unknown key; allowed keys: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(hints[key], value, file, dotted)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict view of a config dataclass (for summaries and for shipping to workers)."""
    return dataclasses.asdict(obj)


# ---- rules: ranges and cross-field checks, run before anything starts -----------------------------
Violation = tuple[str, Any, str]
"""(dotted key, value, reason) of a broken rule."""

_INT_MIN: dict[str, int] = {
    "train.epochs": 0, "train.batch_size": 1, "train.eval_batch_size": 1, "train.step_size": 1,
    "train.max_steps": 0, "train.seed": 0, "train.threads": 0,
    "data.split_seed": 0,
    "ddp.nproc": 1, "ddp.nnodes": 1, "ddp.max_restarts": 0, "ddp.timeout_s": 1, "ddp.fail_at_step": -1,
    "ddp.fail_rank": -1,
    "pipeline.stages": 1, "pipeline.microbatches": 1, "pipeline.virtual_stages": 1, "pipeline.dp": 1,
    "pipeline.timeout_s": 1,
    "federated.num_clients": 1, "federated.clients_per_round": 0, "federated.rounds": 1,
    "federated.local_epochs": 0, "federated.local_steps": 0, "federated.shards_per_client": 1,
    "federated.worker_processes": 0, "federated.evaluate_clients_every": 0, "federated.system.buffer_size": 1,
    "parameter_server.workers": 1, "parameter_server.steps": 0, "parameter_server.ray_num_cpus": 0,
    "decentralized.degree": 1, "decentralized.nodes": 1, "decentralized.rounds": 1,
    "decentralized.local_steps": 0, "decentralized.timeout_s": 1,
}
"""Integer keys -> smallest allowed value (``train.epochs = 0``: an evaluate-only run; -1: off)."""

_OPEN, _CLOSED = False, True
_FLOAT_RANGE: dict[str, tuple[float, bool, float, bool]] = {
    "train.lr": (0.0, _OPEN, math.inf, _OPEN),
    "train.momentum": (0.0, _CLOSED, 1.0, _OPEN),
    "train.weight_decay": (0.0, _CLOSED, math.inf, _OPEN),
    "train.gamma": (0.0, _OPEN, math.inf, _OPEN),
    "data.test_fraction": (0.0, _CLOSED, 1.0, _OPEN),
    "ddp.cpus_per_worker": (0.0, _CLOSED, math.inf, _OPEN),
    "federated.fraction_fit": (0.0, _OPEN, 1.0, _CLOSED),
    "federated.alpha": (0.0, _OPEN, math.inf, _OPEN),
    "federated.client_test_fraction": (0.0, _CLOSED, 1.0, _OPEN),
    "federated.dropout_fraction": (0.0, _CLOSED, 1.0, _CLOSED),
    "federated.straggler_fraction": (0.0, _CLOSED, 1.0, _CLOSED),
    "federated.cpus_per_client": (0.0, _OPEN, math.inf, _OPEN),
    "federated.gpus_per_client": (0.0, _CLOSED, math.inf, _OPEN),
    "federated.reply_timeout_s": (0.0, _OPEN, math.inf, _OPEN),
    "federated.system.compute_sps_median": (0.0, _OPEN, math.inf, _OPEN),
    "federated.system.compute_sps_sigma": (0.0, _CLOSED, math.inf, _OPEN),
    "federated.system.down_mbps_median": (0.0, _OPEN, math.inf, _OPEN),
    "federated.system.down_mbps_sigma": (0.0, _CLOSED, math.inf, _OPEN),
    "federated.system.up_mbps_median": (0.0, _OPEN, math.inf, _OPEN),
    "federated.system.up_mbps_sigma": (0.0, _CLOSED, math.inf, _OPEN),
    "federated.system.online_start_hour": (0.0, _CLOSED, 24.0, _OPEN),
    "federated.system.online_start_hours_std": (0.0, _CLOSED, math.inf, _OPEN),
    "federated.system.online_hours_median": (0.0, _OPEN, math.inf, _OPEN),
    "federated.system.online_hours_sigma": (0.0, _CLOSED, math.inf, _OPEN),
    "federated.system.over_selection": (0.0, _CLOSED, math.inf, _OPEN),
    "federated.system.deadline_s": (0.0, _CLOSED, math.inf, _OPEN),
    "federated.system.staleness_exponent": (0.0, _CLOSED, math.inf, _OPEN),
    "federated.system.server_learning_rate": (0.0, _OPEN, math.inf, _OPEN),
    "federated.dp.clipping_norm": (0.0, _OPEN, math.inf, _OPEN),
    "federated.dp.target_quantile": (0.0, _CLOSED, 1.0, _CLOSED),
    "federated.dp.clip_learning_rate": (0.0, _OPEN, math.inf, _OPEN),
    "train.dp.max_grad_norm": (0.0, _OPEN, math.inf, _OPEN),
    "parameter_server.cpus_per_worker": (0.0, _CLOSED, math.inf, _OPEN),
    "parameter_server.gpus_per_worker": (0.0, _CLOSED, math.inf, _OPEN),
    "parameter_server.alpha": (0.0, _OPEN, math.inf, _OPEN),
    "decentralized.alpha": (0.0, _OPEN, math.inf, _OPEN),
}
"""Float keys -> (low, low included, high, high included); every float must also be finite."""

_STRATEGY_OPTION_RANGE: dict[str, tuple[float, bool, float, bool]] = {
    "server_learning_rate": (0.0, _OPEN, math.inf, _OPEN),
    "eta": (0.0, _OPEN, math.inf, _OPEN),
    "eta_l": (0.0, _OPEN, math.inf, _OPEN),
    "tau": (0.0, _OPEN, math.inf, _OPEN),
    "proximal_mu": (0.0, _CLOSED, math.inf, _OPEN),
    "server_momentum": (0.0, _CLOSED, 1.0, _OPEN),
    "beta_1": (0.0, _CLOSED, 1.0, _OPEN),
    "beta_2": (0.0, _CLOSED, 1.0, _OPEN),
    "beta": (0.0, _CLOSED, 0.5, _OPEN),
    "num_malicious_nodes": (0.0, _CLOSED, math.inf, _OPEN),
}
"""Numeric ``federated.strategy_options`` (server learning rates, FedProx's mu, FedOpt's betas,
FedTrimmedAvg's trimmed fraction, Krum's malicious nodes) -> allowed range."""


def _interval(low: float, low_in: bool, high: float, high_in: bool) -> str:
    if high == math.inf:
        return f"a finite number {'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _out_of_range(value: Any, low: float, low_in: bool, high: float, high_in: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return True
    return value < low or (value == low and not low_in) or value > high or (value == high and not high_in)


def _get(run: RunConfig, dotted: str) -> Any:
    node: Any = run
    for name in dotted.split("."):
        node = getattr(node, name)
    return node


def _range_violations(run: RunConfig) -> Iterator[Violation]:
    for key, least in _INT_MIN.items():
        value = _get(run, key)
        if key == "federated.num_clients" and value == NUM_CLIENTS_FROM_DATA and data_fixes_num_clients(run.federated):
            continue  # read from the data before the run starts
        if value < least:
            off = " (-1 = off)" if least == -1 else ""
            yield key, value, f"must be >= {least}{off}"
    for key, bounds in _FLOAT_RANGE.items():
        value = _get(run, key)
        if _out_of_range(value, *bounds):
            why = " (NaN and infinity are not numbers to train with)" if not math.isfinite(value) else ""
            yield key, value, f"must be {_interval(*bounds)}{why}"
    for name, value in run.federated.strategy_options.items():
        key = f"federated.strategy_options.{name}"
        if isinstance(value, float) and not math.isfinite(value):
            yield key, value, "must be a finite number"
        if name in _STRATEGY_OPTION_RANGE and _out_of_range(value, *_STRATEGY_OPTION_RANGE[name]):
            yield key, value, f"must be {_interval(*_STRATEGY_OPTION_RANGE[name])}"


def _sampled_per_round(fed: FederatedConfig) -> int:
    # As fedsim.engines.federated.rounds.num_sampled (the round loop's own rule).
    return fed.clients_per_round if fed.clients_per_round > 0 else max(1, int(fed.fraction_fit * fed.num_clients))


def _faulty(fraction: float, k: int) -> int:
    # As fedsim.engines.federated.rounds.simulated_faults: round(f * k), at least one when f > 0.
    return 0 if fraction <= 0 else max(1, int(round(fraction * k)))


def data_fixes_num_clients(fed: FederatedConfig) -> bool:
    """Whether the data decide how many clients there are (natural partitions)."""
    return fed.partition == "natural" or (fed.partition == "flwr" and fed.partitioner == "NaturalIdPartitioner")


NUM_CLIENTS_FROM_DATA = 0
"""``federated.num_clients`` of a natural-partition run whose file leaves it out, until the data pass
(:mod:`fedsim.validation`) reads the number of clients from the data."""


def _federated_violations(fed: FederatedConfig) -> Iterator[Violation]:
    size = fed.evaluate_clients
    if isinstance(size, float) and not 0 < size <= 1:
        yield ("federated.evaluate_clients", size, "a fraction of the clients must be in (0, 1] (an integer is a count)")
    if isinstance(size, int) and size < 1:
        yield ("federated.evaluate_clients", size, "the evaluation cohort needs at least one client")
    if fed.num_clients == NUM_CLIENTS_FROM_DATA and data_fixes_num_clients(fed):
        return  # counts and cohort sizes are checked once the data have told how many clients there are
    if fed.partition == "flwr" and not fed.partitioner:
        yield ("federated.partitioner", fed.partitioner,
               'partition = "flwr" needs a Flower Datasets partitioner class, e.g. "DirichletPartitioner"')
    if fed.partitioner and fed.partition != "flwr":
        yield ("federated.partition", fed.partition, f'federated.partitioner = "{fed.partitioner}" is used only '
               'with partition = "flwr"')
    if fed.clients_per_round > fed.num_clients:
        yield ("federated.clients_per_round", fed.clients_per_round,
               f"more than federated.num_clients = {fed.num_clients}: a round cannot sample more clients than "
               f"there are (0 = federated.fraction_fit of them)")
    if fed.local_epochs < 1 and fed.local_steps < 1:
        yield ("federated.local_epochs", fed.local_epochs,
               "clients would not train: federated.local_steps is 0 too (set local_epochs >= 1 or local_steps >= 1)")
    total = fed.dropout_fraction + fed.straggler_fraction
    if total > 1:
        yield ("federated.dropout_fraction", fed.dropout_fraction,
               f"dropout_fraction + straggler_fraction = {total:g} > 1: more clients would fail than are sampled")
    k = _sampled_per_round(fed)
    yield from _system_violations(fed, k)
    dropped = min(_faulty(fed.dropout_fraction, k), k)
    slow = min(_faulty(fed.straggler_fraction, k), k - dropped)
    if fed.straggler_work == "partial":
        slow = 0  # stragglers doing partial work reply and are aggregated
    if total <= 1 and k - dropped - slow < 1:
        key, value = (("federated.dropout_fraction", fed.dropout_fraction) if fed.dropout_fraction > 0
                      else ("federated.straggler_fraction", fed.straggler_fraction))
        yield (key, value, f"of the {k} client(s) sampled per round {dropped} drop out and {slow} straggle (each "
                           f"fraction rounds to at least one client): no round would have a reply to aggregate")


def over_selected(k: int, over_selection: float) -> int:
    """Clients sampled per round with over-selection o: ceil((1 + o) k) (the round loop's own rule)."""
    return int(math.ceil((1.0 + over_selection) * k - 1e-9))


FEDBUFF_STRATEGIES = ("fedavg", "fedprox")
"""Strategies whose client side FedBuff can use (its server update replaces their aggregation)."""


def _system_violations(fed: FederatedConfig, k: int) -> Iterator[Violation]:
    system = fed.system
    if system.over_selection > 0 and over_selected(k, system.over_selection) > fed.num_clients:
        yield ("federated.system.over_selection", system.over_selection,
               f"ceil((1 + o) x {k}) = {over_selected(k, system.over_selection)} clients per round, more than "
               f"federated.num_clients = {fed.num_clients}")
    if system.late_work == "partial" and system.deadline_s <= 0:
        yield ("federated.system.late_work", system.late_work,
               "partial work is what a client fits before the deadline: set federated.system.deadline_s > 0")
    if system.server != "fedbuff":
        return
    fedbuff = "with federated.system.server = 'fedbuff'"
    if system.buffer_size > k:
        yield ("federated.system.buffer_size", system.buffer_size,
               f"more than the {k} clients training concurrently (federated.clients_per_round): no update "
               "would ever fill the buffer")
    if fed.strategy not in FEDBUFF_STRATEGIES:
        yield ("federated.strategy", fed.strategy,
               f"{fedbuff} the server update is FedBuff's; clients train as in {' or '.join(FEDBUFF_STRATEGIES)}")
    for key, value in (("federated.system.over_selection", system.over_selection),
                       ("federated.system.deadline_s", system.deadline_s),
                       ("federated.dropout_fraction", fed.dropout_fraction),
                       ("federated.straggler_fraction", fed.straggler_fraction)):
        if value:
            yield (key, value, f"{fedbuff} there are no rounds to over-select, time out or straggle in: "
                               "clients arrive when their device finishes (set it to 0)")


def _pipeline_violations(run: RunConfig) -> Iterator[Violation]:
    # As fedsim.engines.parallel.pipeline_split.check_schedule (minus the WORLD_SIZE check).
    cfg = run.pipeline
    if cfg.schedule in ("1f1b", "interleaved_1f1b") and cfg.microbatches < cfg.stages:
        yield ("pipeline.microbatches", cfg.microbatches,
               f"{cfg.schedule} needs at least as many microbatches as stages ({cfg.stages})")
    if cfg.schedule == "interleaved_1f1b":
        if cfg.virtual_stages < 2:
            yield "pipeline.virtual_stages", cfg.virtual_stages, "interleaved_1f1b needs at least 2 virtual stages per rank"
        rounds = max(1, cfg.microbatches // cfg.stages)
        if cfg.microbatches % rounds:
            yield ("pipeline.microbatches", cfg.microbatches,
                   f"interleaved_1f1b needs a multiple of {rounds} (microbatches // stages)")
    elif cfg.virtual_stages != 1:
        yield ("pipeline.virtual_stages", cfg.virtual_stages,
               f"only interleaved_1f1b runs several stages per rank; schedule is '{cfg.schedule}'")
    if run.mode == "pipeline" and run.train.batch_size % cfg.microbatches:
        yield ("train.batch_size", run.train.batch_size,
               f"not divisible by pipeline.microbatches = {cfg.microbatches} (each microbatch must have the same size)")


def _ddp_violations(ddp: DDPConfig) -> Iterator[Violation]:
    if ddp.rdzv_endpoint:
        host, sep, port = ddp.rdzv_endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            yield "ddp.rdzv_endpoint", ddp.rdzv_endpoint, "expected HOST:PORT"


FEDAVG_FAMILY = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")
"""Strategies whose aggregation is a (weighted) mean of the client models followed by a server step:
those user-level DP and secure aggregation apply to."""


def _privacy_budget_violations(prefix: str, epsilon: float | None, delta: float | None,
                               noise_multiplier: float | None) -> Iterator[Violation]:
    if epsilon is not None and (not math.isfinite(epsilon) or epsilon <= 0):
        yield f"{prefix}.epsilon", epsilon, "must be a finite number > 0 (a privacy budget)"
    if delta is not None and (not math.isfinite(delta) or not 0 < delta < 1):
        yield f"{prefix}.delta", delta, "must be in (0, 1) (typically below 1 / the number of records)"
    if noise_multiplier is not None and (not math.isfinite(noise_multiplier) or noise_multiplier <= 0):
        yield f"{prefix}.noise_multiplier", noise_multiplier, "must be a finite number > 0"
    if epsilon is not None and noise_multiplier is not None:
        yield (f"{prefix}.noise_multiplier", noise_multiplier,
               f"give a target {prefix}.epsilon ({epsilon:g}) or a noise multiplier, not both")


def _dp_violations(run: RunConfig) -> Iterator[Violation]:
    dp = run.train.dp
    yield from _privacy_budget_violations("train.dp", dp.epsilon, dp.delta, dp.noise_multiplier)
    if dp.enabled and run.mode not in ("central", "ddp"):
        yield ("train.dp.epsilon" if dp.epsilon is not None else "train.dp.noise_multiplier",
               dp.epsilon if dp.epsilon is not None else dp.noise_multiplier,
               f"DP-SGD (train.dp) runs in central and ddp modes, not '{run.mode}'"
               + (" (federated runs: federated.dp)" if run.mode == "federated" else ""))
    fed, fdp = run.federated, run.federated.dp
    yield from _privacy_budget_violations("federated.dp", fdp.epsilon, fdp.delta, fdp.noise_multiplier)
    if fdp.clipped_count_stddev is not None and _out_of_range(fdp.clipped_count_stddev, 0.0, _OPEN, math.inf, _OPEN):
        yield "federated.dp.clipped_count_stddev", fdp.clipped_count_stddev, "must be a finite number > 0"
    elif fdp.clipping == "adaptive" and fdp.noise_multiplier is not None:
        count_std = fdp.clipped_count_stddev or _sampled_per_round(fed) / 20
        if fdp.noise_multiplier >= 2 * count_std:
            yield ("federated.dp.noise_multiplier", fdp.noise_multiplier,
                   f"adaptive clipping needs noise_multiplier < 2 x clipped_count_stddev ({count_std:g}"
                   f"{'' if fdp.clipped_count_stddev else ' = K / 20, the default'}): raise "
                   "federated.dp.clipped_count_stddev or the cohort")
    if not fdp.enabled:
        for key, value in (("epsilon", fdp.epsilon), ("noise_multiplier", fdp.noise_multiplier)):
            if value is not None:
                yield (f"federated.dp.{key}", value,
                       'no DP without clipping: set federated.dp.clipping = "server", "client" or "adaptive"')
        return
    if fdp.epsilon is None and fdp.noise_multiplier is None:
        yield ("federated.dp.clipping", fdp.clipping,
               "DP needs noise: give federated.dp.epsilon (a target) or federated.dp.noise_multiplier")
    if fed.strategy not in FEDAVG_FAMILY:
        yield ("federated.strategy", fed.strategy,
               f"user-level DP needs a mean of client updates: one of {', '.join(FEDAVG_FAMILY)} "
               "(SCAFFOLD's control variates, FedNova's normalisation, median and Krum are not covered)")
    system = fed.system
    for key, value in (("federated.dropout_fraction", fed.dropout_fraction),
                       ("federated.straggler_fraction", fed.straggler_fraction),
                       ("federated.system.over_selection", system.over_selection),
                       ("federated.system.deadline_s", system.deadline_s)):
        if value:
            yield (key, value, "DP-FedAvg's noise is calibrated to a fixed denominator K: every sampled client's "
                               "update must be aggregated (set it to 0)")
    if system.server != "sync":
        yield ("federated.system.server", system.server, "DP-FedAvg is accounted per synchronous round")
    if system.availability != "always" or system.availability_trace:
        yield ("federated.system.availability", system.availability,
               "the accountant assumes K of all N clients sampled uniformly each round: keep every client available")


def _secure_aggregation_violations(fed: FederatedConfig) -> Iterator[Violation]:
    if not fed.secure_aggregation:
        return
    if fed.strategy not in FEDAVG_FAMILY:
        yield ("federated.strategy", fed.strategy,
               f"secure aggregation reveals only a sum of client models: one of {', '.join(FEDAVG_FAMILY)}")
    if fed.system.server != "sync":
        yield "federated.system.server", fed.system.server, "SecAgg+ aggregates synchronous rounds"
    k = _sampled_per_round(fed)
    if not 2 <= k <= 1023:
        yield ("federated.clients_per_round", k, "SecAgg+ needs 2 to 1023 clients per round (masks cancel between "
                                                 "at least two; the sum of 1024 would overflow its 2^32 modulus)")
    lost = min(_faulty(fed.dropout_fraction, k), k)
    if fed.straggler_work == "drop":
        lost += min(_faulty(fed.straggler_fraction, k), k - lost)
    tolerated = k - (k // 2 + 1)
    if lost > tolerated:
        yield ("federated.dropout_fraction" if fed.dropout_fraction else "federated.straggler_fraction",
               fed.dropout_fraction or fed.straggler_fraction,
               f"{lost} of {k} clients per round would drop out of SecAgg+, which recovers at most {tolerated} "
               f"(its threshold is {k // 2 + 1} of {k})")
    if fed.dp.clipping in ("server", "adaptive"):
        yield ("federated.dp.clipping", fed.dp.clipping, "with secure aggregation the server sees only the sum: "
                                                         'clip on the clients (federated.dp.clipping = "client")')


def run_violations(run: RunConfig) -> Iterator[Violation]:
    """Every broken range or cross-field rule of ``run``, ranges first (so a cross-field message never
    quotes an out-of-range value).

    Every section is checked, whatever the run's mode: defaults pass, and an out-of-range value in a
    section this run does not use is still a typo (the section is often shared by other runs). Rules
    that tie a section to another one's values (``train.batch_size`` vs ``pipeline.microbatches``)
    apply only in the mode that uses both. Rules that need a registry, the task or the data (partition
    sizes, topologies, strategy names) are :mod:`fedsim.validation`'s.
    """
    yield from _range_violations(run)
    yield from _federated_violations(run.federated)
    yield from _dp_violations(run)
    yield from _secure_aggregation_violations(run.federated)
    yield from _pipeline_violations(run)
    yield from _ddp_violations(run.ddp)


def _written_key(key: str, table: dict[str, Any], index: int | None) -> str:
    """``runs[i].key`` when the run's own table sets ``key``, else ``key`` (a top-level default, --set,
    or a built-in default)."""
    node: Any = table
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return key
        node = node[part]
    return key if index is None else f"runs[{index}].{key}"


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
    """Validate a parsed experiment table (see module docstring) and apply ``--set`` overrides.

    Each run is checked against :func:`run_violations`; the first broken rule raises
    :class:`ConfigError` naming the key as written (``runs[1].federated.alpha`` when the run's own
    table sets it). Renamed keys are read under their new names with a warning on stderr.
    """
    raw = copy.deepcopy(raw)
    run_overrides: dict[str, Any] = {}
    for text in overrides:
        path, value = parse_override(text)
        _set_path(raw if path[0] in EXPERIMENT_KEYS else run_overrides, path, value)
    run_overrides = rename_deprecated(RunConfig, run_overrides, "--set", warn=True)
    defaults = rename_deprecated(RunConfig, {k: v for k, v in raw.items() if k not in EXPERIMENT_KEYS}, file,
                                 warn=True)
    from_dict(RunConfig, defaults, file)  # top-level mistakes are reported under their own key
    run_tables = raw.get("runs", [{}])
    if not isinstance(run_tables, list) or not all(isinstance(r, dict) for r in run_tables):
        raise ConfigError(file, "runs", run_tables, "expected an array of tables ([[runs]])")
    name = raw.get("name", default_name or "experiment")
    runs = []
    for index, table in enumerate(run_tables):
        prefix = f"runs[{index}]" if "runs" in raw else ""
        table = rename_deprecated(RunConfig, table, file, prefix, warn=True)
        merged = deep_merge(deep_merge(defaults, table), run_overrides)
        merged.setdefault("name", table.get("name") or (name if len(run_tables) == 1 else f"run{index}"))
        merged["source"] = file
        federated = merged.get("federated")
        if isinstance(federated, dict) and "num_clients" not in federated and \
                data_fixes_num_clients(from_dict(FederatedConfig, federated, file, f"{prefix}.federated".lstrip("."))):
            federated["num_clients"] = NUM_CLIENTS_FROM_DATA  # the data will say
        run = from_dict(RunConfig, merged, file, prefix)
        for key, value, reason in run_violations(run):
            raise ConfigError(file, _written_key(key, table, index if "runs" in raw else None), value, reason)
        runs.append(run)
    seeds = _coerce(tuple[int, ...], raw.get("seeds", []), file, "seeds")
    for index, seed in enumerate(seeds):
        if seed < 0:
            raise ConfigError(file, f"seeds[{index}]", seed, "must be >= 0")
        if seed in seeds[:index]:
            raise ConfigError(file, f"seeds[{index}]", seed, "repeated: each seed would write the same run folder")
    for key in ("name", "description"):
        if key in raw and not isinstance(raw[key], str):
            raise ConfigError(file, key, raw[key], "expected a string")
    report = _coerce(dict[str, Any], raw.get("report", {}), file, "report")
    target = report.get("target", 0.9)
    if _out_of_range(target, 0.0, _OPEN, 1.0, _CLOSED):
        raise ConfigError(file, "report.target", target, "must be a number in (0, 1]: the fraction of the central "
                                                         "run's final metric a federated run must reach")
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

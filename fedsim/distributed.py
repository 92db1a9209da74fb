"""The one place that reads the distributed environment, and the helpers around a process group.

Under ``torchrun`` (and Ray Train, which sets the same variables) every process finds its place in
the job in ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and
``TORCHELASTIC_RESTART_COUNT``. :func:`read_env` turns them into one frozen :class:`DistEnv`
(as torchtitan's ``ParallelDims``); nothing else in fedsim reads them. The backend follows the
device: ``nccl`` on CUDA, ``gloo`` on CPU.

Public API (small on purpose; the DDP, pipeline and gossip engines share it):

* :func:`read_env` -> :class:`DistEnv`; :func:`under_launcher`;
* :func:`init_distributed` (once per process) and :func:`shutdown_distributed`
  (``barrier`` then ``destroy_process_group``), or both through :func:`distributed_session`;
* :func:`wrap_ddp` (a plain model -> ``DistributedDataParallel``, optional global-batch BatchNorm);
* :func:`all_reduce_mean`, :func:`broadcast_object`, :func:`parameters_in_sync`;
* :func:`check_port_free`.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fedsim.errors import FedsimError

__all__ = [
    "DistEnv", "read_env", "under_launcher", "init_distributed", "shutdown_distributed", "distributed_session",
    "exit_process",
    "wrap_ddp", "DataParallelModel", "all_reduce_mean", "broadcast_object", "parameters_in_sync",
    "check_port_free",
]

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a (possibly one-process) job.

    Attributes
    ----------
    rank, world_size: global rank and number of processes.
    local_rank, local_world_size: rank and number of processes on this node.
    node_rank: index of this node (``GROUP_RANK`` under torchrun).
    restart_count: how often torchrun restarted the worker group (0 on the first attempt).
    device: ``cuda:<local_rank>`` or ``cpu``.
    backend: ``nccl`` on CUDA, ``gloo`` on CPU.
    master_addr, master_port: the store every rank joins (``MASTER_ADDR``/``MASTER_PORT``).
    agent_store: the store is torchrun's own (``TORCHELASTIC_USE_AGENT_STORE``), shared by all
        attempts of a restarted group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    restart_count: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"
    master_addr: str = ""
    master_port: int = 0
    agent_store: bool = False

    @property
    def is_rank0(self) -> bool:
        """Only rank 0 logs, writes results and checkpoints."""
        return self.rank == 0


def under_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a process started by torchrun or Ray Train (they set RANK/WORLD_SIZE/LOCAL_RANK)."""
    environ = os.environ if environ is None else environ
    return all(name in environ for name in LAUNCHER_VARIABLES)


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise FedsimError(f"environment variable {name}={raw!r} is not an integer") from exc


def read_env(use_cuda: bool | None = False, environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables (the only place fedsim does) into a :class:`DistEnv`.

    Parameters
    ----------
    use_cuda: True puts this process on GPU ``LOCAL_RANK`` with nccl, and raises
        :class:`FedsimError` when CUDA is absent or this node runs more processes than it has GPUs
        (NCCL cannot share one GPU between ranks). None (``train.device = "auto"``) takes the GPUs
        when there is one per local process, else CPU with gloo. False: CPU with gloo.
    environ: the environment to read (default ``os.environ``; tests pass a dict).
    """
    environ = os.environ if environ is None else environ
    world_size = _int(environ, "WORLD_SIZE", 1)
    rank = _int(environ, "RANK", 0)
    local_rank = _int(environ, "LOCAL_RANK", 0)
    local_world_size = _int(environ, "LOCAL_WORLD_SIZE", world_size)
    if not 0 <= rank < world_size or not 0 <= local_rank < local_world_size:
        raise FedsimError(f"inconsistent launcher environment: RANK={rank} WORLD_SIZE={world_size} "
                          f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world_size}")
    device, backend = torch.device("cpu"), "gloo"
    if use_cuda is None:
        use_cuda = torch.cuda.is_available() and local_world_size <= torch.cuda.device_count()
    if use_cuda:
        if not torch.cuda.is_available():
            raise FedsimError("ddp.use_gpu = true but CUDA is not available; set ddp.use_gpu = false "
                              "(CPU workers with gloo)")
        gpus = torch.cuda.device_count()
        if local_world_size > gpus:
            raise FedsimError(f"{local_world_size} processes on this node but only {gpus} GPU(s): one GPU per "
                              f"process is needed with nccl; lower ddp.nproc to {gpus} or use CPU workers")
        device, backend = torch.device("cuda", local_rank), "nccl"
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size,
                   node_rank=_int(environ, "GROUP_RANK", _int(environ, "NODE_RANK", 0)),
                   restart_count=_int(environ, "TORCHELASTIC_RESTART_COUNT", 0), device=device, backend=backend,
                   master_addr=environ.get("MASTER_ADDR", ""), master_port=_int(environ, "MASTER_PORT", 0),
                   agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


# ---- process group lifetime --------------------------------------------------------------------
class _Session:
    """Whether this process created the group, and whether it may wait for its peers at exit."""

    created = False
    clean = True


def init_distributed(env: DistEnv, timeout_s: float = 600.0) -> bool:
    """Join the default process group (``env://``) unless one exists; return True if this call made it.

    A process group is created once per process and kept for later runs of the same ``fedsim run``:
    gloo cannot be re-initialised under torchrun after ``destroy_process_group`` (stale store keys
    make peers connect to closed sockets). It is torn down at interpreter exit by
    :func:`shutdown_distributed`, unless a run failed (then peers may be gone and a barrier would
    hang until the collective timeout).
    """
    if dist.is_available() and dist.is_initialized():
        return False
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    timeout = timedelta(seconds=timeout_s)
    kwargs: dict[str, Any] = {"backend": env.backend, "timeout": timeout}
    if env.device.type == "cuda":
        kwargs["device_id"] = env.device  # eager NCCL init: errors surface here, not in the first step
    if env.agent_store and env.master_addr and env.master_port:
        # torchrun (2.13) keeps one TCPStore server for all attempts of a restarted worker group and
        # its workers join it without a per-attempt prefix, so a restarted group finds the previous
        # attempt's keys (the dead ranks' gloo addresses) and can hang while connecting. A prefix
        # per attempt gives every attempt fresh keys.
        client = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
        kwargs.update(store=dist.PrefixStore(f"fedsim/attempt_{env.restart_count}", client), rank=env.rank,
                      world_size=env.world_size)
    dist.init_process_group(**kwargs)
    _Session.created = True
    atexit.register(_teardown_at_exit)
    return True


def shutdown_distributed() -> None:
    """``barrier()`` then ``destroy_process_group()``: no rank tears down while a peer still talks.

    Without the barrier, one rank of a two-node run occasionally aborted in teardown while the
    other was still in its last collective, and that one then waited out torchrun's exit barrier.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
    dist.destroy_process_group()
    _Session.created = False


def _teardown_at_exit() -> None:
    if _Session.created and _Session.clean:
        try:
            shutdown_distributed()
        except Exception:  # noqa: BLE001 - exiting anyway; a peer that died is torchrun's to report
            pass


def exit_process(code: int) -> NoReturn:
    """End a ``python -m`` entry point: under a process group, tear it down and leave without finalising.

    A torchrun worker that finished its run (results written) occasionally aborted while the
    interpreter finalised — gloo's C++ threads outliving the Python objects they refer to
    ("terminate called without an active exception", SIGABRT; the same race pytorch/pytorch#179291
    describes) — and torchrun then reported the whole run as failed. Tearing the group down while
    the interpreter is whole and leaving with ``os._exit`` skips that finalisation; output streams
    and logging are flushed first. Without a process group this is ``sys.exit(code)``.
    """
    if not _Session.created:
        sys.exit(code)
    try:
        _teardown_at_exit()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@contextmanager
def distributed_session(env: DistEnv, timeout_s: float = 600.0) -> Iterator[bool]:
    """Join the process group for one run; yield whether this process created it.

    A run that raises marks the session unclean, so the exit-time teardown skips its barrier
    (peers may already be gone; torchrun stops them).
    """
    created = init_distributed(env, timeout_s) if env.world_size > 1 or under_launcher() else False
    try:
        yield created
    except BaseException:
        _Session.clean = False
        raise


# ---- the model ----------------------------------------------------------------------------------
class DataParallelModel(DistributedDataParallel):
    """``DistributedDataParallel`` that also answers the wrapped model's own attributes.

    Tasks call helpers such as ``model.split(model(x))``; forwarding unknown attributes to
    ``self.module`` keeps the loop and the tasks unaware of the wrapper. Only ``forward`` goes
    through DDP's gradient hooks: a task that trains through another method would bypass the
    all-reduce, which :func:`parameters_in_sync` detects after every epoch.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = super().__getattr__("module")
            return getattr(module, name)


def wrap_ddp(model: nn.Module, env: DistEnv, *, sync_bn: bool = False) -> DataParallelModel:
    """Apply data parallelism to a plain model (the torchtitan ``parallelize_*`` pattern).

    Parameters
    ----------
    model: a single-device module already on ``env.device``.
    sync_bn: BatchNorm statistics over the global batch: torch's ``SyncBatchNorm`` with nccl, and
        :class:`fedsim.nn.sync_batchnorm.AllReduceBatchNorm` with gloo (torch's raises on CPU).
    """
    if not dist.is_initialized():
        raise FedsimError("wrap_ddp needs an initialised process group (call init_distributed first)")
    if sync_bn:
        from fedsim.nn.sync_batchnorm import convert_sync_batchnorm

        model = convert_sync_batchnorm(model, env.backend)
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    # DDP's defaults: buffers (BatchNorm running stats) follow rank 0 at each forward.
    return DataParallelModel(model, device_ids=device_ids)


# ---- small collectives ------------------------------------------------------------------------
def all_reduce_mean(values: Mapping[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Mean of each value over the ranks (one all-reduce); identity without a process group.

    Every rank must pass the same keys in the same order.
    """
    if not values or not dist.is_initialized():
        return dict(values)
    keys = list(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, tensor.tolist(), strict=True)}


def broadcast_object(obj: Any, src: int = 0, device: torch.device | None = None) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (e.g. rank 0's checkpoint on resume)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=device)
    return box[0]


def parameters_in_sync(model: nn.Module, rtol: float = 1e-6) -> bool:
    """Whether every rank holds the same parameters (compares a fingerprint with one all-reduce).

    Under DDP they stay identical, step after step; a mismatch means gradients were not averaged
    (the task trained through something other than the wrapper's ``forward``).
    """
    if not dist.is_initialized():
        return True
    params = [p.detach() for p in model.parameters()]
    if not params:
        return True
    device = params[0].device
    # Two fingerprints (sum and weighted sum) so that a permutation of values is caught too.
    flat = torch.cat([p.reshape(-1).to(torch.float64) for p in params])
    weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=device)
    stats = torch.stack([flat.sum(), (flat * weights).sum()])
    high, low = stats.clone(), stats.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not all(math.isfinite(v) for v in high.tolist() + low.tolist()):
        return True  # diverged training (NaN/inf) is the loss's story, not a synchronisation error
    scale = float(flat.abs().sum()) + 1.0
    return bool(((high - low).abs() <= rtol * scale).all())


# ---- ports ------------------------------------------------------------------------------------
def check_port_free(host: str, port: int, what: str) -> None:
    """Raise a clear :class:`FedsimError` if ``host:port`` cannot be bound (another job holds it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise FedsimError(f"{what}: port {port} on {host} is already in use ({exc.strerror}); "
                              f"choose a free port or stop the process that holds it") from exc

"""Data-parallel pieces that need no torchrun: sharding, the environment, global-batch BatchNorm, checks."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fedsim.config import RunConfig, from_dict
from fedsim.distributed import check_port_free, read_env, under_launcher
from fedsim.engines.parallel.data_parallel import rank_shard, validate_ddp
from fedsim.errors import ConfigError, FedsimError, UnsupportedError
from fedsim.nn.sync_batchnorm import AllReduceBatchNorm, convert_sync_batchnorm
from fedsim.train import epoch_permutation, make_loader

TINY = "tests.helpers.tiny_task:TinyTask"


# ---- sharding -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "world", "batch"), [(100, 2, 8), (101, 2, 8), (97, 3, 5), (10, 1, 4)])
def test_rank_batches_together_are_the_central_batch(n: int, world: int, batch: int) -> None:
    # Prepare: a dataset of indices, so a batch tells which samples it holds.
    dataset = torch.utils.data.TensorDataset(torch.arange(n), torch.arange(n))
    for epoch in (0, 1):
        central = [b[0].tolist() for b in make_loader(dataset, world * batch, seed=3, epoch=epoch)]
        shards = [rank_shard(n, world, r, seed=3, epoch=epoch) for r in range(world)]
        per_rank = [[b[0].tolist() for b in make_loader(dataset, batch, 3, epoch, shuffle=False, indices=s)]
                    for s in shards]
        # The last n % world samples of the permutation are left out (DistributedSampler's drop_last).
        dropped = set(epoch_permutation(n, 3, epoch)[n - n % world:])
        # Assert: equal steps on every rank; the k-th batches together are the central k-th batch.
        assert len({len(p) for p in per_rank}) == 1
        for k, rank_batches in enumerate(zip(*per_rank, strict=True)):
            union = sorted(i for b in rank_batches for i in b)
            assert union == sorted(i for i in central[k] if i not in dropped), (epoch, k)
            if k < len(central) - 1:
                assert len(union) == world * batch
        assert sorted(i for s in shards for i in s) == sorted(set().union(*map(set, shards)))  # disjoint
        assert sum(len(s) for s in shards) == n - n % world


def test_shards_are_reshuffled_every_epoch() -> None:
    assert rank_shard(200, 2, 0, seed=0, epoch=0) != rank_shard(200, 2, 0, seed=0, epoch=1)
    assert rank_shard(200, 2, 0, seed=0, epoch=1) == rank_shard(200, 2, 0, seed=0, epoch=1)


def test_an_empty_rank_share_is_refused() -> None:
    with pytest.raises(FedsimError, match="per-rank share"):
        rank_shard(1, 2, 0, seed=0, epoch=0)


# ---- environment --------------------------------------------------------------------------------
def test_read_env_from_torchrun_variables() -> None:
    env = read_env(environ={"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                            "GROUP_RANK": "1", "TORCHELASTIC_RESTART_COUNT": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == (3, 4, 1, 2, 1)
    assert env.restart_count == 2 and env.backend == "gloo" and env.device.type == "cpu" and not env.is_rank0
    assert read_env(environ={}).is_rank0 and read_env(environ={}).world_size == 1
    assert under_launcher({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) and not under_launcher({})


def test_read_env_rejects_inconsistent_variables() -> None:
    with pytest.raises(FedsimError, match="inconsistent"):
        read_env(environ={"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_use_gpu_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(FedsimError, match="CUDA is not available"):
        read_env(use_cuda=True, environ={})
    run = from_dict(RunConfig, {"task": TINY, "mode": "ddp", "ddp": {"use_gpu": True},
                                    "source": "exp.toml"}, "exp.toml")
    with pytest.raises(ConfigError, match=r"exp.toml: key 'ddp.use_gpu'"):
        validate_ddp(run)


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU on the CI machines: pretend one GPU is visible to reach the count check.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    run = from_dict(RunConfig, {"task": TINY, "mode": "ddp", "ddp": {"use_gpu": True, "nproc": 2},
                                "source": "exp.toml"}, "exp.toml")
    with pytest.raises(ConfigError, match=r"exp.toml: key 'ddp.nproc' = 2: more processes than GPUs \(1\)"):
        validate_ddp(run)
    with pytest.raises(FedsimError, match="2 processes on this node but only 1 GPU"):
        read_env(use_cuda=True, environ={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})


def test_auto_device_takes_gpus_only_when_there_is_one_per_local_process(monkeypatch: pytest.MonkeyPatch) -> None:
    two_local = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    env = read_env(use_cuda=None, environ=two_local)
    assert (env.device.type, env.backend) == ("cpu", "gloo")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    env = read_env(use_cuda=None, environ=two_local)
    assert (env.device, env.backend) == (torch.device("cuda", 1), "nccl")
    assert read_env(use_cuda=False, environ=two_local).backend == "gloo"


# ---- configuration checks -----------------------------------------------------------------------
def _run(**changes: Any) -> RunConfig:
    return from_dict(RunConfig, {"task": TINY, "mode": "ddp", "source": "exp.toml", **changes}, "exp.toml")


def test_per_rank_batch_of_zero_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"exp.toml: key 'train.batch_size' = 0: the per-rank batch"):
        validate_ddp(_run(train={"batch_size": 0}))


def test_task_that_cannot_run_data_parallel_is_refused() -> None:
    with pytest.raises(UnsupportedError, match="cannot run data-parallel"):
        validate_ddp(dataclasses.replace(_run(), task="gan"))


def test_multi_node_needs_an_endpoint_and_a_port() -> None:
    with pytest.raises(ConfigError, match="ddp.rdzv_endpoint"):
        validate_ddp(_run(ddp={"nnodes": 2}))
    with pytest.raises(ConfigError, match="HOST:PORT"):
        validate_ddp(_run(ddp={"nnodes": 2, "rdzv_endpoint": "localhost"}))


def test_port_in_use_is_named() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(FedsimError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port_free("127.0.0.1", port, "test")


# ---- global-batch BatchNorm -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(fn: Any, world: int, *args: Any, timeout: float = 90.0) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` gloo processes; fail on error or timeout."""
    port = _free_port()
    ctx = mp.start_processes(fn, args=(world, port, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish in {timeout}s")
    finally:
        for process in ctx.processes:  # exactly the processes this test started
            if process.is_alive():
                process.kill()
                process.join(5)


def _batchnorm_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        x = torch.randn(world * 6, 3, 4, 4, dtype=torch.float64)
        upstream = torch.randn_like(x)  # a fixed linear "rest of the network" on top of BN
        shard = slice(rank * 6, (rank + 1) * 6)
        bn = AllReduceBatchNorm(3, momentum=0.3, dtype=torch.float64)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
            bn.bias.copy_(torch.tensor([0.1, 0.0, -0.2]))
        xr = x[shard].clone().requires_grad_(True)
        for _ in range(2):  # two steps: running statistics accumulate
            out = bn(xr)
        (out * upstream[shard]).sum().backward()
        bn.eval()
        eval_out = bn(xr.detach())
        torch.save({"out": out.detach(), "x_grad": xr.grad, "w_grad": bn.weight.grad, "b_grad": bn.bias.grad,
                    "running_mean": bn.running_mean, "running_var": bn.running_var,
                    "tracked": bn.num_batches_tracked, "eval_out": eval_out}, os.path.join(out_dir, f"r{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_batchnorm_equals_central_batchnorm_on_the_global_batch(tmp_path: Any) -> None:
    # Execute: 2 gloo ranks, each with half of a batch of 12.
    _spawn(_batchnorm_rank, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    # Central reference: nn.BatchNorm2d on the concatenated batch.
    torch.manual_seed(0)
    x = torch.randn(12, 3, 4, 4, dtype=torch.float64)
    upstream = torch.randn_like(x)
    bn = nn.BatchNorm2d(3, momentum=0.3, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
        bn.bias.copy_(torch.tensor([0.1, 0.0, -0.2]))
    xc = x.clone().requires_grad_(True)
    for _ in range(2):
        out = bn(xc)
    (out * upstream).sum().backward()
    bn.eval()
    eval_out = bn(x)
    # Assert: outputs and input gradients per shard; parameter gradients summed over ranks (the
    # global loss is the sum of the ranks' losses here); identical running statistics.
    for r, got in enumerate(ranks):
        shard = slice(r * 6, (r + 1) * 6)
        torch.testing.assert_close(got["out"], out[shard].detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(got["x_grad"], xc.grad[shard], rtol=0, atol=1e-12)
        torch.testing.assert_close(got["eval_out"], eval_out[shard].detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(got["running_mean"], bn.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(got["running_var"], bn.running_var, rtol=0, atol=1e-12)
        assert int(got["tracked"]) == 2
    torch.testing.assert_close(ranks[0]["w_grad"] + ranks[1]["w_grad"], bn.weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(ranks[0]["b_grad"] + ranks[1]["b_grad"], bn.bias.grad, rtol=0, atol=1e-12)


def test_without_a_process_group_it_is_plain_batchnorm() -> None:
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.BatchNorm2d(2)))
    converted = convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.BatchNorm2d(2))), "gloo")
    converted.load_state_dict(plain.state_dict())
    assert isinstance(converted[1], AllReduceBatchNorm) and isinstance(converted[2][0], AllReduceBatchNorm)
    assert converted.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(5, 1, 6, 6)
    torch.testing.assert_close(converted(x), plain(x))
    torch.testing.assert_close(converted[1].running_var, plain[1].running_var)

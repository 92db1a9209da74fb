"""Data-parallel throughput: central training vs DDP with 1 and 2 workers, and all-reduce time per step.

    python benchmarks/ddp.py                       # bn_cnn on digits, CPU (and GPU when present)
    python benchmarks/ddp.py --task exam_net --global-batch 128 --steps 50

Every configuration trains the same task with the same *global* batch (strong scaling: with W
workers each rank takes ``global_batch / W`` samples per step), so a step does the same work
everywhere. For each configuration it reports:

* ``samples_per_s``: global samples per second over the timed steps (after warm-up);
* ``step_ms``: median wall time of one optimizer step (forward, backward with DDP's all-reduce,
  update);
* ``no_sync_step_ms``: the same step under ``model.no_sync()`` (no gradient all-reduce), so
  ``step_ms - no_sync_step_ms`` is what synchronisation costs inside DDP (overlap included);
* ``allreduce_ms``: one standalone ``all_reduce`` of a tensor the size of all gradients (what DDP
  moves per step, in buckets), mean of 20.

Workers are real processes (``torch.multiprocessing``, gloo on CPU, nccl on GPU) wrapped with
:func:`fedsim.distributed.wrap_ddp`, as the DDP engine does. Writes JSON (``--out``) and prints a
table. Timings on a shared machine vary; run it on an otherwise idle one for README numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedsim.config import RunConfig, from_dict  # noqa: E402
from fedsim.engines.common import build_model, load_task_data  # noqa: E402
from fedsim.train import make_loader, torch_dtype  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _batches(run: RunConfig, dataset: Any, batch: int, rank: int, world: int, count: int) -> list[Any]:
    """``count`` batches of this rank (the central permutation, interleaved across ranks)."""
    from fedsim.engines.parallel.data_parallel import rank_shard

    out: list[Any] = []
    epoch = 0
    while len(out) < count:
        shard = rank_shard(len(dataset), world, rank, run.train.seed, epoch)
        out += list(make_loader(dataset, batch, run.train.seed, epoch, shuffle=False, indices=shard))
        epoch += 1
    return out[:count]


def _time_steps(task: Any, model: Any, optimizers: Any, batches: list[Any], sync: bool, device: torch.device) -> float:
    """Median seconds per step over ``batches`` (robust to other load on a shared machine)."""
    from contextlib import nullcontext

    from fedsim.tasks import TaskContext, move_batch

    times = []
    for batch in batches:
        context = nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with context:
            task.train_step(model, move_batch(batch, model), optimizers, context=TaskContext())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _setup(args: argparse.Namespace, device: torch.device) -> tuple[RunConfig, Any, Any, Any, Any]:
    run = from_dict(RunConfig, {"task": args.task, "train": {"dtype": "float32", "lr": 0.01}})
    task, split = load_task_data(run)
    model = build_model(task, split, run, device)
    return run, task, split, model, task.build_optimizers(model, run.train)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, use_cuda: bool, out_file: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(args.threads)
    import torch.distributed as dist

    from fedsim.distributed import init_distributed, read_env, shutdown_distributed, wrap_ddp

    env = read_env(use_cuda=use_cuda)
    init_distributed(env, timeout_s=300)
    run, task, split, model, optimizers = _setup(args, env.device)
    ddp = wrap_ddp(model, env, sync_bn=False)
    per_rank = args.global_batch // world
    batches = _batches(run, split.train, per_rank, rank, world, args.warmup + args.steps)
    _time_steps(task, ddp, optimizers, batches[: args.warmup], True, env.device)
    dist.barrier()
    start = time.perf_counter()
    step_s = _time_steps(task, ddp, optimizers, batches[args.warmup:], True, env.device)
    total_s = time.perf_counter() - start
    no_sync_s = _time_steps(task, ddp, optimizers, batches[args.warmup:], False, env.device)
    numel = sum(p.numel() for p in model.parameters())
    flat = torch.zeros(numel, dtype=torch_dtype(run.train.dtype), device=env.device)
    for _ in range(3):
        dist.all_reduce(flat)
    reps = 20
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(flat)
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    allreduce_s = (time.perf_counter() - start) / reps
    stats = torch.tensor([total_s, step_s, no_sync_s, allreduce_s], dtype=torch.float64, device=env.device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    if rank == 0:
        total_s, step_s, no_sync_s, allreduce_s = stats.tolist()
        Path(out_file).write_text(json.dumps({
            "samples_per_s": args.global_batch * args.steps / total_s, "step_ms": 1e3 * step_s,
            "no_sync_step_ms": 1e3 * no_sync_s, "allreduce_ms": 1e3 * allreduce_s, "params": numel}))
    shutdown_distributed()


def run_ddp(args: argparse.Namespace, world: int, use_cuda: bool, tmp: Path) -> dict[str, Any]:
    out_file = tmp / f"ddp{world}{'_cuda' if use_cuda else ''}.json"
    ctx = mp.start_processes(_worker, args=(world, _free_port(), args, use_cuda, str(out_file)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + args.timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"DDP x{world} did not finish in {args.timeout}s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return json.loads(out_file.read_text())


def run_central(args: argparse.Namespace, device: torch.device, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    run, task, split, model, optimizers = _setup(args, device)
    batches = _batches(run, split.train, args.global_batch, 0, 1, args.warmup + args.steps)
    _time_steps(task, model, optimizers, batches[: args.warmup], True, device)
    start = time.perf_counter()
    step_s = _time_steps(task, model, optimizers, batches[args.warmup:], True, device)
    total_s = time.perf_counter() - start
    return {"samples_per_s": args.global_batch * args.steps / total_s, "step_ms": 1e3 * step_s,
            "no_sync_step_ms": 1e3 * step_s, "allreduce_ms": 0.0,
            "params": sum(p.numel() for p in model.parameters())}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{os.cpu_count()} CPU cores ({cpu})"
    if torch.cuda.is_available():
        text += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="bn_cnn")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per DDP worker")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "ddp.json"), help="JSON file to write")
    args = parser.parse_args(argv)
    if args.global_batch % 2:
        parser.error("--global-batch must be even (it is split over 2 workers)")
    tmp = Path(args.out).parent / ".ddp_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    cores = os.cpu_count() or 1
    rows.append({"device": "cpu", "mode": "central", "workers": 1, "threads": 1,
                 **run_central(args, torch.device("cpu"), 1)})
    if cores > 1:
        rows.append({"device": "cpu", "mode": "central", "workers": 1, "threads": cores,
                     **run_central(args, torch.device("cpu"), cores)})
    for world in (1, 2):
        rows.append({"device": "cpu", "mode": "ddp", "workers": world, "threads": args.threads,
                     **run_ddp(args, world, False, tmp)})
    if torch.cuda.is_available():
        rows.append({"device": "cuda", "mode": "central", "workers": 1, "threads": 1,
                     **run_central(args, torch.device("cuda"), 1)})
        for world in (1, 2):
            if world <= torch.cuda.device_count():
                rows.append({"device": "cuda", "mode": "ddp", "workers": world, "threads": args.threads,
                             **run_ddp(args, world, True, tmp)})
    result = {"benchmark": "ddp", "task": args.task, "global_batch": args.global_batch, "steps": args.steps,
              "warmup": args.warmup, "machine": machine(), "torch": torch.__version__,
              "load_average": os.getloadavg(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for leftover in tmp.glob("*.json"):
        leftover.unlink()
    tmp.rmdir()
    from fedsim.results import print_table

    print_table(f"DDP throughput: {args.task}, global batch {args.global_batch}, {machine()}",
                ["device", "mode", "workers", "threads/worker", "samples/s", "step ms", "no-sync step ms",
                 "all-reduce ms"],
                [[r["device"], r["mode"], r["workers"], r["threads"], round(r["samples_per_s"], 1),
                  round(r["step_ms"], 2), round(r["no_sync_step_ms"], 2), round(r["allreduce_ms"], 3)]
                 for r in rows])
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

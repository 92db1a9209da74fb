"""Pipeline step time and efficiency for S = 1, 2, 4 stages, several microbatch counts, per schedule.

A stack of ``layers`` equal blocks (Linear(width, width) + Tanh; the first takes the 64 digit
features, the last adds a 10-way head) is pipelined with the engine's own
:func:`fedsim.engines.parallel.pipeline.build_pipeline` (the balanced split gives every stage the same
number of blocks). For each stage count S one ``torchrun`` job with S processes times every
(schedule, m) pair on the same global batch: ``warmup`` steps, then ``reps`` steps, each between
two barriers; the median is the step time.

Efficiency of S stages at m microbatches is ``T(1, m) / (S * T(S, m))``: the single-process time
of the same work (gradient accumulation over the same m microbatches, timed on rank 0 alternately
with the pipelined step, so that load from other jobs hits both alike) divided by the S-rank time
x S ranks (1 = perfect, S times faster). S = 1 shows the schedule's own overhead. It is shown
next to the ideal bubble bound ``1 - (S - 1) / (m + S - 1)`` of GPipe/1F1B with equal stages and
free communication (interleaving with v virtual stages shrinks the bubble to ``(S-1)/v``).

On CPU each stage is a gloo process with one thread: with fewer free cores than S processes the
ranks wait for a core as well as for each other, which the efficiency counts as bubble.

    python benchmarks/pipeline.py                      # CPU, ~2 min; JSON + table + PNG
    python benchmarks/pipeline.py --stages 1 2 --microbatches 2 4 8 --reps 20
    python benchmarks/pipeline.py --device cuda        # stage i on cuda:i (needs S GPUs)

Writes ``results/benchmarks/pipeline.json`` and ``pipeline.png`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: `python benchmarks/pipeline.py`
    sys.path.insert(0, str(ROOT))

from fedsim.config import RunConfig, from_dict  # noqa: E402
from fedsim.data import DataInfo  # noqa: E402
from fedsim.engines.parallel.pipeline import build_pipeline, ideal_efficiency  # noqa: E402
from fedsim.results import save_figure  # noqa: E402
from fedsim.tasks import Batch, Task  # noqa: E402

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


class StackTask(Task):
    """Equal blocks, so that a balanced split gives equal stages (the ideal's assumption)."""

    name: ClassVar[str] = "bench_stack"
    pipeline_split_points: ClassVar[tuple[str, ...]] = ()

    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.layers, self.width = layers, width
        self.pipeline_split_points = tuple(f"block{i}" for i in range(1, layers))

    def build_model(self, info: DataInfo | None = None) -> nn.Module:
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(self.layers):
            layers: list[nn.Module] = [nn.Linear(64 if i == 0 else self.width, self.width), nn.Tanh()]
            if i == self.layers - 1:
                layers.append(nn.Linear(self.width, 10))
            blocks[f"block{i}"] = nn.Sequential(*layers)
        return nn.Sequential(blocks)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)


def configs(stages: int, microbatches: list[int], layers: int) -> list[tuple[str, int]]:
    """The (schedule, m) pairs that S stages allow."""
    pairs = []
    for schedule in SCHEDULES:
        if stages == 1 and schedule != "gpipe":
            continue  # one stage has no bubble: every schedule is the same sequence of steps
        for m in microbatches:
            if schedule != "gpipe" and m < stages:
                continue
            if schedule == "interleaved_1f1b" and (2 * stages > layers or m % max(1, m // stages)):
                continue
            pairs.append((schedule, m))
    return pairs


# ---- worker: one torchrun job per S ----------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from fedsim.distributed import distributed_session, read_env

    torch.set_num_threads(args.threads)
    env = read_env(use_cuda=args.device == "cuda")
    results = []
    with distributed_session(env, timeout_s=600):
        stages = dist.get_world_size()
        task = StackTask(args.layers, args.width)
        for schedule, m in configs(stages, args.microbatches, args.layers):
            run = from_dict(RunConfig, {
                "task": "bench_stack", "mode": "pipeline", "train": {"batch_size": args.batch, "device": args.device},
                "pipeline": {"stages": stages, "microbatches": m, "schedule": schedule, "split": ["balanced"],
                             "virtual_stages": 2 if schedule == "interleaved_1f1b" else 1}})
            torch.manual_seed(0)
            model = task.build_model()
            generator = torch.Generator().manual_seed(1)
            x = torch.randn(args.batch, 64, generator=generator)
            y = torch.randint(0, 10, (args.batch,), generator=generator)
            baseline = copy.deepcopy(model).to(env.device)  # the same work in one process (rank 0)
            base_optimizer = torch.optim.SGD(baseline.parameters(), lr=0.01)
            pipe = build_pipeline(model, task, run, (x[: args.batch // m],), env.device)
            optimizer = torch.optim.SGD([p for piece in pipe.pieces for p in piece.parameters()], lr=0.01)
            x, y = x.to(env.device), y.to(env.device)
            times, base_times = [], []
            for rep in range(args.warmup + args.reps):
                # Baseline and pipeline steps alternate, so that load from other jobs hits both alike.
                _sync(env.device)
                dist.barrier()
                if env.rank == 0:
                    tick = time.perf_counter()
                    base_optimizer.zero_grad(set_to_none=True)
                    for xm, ym in zip(x.chunk(m), y.chunk(m), strict=True):
                        (task.loss(baseline, (xm, ym)) / m).backward()
                    base_optimizer.step()
                    _sync(env.device)
                    if rep >= args.warmup:
                        base_times.append(time.perf_counter() - tick)
                dist.barrier()
                tick = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                target = y if pipe.has_last else None
                if pipe.has_first:
                    pipe.schedule.step(x, target=target)
                else:
                    pipe.schedule.step(target=target)
                optimizer.step()
                _sync(env.device)
                dist.barrier()
                if rep >= args.warmup:
                    times.append(time.perf_counter() - tick)
            if env.rank == 0:
                results.append({"stages": stages, "schedule": schedule, "microbatches": m,
                                "step_time_s": statistics.median(times), "baseline_time_s": statistics.median(base_times),
                                "step_times_s": times, "baseline_times_s": base_times,
                                "split": list(pipe.plan.split_points)})
                print(f"S={stages} {schedule:>16} m={m}: {statistics.median(times) * 1e3:.1f} ms "
                      f"(one process: {statistics.median(base_times) * 1e3:.1f} ms)", flush=True)
    if env.rank == 0:
        Path(args.worker_out).write_text(json.dumps(results))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- driver --------------------------------------------------------------------------------------------
def launch(stages: int, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """One torchrun job with ``stages`` processes (stopped with its process group on timeout)."""
    path = out / f".pipeline_S{stages}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(stages),
           str(Path(__file__).resolve()), "--worker-out", str(path), "--device", args.device,
           "--threads", str(args.threads), "--batch", str(args.batch), "--layers", str(args.layers),
           "--width", str(args.width), "--warmup", str(args.warmup), "--reps", str(args.reps),
           "--microbatches", *map(str, args.microbatches)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        raise SystemExit(f"torchrun with {stages} stages did not finish in {args.timeout} s") from None
    if code != 0:
        raise SystemExit(f"torchrun with {stages} stages failed with exit code {code}")
    results = json.loads(path.read_text())
    path.unlink()
    return results


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the measured efficiency ``T(1, m) / (S T(S, m))`` and the ideal bound to each row.

    ``T(1, m)`` is the row's own baseline: the same step (gradient accumulation over the same m
    microbatches) in one process, timed alternately with the pipelined step.
    """
    for row in rows:
        s, m, base = row["stages"], row["microbatches"], row["baseline_time_s"]
        row["speedup"] = base / row["step_time_s"]
        row["efficiency"] = base / (s * row["step_time_s"])
        row["ideal_efficiency"] = ideal_efficiency(s, m)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = {"gpipe": "o", "1f1b": "s", "interleaved_1f1b": "^"}
    colours = {1: "tab:gray", 2: "tab:blue", 4: "tab:red", 8: "tab:green"}
    for s in sorted({r["stages"] for r in rows}):
        colour = colours.get(s, None)
        ms = sorted({r["microbatches"] for r in rows if r["stages"] == s})
        ax.plot(ms, [ideal_efficiency(s, m) for m in ms], linestyle="--", color=colour, label=f"S={s} ideal")
        for schedule in SCHEDULES:
            points = sorted((r["microbatches"], r["efficiency"]) for r in rows
                            if r["stages"] == s and r["schedule"] == schedule and r["efficiency"] is not None)
            if points:
                ax.plot(*zip(*points, strict=True), marker=markers[schedule], color=colour,
                        label=f"S={s} {schedule}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("microbatches m")
    ax.set_ylabel("efficiency T(1,m) / (S T(S,m))")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("pipeline efficiency: measured (solid) vs 1-(S-1)/(m+S-1) (dashed)")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, default=256, help="global batch (divisible by every m)")
    parser.add_argument("--layers", type=int, default=8, help="equal blocks (>= 2 S for interleaving)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per stage process")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--timeout", type=float, default=300, help="per torchrun job, seconds")
    parser.add_argument("--out", default="results/benchmarks", help="folder for pipeline.json and pipeline.png")
    parser.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_out:
        worker(args)
        return {}
    bad = [m for m in args.microbatches if args.batch % m]
    if bad:
        parser.error(f"--batch {args.batch} is not divisible by --microbatches {bad}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, load_start = time.time(), os.getloadavg()
    rows: list[dict[str, Any]] = []
    for stages in args.stages:
        rows += launch(stages, args, out)
    rows = summarise(rows)
    from fedsim.results import print_table

    print_table(f"pipeline step time ({args.device}, batch {args.batch}, {args.layers} x Linear({args.width}))",
                ["S", "schedule", "m", "step ms", "1-process ms", "speed-up", "efficiency", "ideal 1-(S-1)/(m+S-1)"],
                [[r["stages"], r["schedule"], r["microbatches"], r["step_time_s"] * 1e3, r["baseline_time_s"] * 1e3,
                  r["speedup"],
                  r["efficiency"], r["ideal_efficiency"]] for r in rows])
    report = {
        "benchmark": "pipeline", "device": args.device, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "torch": torch.__version__, "settings": {k: v for k, v in vars(args).items() if k != "worker_out"},
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "wall_time_s": time.time() - started, "rows": rows,
    }
    print(f"load average (1 min) before/after: {load_start[0]:.1f} / {report['load_average']['end'][0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    (out / "pipeline.json").write_text(json.dumps(report, indent=2))
    plot(rows, out / "pipeline.png")
    print(f"wrote {out / 'pipeline.json'} and {out / 'pipeline.png'} in {report['wall_time_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()

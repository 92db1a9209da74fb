"""The same federated workload on four engines: wall time, start-up, per-round time, peak RSS, accuracy.

(a) ``bare``: a plain PyTorch FedAvg loop (no Flower, no messages): the floor;
(b) ``local``: fedsim's ServerApp/ClientApp on the in-process grid, clients one after the other;
(c) ``local_vectorised``: the same with ``federated.vectorise = true`` (torch.func);
(d) ``flower``: the same apps on Flower's ``run_simulation`` (Ray actors, ``num_cpus = 1`` each);
(f) ``floor``: not an engine — the same rounds' training FLOPs in one model's steps on the sampled
clients' batches concatenated, plus the same evaluation: what no engine can beat per round here;
optionally (e) ``local_pool``: the in-process grid with 2 worker processes.

Workload (the comparison experiment's shape): ``bn_cnn`` on digits, IID partitions, 10 clients
per round, 1 local epoch, batch 32, SGD, server-side test accuracy every round, one torch thread
per client, 20 rounds, for 20 and 100 clients; plus a ~11M-parameter MLP (``WideMLPTask``) so that
costs that grow with model size (array copies, serialisation) show.

Every engine run is a fresh process (same imports, same cold start), watched by a sampler that
sums the RSS of the process and all its descendants (Ray's raylet, GCS and actors included).
CPU seconds (user + system, summed over the process tree) are reported next to wall time: on a
shared machine wall time mostly measures the neighbours, and gives a multi-process engine (Ray)
a larger share of the CPU than a single process gets. Start-up = from the engine call to the
start of round 1 (imports excluded: they are the same for all; Ray start and actor spawn
included); per-round = the median of the round times, which leaves out the first round (it pays torch's lazy imports on the first ``optimizer.step()``, reported as
``first_round_s``). Ratios are of medians over the repeats.

Run: ``python benchmarks/federated_engines.py`` (about 15 minutes on a 2-core CPU; ``--quick`` for
a smoke run). Writes ``benchmarks/results/federated_engines.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("bare", "local", "local_vectorised", "flower", "floor")
# By this module's own name, with benchmarks/ on the path: opacus installs a top-level `benchmarks` package
# that shadows this folder as `benchmarks.*`.
WIDE_TASK = "federated_engines:WideMLPTask"


# ---- the ~11M-parameter synthetic model --------------------------------------------------------------
def _wide_task_class() -> Any:
    import torch
    from torch import nn

    from fedsim.data import DataInfo
    from fedsim.tasks import Task
    from fedsim.tasks.part_a import classification_metrics

    class WideMLPTask(Task):
        """A 64 -> 3300 -> 3300 -> 10 MLP on digits: ~11.1M parameters, no batch coupling."""

        name = "wide_mlp"
        description = "~11M-parameter MLP on digits (engine benchmark)"
        vectorisable = True

        def build_model(self, info: DataInfo) -> nn.Module:
            width = 3300
            features = int(torch.tensor(info.input_shape).prod())
            return nn.Sequential(nn.Flatten(), nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width),
                                 nn.ReLU(), nn.Linear(width, info.num_classes))

        def loss(self, model: nn.Module, batch: Any) -> Any:
            x, y = batch
            return nn.functional.cross_entropy(model(x), y)

        def evaluate(self, model: nn.Module, dataset: Any, batch_size: int = 512) -> dict[str, float]:
            return classification_metrics(model, dataset, batch_size)

    return WideMLPTask


def __getattr__(name: str) -> Any:  # lazy: importing this module (Ray actors do) stays cheap
    if name == "WideMLPTask":
        cls = _wide_task_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


# ---- one engine run (a child process) ----------------------------------------------------------------
def tree_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process and its live descendants (Ray's too).

    On a busy machine wall time says more about the neighbours than about the engine, and a
    multi-process engine gets more of the CPU than a single process does; CPU seconds do not.
    """
    import psutil

    me = psutil.Process()
    total = time.process_time()  # this process to the nanosecond; /proc gives children in 10 ms ticks
    for proc in me.children(recursive=True):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def run_config(args: argparse.Namespace, engine: str) -> Any:
    from fedsim.config import RunConfig, from_dict

    return from_dict(RunConfig, {
        "name": engine, "task": args.task, "mode": "federated",
        "train": {"threads": 1, "progress": False, "checkpoint": False, "lr": args.lr, "batch_size": 32,
                  "seed": args.seed},
        "federated": {"engine": "flower" if engine == "flower" else "local", "num_clients": args.clients,
                      "clients_per_round": args.per_round, "rounds": args.rounds, "local_epochs": 1,
                      "strategy": "fedavg", "partition": "iid", "cpus_per_client": 1.0,
                      "vectorise": engine == "local_vectorised", "worker_processes": 2 if engine == "local_pool" else 0},
    })


def plain_setup(args: argparse.Namespace, run: Any) -> tuple[Any, Any, Any, list[Any]]:
    """Task, data, seeded model and each client's training indices, as fedsim's clients get them."""
    import torch

    from fedsim.data.partition import partition, partition_labels, split_holdout
    from fedsim.engines.common import build_model, load_task_data

    task, split = load_task_data(run)
    model = build_model(task, split, run, torch.device("cpu"))
    parts = partition(partition_labels(split.train.tensors[1]), args.clients, "iid", seed=args.seed)
    train_idx = [torch.as_tensor(split_holdout(p, 0.2, args.seed, pid)[0]) for pid, p in enumerate(parts)]
    return task, split, model, train_idx


def client_order(seed: int, server_round: int, partition_id: int, indices: Any) -> Any:
    """The order in which fedsim's ClientApp visits its training indices in a round (one local epoch): the
    permutation of its local epoch 0, seeded by (seed, "client", round, partition)."""
    import torch

    from fedsim.seeding import derive_seed, epoch_permutation

    order = epoch_permutation(len(indices), derive_seed(seed, "client", server_round, partition_id), 0)
    return indices[torch.as_tensor(order, dtype=torch.long)]


def timed_rounds(args: argparse.Namespace, run: Any, train_round: Any) -> dict[str, Any]:
    """Time ``args.rounds`` rounds of ``train_round`` plus the server's test evaluation, as (a) and (f) need.

    ``train_round(server_round, sampled, model, task, x_all, y_all, train_idx)`` trains the sampled
    clients and leaves the round's global model in ``model``; this evaluates it on the test split.
    """
    import torch

    from fedsim.engines.federated.rounds import sample_clients

    started = time.perf_counter()
    task, split, model, train_idx = plain_setup(args, run)
    x_all, y_all = split.train.tensors  # type: ignore[attr-defined]
    round_times, round_cpu, round_starts, accuracy = [], [], [], 0.0
    for server_round in range(1, args.rounds + 1):
        round_start, cpu_start = time.perf_counter(), tree_cpu_s()
        round_starts.append(round_start - started)
        sampled = sample_clients(args.seed, server_round, args.clients, args.per_round)
        train_round(server_round, sampled, model, task, x_all, y_all, train_idx)
        model.eval()
        with torch.no_grad():
            accuracy = task.evaluate(model, split.test, 512)["accuracy"]
        round_times.append(time.perf_counter() - round_start)
        round_cpu.append(tree_cpu_s() - cpu_start)
    return {"startup_s": round_starts[0], "round_times": round_times, "round_cpu": round_cpu, "accuracy": accuracy,
            "run_s": time.perf_counter() - started}


def bare_fedavg(args: argparse.Namespace, run: Any) -> dict[str, Any]:
    """(a) FedAvg in plain PyTorch: same data, partition, model, sampling and evaluation."""
    import torch

    global_state: dict[str, Any] = {}

    def train_round(server_round: int, sampled: list[int], model: Any, task: Any, x_all: Any, y_all: Any,
                    train_idx: list[Any]) -> None:
        nonlocal global_state
        if not global_state:
            global_state = {k: v.clone() for k, v in model.state_dict().items()}
        total = sum(len(train_idx[p]) for p in sampled)
        new_state = {k: torch.zeros_like(v, dtype=v.dtype if v.is_floating_point() else torch.float64)
                     for k, v in global_state.items()}
        for pid in sampled:
            model.load_state_dict(global_state)
            model.train()
            optimizer = torch.optim.SGD(model.parameters(), lr=run.train.lr)
            idx = train_idx[pid]
            order = client_order(args.seed, server_round, pid, idx)
            for start in range(0, len(order), run.train.batch_size):
                batch = order[start:start + run.train.batch_size]
                optimizer.zero_grad(set_to_none=True)
                task.loss(model, (x_all[batch], y_all[batch])).backward()
                optimizer.step()
            weight = len(idx) / total
            for k, v in model.state_dict().items():  # in place, in the parameters' dtype: a lean floor
                new_state[k].add_(v.to(new_state[k].dtype), alpha=weight)
        global_state = {k: v.to(global_state[k].dtype) for k, v in new_state.items()}
        model.load_state_dict(global_state)

    return timed_rounds(args, run, train_round)


def compute_floor(args: argparse.Namespace, run: Any) -> dict[str, Any]:
    """(f) Not FedAvg: the round's arithmetic in the fewest, largest kernel calls, as a timing floor.

    Each round takes the same sampled clients and batches as (a), but at every local step index
    it makes ONE training step of one model on all the clients' batches of that index concatenated
    (the same forward/backward FLOPs as the clients' steps, in the biggest kernels there can be),
    then the same server-side test evaluation. Vectorising clients packs the same work into bigger
    kernels, so its per-round time cannot be expected below this; the ratio floor / bare says how
    far below the bare loop any engine can get on this machine. Its accuracy is not a FedAvg result.
    """
    import torch

    optimizers: list[Any] = []
    size = run.train.batch_size

    def train_round(server_round: int, sampled: list[int], model: Any, task: Any, x_all: Any, y_all: Any,
                    train_idx: list[Any]) -> None:
        if not optimizers:
            optimizers.append(torch.optim.SGD(model.parameters(), lr=run.train.lr))
        optimizer = optimizers[0]
        orders = [client_order(args.seed, server_round, p, train_idx[p]) for p in sampled]
        model.train()
        for start in range(0, max(len(o) for o in orders), size):
            batch = torch.cat([o[start:start + size] for o in orders])
            optimizer.zero_grad(set_to_none=True)
            task.loss(model, (x_all[batch], y_all[batch])).backward()
            optimizer.step()

    return timed_rounds(args, run, train_round)


def fedsim_engine(args: argparse.Namespace, run: Any) -> dict[str, Any]:
    """(b)-(e): fedsim's Flower apps through ``run_federated`` on the chosen transport."""
    from fedsim.engines.common import RunContext
    from fedsim.engines.federated.engine import run_federated
    from fedsim.results import RunDir

    class TimedRunDir(RunDir):
        """Notes when each round's record is written (right after the round ends)."""

        logged: list[tuple[float, float, dict[str, Any]]] = []

        def log(self, record: dict[str, Any]) -> None:
            self.logged.append((time.perf_counter(), tree_cpu_s(), dict(record)))
            super().log(record)

    with tempfile.TemporaryDirectory() as tmp:
        out = TimedRunDir(tmp)
        started = time.perf_counter()
        summary = run_federated(run, RunContext(out=out))
        ended = time.perf_counter()
    rounds = [(t, r) for t, _, r in out.logged if r.get("round", 0) >= 1]
    cpu_marks = [c for _, c, r in out.logged]
    first_end, first = rounds[0]
    # CPU seconds of the process tree between consecutive round records (Ray actors included).
    round_cpu = [b - a for a, b in zip(cpu_marks, cpu_marks[1:], strict=False)]
    return {"startup_s": first_end - first["round_time_s"] - started,
            "round_times": [r["round_time_s"] for _, r in rounds], "round_cpu": round_cpu,
            "accuracy": summary["metrics"]["accuracy"], "run_s": ended - started,
            "teardown_s": ended - rounds[-1][0]}


def child_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    import fedsim.engines.federated.local.grid  # noqa: F401 - same imports (torch, flwr, fedsim) for every engine

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    run = run_config(args, args.child)
    runners = {"bare": bare_fedavg, "floor": compute_floor}
    result = runners.get(args.child, fedsim_engine)(args, run)
    print("RESULT " + json.dumps(result), flush=True)


# ---- the orchestrator ------------------------------------------------------------------------------
class TreeRSS(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.root_cmdline = self.root.cmdline()
        self.peak = 0
        self.cpu: dict[int, float] = {}  # pid -> last seen user + system seconds
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in procs:
                try:
                    if proc is not self.root and proc.cmdline() == self.root_cmdline:
                        # A fork that has not exec'd yet (subprocess starting `git` for the run's
                        # summary): its resident pages are the parent's, counted once already.
                        continue
                    total += proc.memory_info().rss
                    times = proc.cpu_times()
                    self.cpu[proc.pid] = times.user + times.system
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.stop.wait(0.05)


def run_child(args: argparse.Namespace, engine: str, clients: int, task: str, rounds: int, per_round: int,
              seed: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--clients", str(clients),
           "--task", task, "--rounds", str(rounds), "--per-round", str(per_round), "--seed", str(seed),
           "--lr", str(args.lr)]
    path = [str(REPO), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path)),
           "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    monitor = TreeRSS(proc.pid)
    monitor.start()
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the child's own process group: Ray's processes included
        proc.communicate()
        raise RuntimeError(f"{engine} with {clients} clients exceeded {args.timeout} s") from None
    finally:
        monitor.stop.set()
        monitor.join()
    wall = time.perf_counter() - started
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{engine} with {clients} clients failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    times = result["round_times"]
    cpu = result.get("round_cpu")
    result.update({"engine": engine, "clients": clients, "task": task, "seed": seed, "process_wall_s": wall,
                   "peak_rss_mb": monitor.peak / 2**20, "first_round_s": times[0],
                   "median_round_s": statistics.median(times[1:] if len(times) > 1 else times),
                   "median_round_cpu_s": statistics.median(cpu[1:] if len(cpu) > 1 else cpu) if cpu else None,
                   "total_cpu_s": sum(monitor.cpu.values()),
                   "load_average": os.getloadavg()[0]})
    return result


def median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["task"], r["clients"], r["engine"]), []).append(r)
    table = []
    for (task, clients, engine), rows in groups.items():
        table.append({"task": task, "clients": clients, "engine": engine, "repeats": len(rows),
                      **{k: median_of(rows, k) for k in ("process_wall_s", "run_s", "startup_s", "first_round_s",
                                                         "median_round_s", "median_round_cpu_s", "total_cpu_s",
                                                         "peak_rss_mb",
                                                         "accuracy", "load_average")}})
    checks = []

    def row(task: str, clients: int, engine: str) -> dict[str, Any] | None:
        return next((t for t in table if (t["task"], t["clients"], t["engine"]) == (task, clients, engine)), None)

    for task, clients in sorted({(t["task"], t["clients"]) for t in table}):
        bare, local = row(task, clients, "bare"), row(task, clients, "local")
        vec, flower = row(task, clients, "local_vectorised"), row(task, clients, "flower")
        where = f"{task}, {clients} clients"

        def check(name: str, value: float, op: str, target: float, where: str = where) -> None:
            ok = None if op == "info" else value <= target if op == "<=" else value >= target
            checks.append({"where": where, "target": name, "value": round(value, 3), "op": op, "goal": target,
                           "holds": ok})

        if bare and local:
            check("local / bare per round", local["median_round_s"] / bare["median_round_s"], "<=", 1.5)
            if bare["median_round_cpu_s"] and local["median_round_cpu_s"]:
                check("local / bare per round, CPU s (load-robust)",
                      local["median_round_cpu_s"] / bare["median_round_cpu_s"], "<=", 1.5)
            check("local / bare per round (stretch)", local["median_round_s"] / bare["median_round_s"], "<=", 1.2)
            check("local / bare peak RSS", local["peak_rss_mb"] / bare["peak_rss_mb"], "<=", 1.3)
        if local and flower:
            check("flower / local per round", flower["median_round_s"] / local["median_round_s"], ">=", 4.0)
            check("flower / local end to end", flower["process_wall_s"] / local["process_wall_s"], ">=", 3.0)
            check("flower / local per round, CPU s (load-robust)",
                  flower["median_round_cpu_s"] / local["median_round_cpu_s"], ">=", 4.0)
            check("flower / local end to end, CPU s (load-robust)",
                  flower["total_cpu_s"] / local["total_cpu_s"], ">=", 3.0)
        floor = row(task, clients, "floor")
        if flower and bare:  # context: no engine doing the bare loop's work beats the bare loop
            check("(context) flower / bare per round: the most 'flower / local' can be at local = bare",
                  flower["median_round_s"] / bare["median_round_s"], "info", 0.0)
        if floor and bare:
            check("(context) compute floor / bare per round: the least 'vectorised / bare' can be",
                  floor["median_round_s"] / bare["median_round_s"], "info", 0.0)
        if vec and bare and clients == 100:
            check("vectorised / bare per round", vec["median_round_s"] / bare["median_round_s"], "<=", 0.5)
            if bare["median_round_cpu_s"] and vec["median_round_cpu_s"]:
                check("vectorised / bare per round, CPU s (load-robust)",
                      vec["median_round_cpu_s"] / bare["median_round_cpu_s"], "<=", 0.5)
    return table, checks


def print_report(table: list[dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    header = ["model", "clients", "engine", "n", "wall s", "start-up s", "1st round s", "median round s",
              "round CPU s", "total CPU s", "peak RSS MB", "accuracy", "load avg"]
    rows = [[t["task"].split(":")[-1], str(t["clients"]), t["engine"], str(t["repeats"]), f"{t['process_wall_s']:.2f}",
             f"{t['startup_s']:.2f}", f"{t['first_round_s']:.3f}", f"{t['median_round_s']:.4f}",
             f"{t['median_round_cpu_s']:.4f}" if t["median_round_cpu_s"] is not None else "-",
             f"{t['total_cpu_s']:.1f}", f"{t['peak_rss_mb']:.0f}", f"{t['accuracy']:.4f}", f"{t['load_average']:.1f}"] for t in table]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print()
    for c in checks:
        if c["holds"] is None:
            print(f"INFO    {c['where']}: {c['target']} = {c['value']}")
            continue
        print(f"{'HOLDS' if c['holds'] else 'MISSES'}  {c['where']}: {c['target']} = {c['value']} "
              f"(target {c['op']} {c['goal']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=(*ENGINES, "local_pool"), help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=20, help=argparse.SUPPRESS)
    parser.add_argument("--task", default="bn_cnn", help=argparse.SUPPRESS)
    parser.add_argument("--per-round", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=20, help="rounds per run (default 20)")
    parser.add_argument("--lr", type=float, default=0.05, help="client SGD learning rate")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per engine and size (default 3)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 100], help="client counts (default 20 100)")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=(*ENGINES, "local_pool"))
    parser.add_argument("--wide-repeats", type=int, default=2, help="repeats of the ~11M model (0 = skip)")
    parser.add_argument("--wide-rounds", type=int, default=5, help="rounds of the ~11M model")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 1 repeat, 20 clients")
    parser.add_argument("--timeout", type=float, default=900.0, help="limit per engine run, seconds")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "federated_engines.json"))
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    if args.quick:
        args.rounds, args.repeats, args.sizes = 3, 1, [20]
        args.wide_repeats, args.wide_rounds = min(args.wide_repeats, 1), 2
    plan = [(engine, clients, "bn_cnn", args.rounds, 10, repeat)
            for repeat in range(args.repeats) for clients in args.sizes for engine in args.engines]
    plan += [(engine, 10, WIDE_TASK, args.wide_rounds, 5, repeat)
             for repeat in range(args.wide_repeats) for engine in args.engines]
    results = []
    for index, (engine, clients, task, rounds, per_round, repeat) in enumerate(plan, 1):
        result = run_child(args, engine, clients, task, rounds, per_round, seed=repeat)
        results.append(result)
        print(f"[{index}/{len(plan)}] {task} {clients} clients {engine} seed {repeat}: "
              f"wall {result['process_wall_s']:.1f} s, start-up {result['startup_s']:.2f} s, "
              f"median round {result['median_round_s']:.4f} s, peak RSS {result['peak_rss_mb']:.0f} MB, "
              f"accuracy {result['accuracy']:.3f}", flush=True)
    table, checks = summarise(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import platform

    payload = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                           "load_average_at_end": os.getloadavg()},
               "settings": {k: v for k, v in vars(args).items() if k != "child"}, "runs": results, "table": table,
               "checks": checks}
    out.write_text(json.dumps(payload, indent=2))
    print_report(table, checks)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

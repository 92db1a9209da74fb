"""Cost of the registered population: start-up, round time and memory as the number of clients grows.

Workload: FedProx's Synthetic(0.5, 0.5) (``fedprox_synthetic``, clients generated on demand from
(seed, k), natural partition so ``num_clients`` comes from the data), task ``logreg`` (610
parameters), FedAvg, cohorts of 10 and 100 clients per round, 5 rounds, ``federated.local_steps =
5`` with batch 10 (every sampled client does the same 5 SGD steps whatever its size), the central
test view made from 100 clients at every N, and ``federated.evaluate_clients`` = the cohort size
(one evaluation cohort after the last round). So the per-round and per-run work is the same at
every N = 10^2 .. 10^6 registered clients; only the population differs.

Engines: fedsim's in-process grid (``federated.engine = "local"``), ``--repeats`` interleaved
repeats (the order of the (N, cohort) cells alternates ascending / descending from one repeat to
the next, so that a drift of the machine's speed does not land on one end of the N axis); and
Flower's ``run_simulation`` on the same app (``federated.engine = "flower"``: Ray, 2 CPUs, one
CPU per client), for growing N until a run exceeds ``--flower-limit`` seconds or fails (recorded
with the phase it was in and why); ``--flower-repeats`` repeats (1 by default: Flower's runs are
long). A Flower size whose smaller cohort did not even reach round 1 within the limit is not run
for the larger cohort (the start-up does not depend on the cohort), and is recorded as such.

Every run is a fresh process (``benchmarks/population.py --one ...``, calling ``fedsim.run(...,
quiet=True)``), in its own process group, killed (the whole group, then any descendant left) when
its limit expires. The parent samples the RSS of the child's whole process tree every 50 ms (Ray's
raylet, GCS and workers included) and its CPU seconds. Definitions:

* start-up = from just before the child is spawned (interpreter start, imports, data, model, round-0
  evaluation, Ray and the discovery round for Flower) to the start of round 1 (the engine's
  ``round_started.json`` marker, timestamped in the child);
* median round = the median of the rounds' ``round_time_s`` (rounds 1..R of ``metrics.jsonl``; round 0
  is the initial evaluation record); round 1 also pays torch's lazy imports on the first optimiser
  step, so it is reported alone as ``first_round_s``;
* round CPU = CPU seconds (user + system) of the child and its descendants between a round's start
  marker and its record, median over the rounds;
* total CPU = CPU seconds of the whole tree for the run: the larger of the parent's
  ``RUSAGE_CHILDREN`` delta (exact for descendants that were waited for) and the sum of the last
  sampled times of every process seen (covers orphaned Ray processes); both are lower bounds;
* peak RSS = the larger of the sampled peak of the tree's summed RSS and the child's own
  ``ru_maxrss``.

Ratios vs N = 10^2 are ratios of medians over the repeats; their spread is the min / max of the
per-repeat ratios (repeat r at N against repeat r at 10^2, run minutes apart).

Run: ``python benchmarks/population.py`` (17 minutes on a shared 2-core CPU: ~10 minutes of local
runs, ~7 of Flower); ``--quick`` for a smoke run (1 repeat, N up to 10^4, Flower at 10^2 only;
writes ``population_quick.*``). Writes ``benchmarks/results/population.json``,
``benchmarks/results/population.png`` and prints a table (120 columns). ``--report-only`` redraws
the table, ratios, checks and plot from an existing JSON. Diagnostics (each writes its own file
under ``benchmarks/results/``): ``--profile N [--cohort C]`` runs one local child under cProfile
(``population_profile_1eK_cC.txt``: top functions, then every fedsim function with its call count,
so two sizes' files can be diffed); ``--diagnose --engine E --clients N --cohort C`` runs one child
and keeps its phase marks (``population_diag_*.json``); ``--shard-cache-ab --cohort C`` compares
N = 10^2, N = 10^2 with fedsim's client-data cache cut to 8 shards, and N = 10^6
(``population_shard_cache_ab_cC.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SIZES = (10**2, 10**3, 10**4, 10**5, 10**6)
COHORTS = (10, 100)
ALPHA = BETA = 0.5
LOCAL_STEPS, BATCH, LR = 5, 10, 0.01
CENTRAL_CLIENTS = 100
TARGET_RATIO, TARGET_STARTUP_S = 1.25, 10.0


# ---- one run (a child process) -----------------------------------------------------------------------
def tree_cpu_s() -> float:
    """CPU seconds (user + system) of this process (exact) and its live descendants (10 ms ticks)."""
    import psutil

    total = time.process_time()
    for proc in psutil.Process().children(recursive=True):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def run_dict(engine: str, clients: int, cohort: int, rounds: int, seed: int) -> dict[str, Any]:
    """The fedsim run: the same app, data and per-client work for both engines and every N."""
    return {
        "name": f"pop_{engine}_{clients}_{cohort}", "task": "logreg", "mode": "federated",
        "data": {"name": "fedprox_synthetic",
                 "options": {"alpha": ALPHA, "beta": BETA, "num_clients": clients, "central_clients": CENTRAL_CLIENTS}},
        "train": {"threads": 1, "progress": False, "checkpoint": False, "batch_size": BATCH, "lr": LR, "seed": seed},
        "federated": {"engine": engine, "partition": "natural", "clients_per_round": cohort, "rounds": rounds,
                      "local_steps": LOCAL_STEPS, "evaluate_clients": cohort, "strategy": "fedavg",
                      "cpus_per_client": 1.0},
    }


def mark(name: str, **extra: Any) -> None:
    """A progress line the parent reads even if the run is killed: which phase it reached, when."""
    print("MARK " + json.dumps({"name": name, "time": time.time(), **extra}), flush=True)


def child_main(args: argparse.Namespace) -> None:
    mark("main")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    torch.set_num_threads(1)
    import fedsim
    import fedsim.engines.federated.flower_app as flower_app
    import fedsim.engines.federated.rounds as rounds_module
    import fedsim.results

    mark("imported")
    starts: dict[int, tuple[float, float]] = {}
    logs: dict[int, tuple[float, float]] = {}

    original_write, original_log = flower_app.atomic_write_json, fedsim.results.RunDir.log

    def write_marker(path: Any, payload: Any, *a: Any, **k: Any) -> Any:
        if Path(path).name == "round_started.json":
            starts[int(payload["round"])] = (time.time(), tree_cpu_s())
            mark("round_start", round=int(payload["round"]))
        return original_write(path, payload, *a, **k)

    def timed_connect(where: str, original: Any) -> Any:
        """Marks around a node discovery (a message to every node on Flower's grid; none on fedsim's)."""
        def connect(*a: Any, **k: Any) -> Any:
            mark(f"{where}_start")
            result = original(*a, **k)
            mark(f"{where}_end")
            return result
        return connect

    def log(self: Any, record: dict[str, Any]) -> None:
        logs[int(record.get("round", -1))] = (time.time(), tree_cpu_s())
        original_log(self, record)

    flower_app.atomic_write_json = write_marker
    if args.shards_kept >= 0:  # diagnosis only (--shard-cache-ab): the client-data cache's size
        flower_app._SHARDS_KEPT = args.shards_kept
    # The ServerApp's start-up query (make_server_app) and the round loop's own (RoundLoop.connect).
    flower_app.connect_nodes = timed_connect("connect", flower_app.connect_nodes)
    rounds_module.connect_nodes = timed_connect("loop_connect", rounds_module.connect_nodes)
    fedsim.results.RunDir.log = log  # type: ignore[method-assign]

    config = run_dict(args.engine, args.clients, args.cohort, args.rounds, args.seed)
    with tempfile.TemporaryDirectory(prefix="fedsim-population-") as tmp:
        if args.cprofile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            summary = fedsim.run(config, out=tmp, quiet=True)[0]
            profiler.disable()
            with open(args.cprofile, "w") as fh:
                stats = pstats.Stats(profiler, stream=fh)
                stats.sort_stats("cumulative").print_stats(45)
                stats.sort_stats("tottime").print_stats(25)
                fh.write("\nEvery fedsim function, with its call count (diff two sizes' files to compare):\n")
                stats.sort_stats("cumulative").print_stats("/fedsim/")
        else:
            summary = fedsim.run(config, out=tmp, quiet=True)[0]
        ended = time.time()
        records = [json.loads(line) for line in next(Path(tmp).rglob("metrics.jsonl")).read_text().splitlines()
                   if line.strip()]
    rounds = [r for r in records if r.get("round", 0) >= 1]
    round_cpu = [logs[r["round"]][1] - starts[r["round"]][1] for r in rounds
                 if r["round"] in logs and r["round"] in starts]
    usage_self = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "round_times": [r["round_time_s"] for r in rounds], "round_cpu": round_cpu,
        "round_starts": {str(k): v[0] for k, v in starts.items()},
        "round0_logged": logs.get(0, (None,))[0], "ended": ended,
        "wall_time_s": summary.get("wall_time_s"), "engine_startup_s": summary.get("startup_s"),
        "accuracy": summary["metrics"].get("accuracy"), "samples_total": summary["metrics"].get("samples_total"),
        "clients_evaluated": summary["metrics"].get("clients_evaluated"),
        "versions": summary.get("versions"), "git_commit": summary.get("git_commit"),
        "self_maxrss_mb": usage_self.ru_maxrss / 1024, "self_cpu_s": usage_self.ru_utime + usage_self.ru_stime,
    }
    print("RESULT " + json.dumps(result), flush=True)


# ---- the orchestrator ------------------------------------------------------------------------------
class TreeSampler(threading.Thread):
    """Peak of the summed RSS of a process and its descendants, and each one's CPU seconds, every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.root_cmdline = self.root.cmdline()
        self.peak = 0
        self.cpu: dict[int, float] = {}
        self.seen: dict[int, Any] = {}
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
                    self.seen.setdefault(proc.pid, proc)
                    times = proc.cpu_times()
                    self.cpu[proc.pid] = times.user + times.system
                    if proc is not self.root and proc.cmdline() == self.root_cmdline:
                        continue  # a fork not yet exec'd (fedsim running `git`): its pages are the parent's
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.stop.wait(0.05)


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def kill_tree(proc: subprocess.Popen[str], sampler: TreeSampler) -> None:
    """The child's process group, then any descendant that left it (Ray daemons start new sessions)."""
    import psutil

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in sampler.seen.values():
        try:
            if p.is_running():
                p.kill()
        except psutil.Error:
            pass


def run_child(engine: str, clients: int, cohort: int, rounds: int, seed: int, limit: float,
              cprofile: str = "", shards_kept: int = -1) -> dict[str, Any]:
    """One measured run; never raises: a run that fails or runs out of time says so in ``status``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--engine", engine, "--clients", str(clients),
           "--cohort", str(cohort), "--rounds", str(rounds), "--seed", str(seed)]
    if cprofile:
        cmd += ["--cprofile", cprofile]
    if shards_kept >= 0:
        cmd += ["--shards-kept", str(shards_kept)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    row: dict[str, Any] = {"engine": engine, "clients": clients, "cohort": cohort, "seed": seed, "rounds": rounds,
                           "limit_s": limit, "load_average_before": os.getloadavg()[0]}
    cpu_before = children_cpu_s()
    spawned = time.time()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_tree(proc, sampler)
        stdout, stderr = proc.communicate()
    finally:
        sampler.stop.set()
        sampler.join()
    if not timed_out:
        kill_tree(proc, sampler)  # nothing should be left; Ray's stragglers would skew the next run
    wall = time.perf_counter() - started
    marks = [json.loads(line[5:]) for line in stdout.splitlines() if line.startswith("MARK ")]
    results = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    tree_cpu = max(children_cpu_s() - cpu_before, sum(sampler.cpu.values()))
    row.update({"process_wall_s": wall, "total_cpu_s": tree_cpu, "sampled_peak_rss_mb": sampler.peak / 2**20,
                "peak_rss_mb": sampler.peak / 2**20, "processes_seen": len(sampler.seen),
                "load_average_after": os.getloadavg()[0],
                "marks": {m["name"] + (str(m["round"]) if "round" in m else ""): m["time"] - spawned for m in marks}})
    phase = marks[-1]["name"] + (f" {marks[-1]['round']}" if "round" in marks[-1] else "") if marks else "spawn"
    if timed_out:
        row.update(status="timeout", phase=phase,
                   reason=f"exceeded the {limit:.0f} s limit (last phase reached: {phase} at "
                          f"{marks[-1]['time'] - spawned if marks else 0:.1f} s)")
        return row
    if proc.returncode != 0 or not results:
        tail = [line for line in stderr.strip().splitlines() if line.strip()][-3:]
        if proc.returncode in (-signal.SIGKILL, 137):
            why = f"killed by SIGKILL (out of memory?), peak tree RSS {sampler.peak / 2**20:.0f} MB"
        else:
            why = f"exit {proc.returncode}: {' | '.join(tail)[-400:]}"
        row.update(status="failed", phase=phase, reason=why, stderr_tail=stderr[-3000:])
        return row
    result = results[-1]
    times, cpu = result["round_times"], result["round_cpu"]
    round1 = result["round_starts"].get("1")
    row.update(status="ok", **{k: result[k] for k in ("wall_time_s", "engine_startup_s", "accuracy", "samples_total",
                                                        "clients_evaluated", "versions", "git_commit",
                                                        "self_maxrss_mb")})
    row.update({
        "peak_rss_mb": max(sampler.peak / 2**20, result["self_maxrss_mb"]),
        "startup_s": round1 - spawned if round1 is not None else None,
        "imports_s": row["marks"].get("imported"),
        "round0_logged_s": result["round0_logged"] - spawned if result["round0_logged"] else None,
        "round_times": times, "round_cpu": cpu, "first_round_s": times[0],
        "median_round_s": statistics.median(times),
        "median_round_after_first_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "median_round_cpu_s": statistics.median(cpu) if cpu else None,
        "after_rounds_s": result["ended"] - spawned - (round1 - spawned) - sum(times) if round1 else None,
    })
    return row


# ---- summary --------------------------------------------------------------------------------------
def spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault((r["engine"], r["cohort"], r["clients"]), []).append(r)
    table = []
    for (engine, cohort, clients), rows in sorted(cells.items(), key=lambda kv: (kv[0][0] != "local", *kv[0][1:])):
        ok = [r for r in rows if r["status"] == "ok"]
        bad = [r for r in rows if r["status"] != "ok"]
        entry: dict[str, Any] = {"engine": engine, "cohort": cohort, "clients": clients, "runs": len(rows),
                                 "ok": len(ok), "failures": [f"{r['status']}: {r['reason']}" for r in bad]}
        for key in ("startup_s", "imports_s", "median_round_s", "median_round_after_first_s", "median_round_cpu_s",
                    "first_round_s", "peak_rss_mb", "process_wall_s", "total_cpu_s", "load_average_before"):
            entry[key] = spread([r.get(key) for r in ok])
        table.append(entry)
    return table


def ratios(runs: list[dict[str, Any]], table: list[dict[str, Any]], base: int = 10**2) -> list[dict[str, Any]]:
    """Per engine, cohort and N: medians at N over medians at ``base``, with per-repeat spread."""
    out = []
    by_cell = {(t["engine"], t["cohort"], t["clients"]): t for t in table}
    for (engine, cohort, clients), cell in sorted(by_cell.items()):
        ref = by_cell.get((engine, cohort, base))
        if clients == base or ref is None or not cell["ok"] or not ref["ok"]:
            continue
        entry: dict[str, Any] = {"engine": engine, "cohort": cohort, "clients": clients}
        for key, name in (("median_round_s", "round_time"), ("median_round_cpu_s", "round_cpu"),
                          ("peak_rss_mb", "peak_rss"), ("startup_s", "startup")):
            if not cell[key] or not ref[key]:
                continue
            paired = []
            for r in runs:
                if (r["engine"], r["cohort"], r["clients"], r["status"]) != (engine, cohort, clients, "ok"):
                    continue
                twin = next((b for b in runs if (b["engine"], b["cohort"], b["clients"], b["seed"], b["status"])
                             == (engine, cohort, base, r["seed"], "ok")), None)
                if twin and twin.get(key) and r.get(key) is not None:
                    paired.append(r[key] / twin[key])
            entry[name] = {"ratio": cell[key]["median"] / ref[key]["median"],
                           "min": min(paired) if paired else None, "max": max(paired) if paired else None,
                           "pairs": len(paired)}
        out.append(entry)
    return out


def verdicts(table: list[dict[str, Any]], ratio_rows: list[dict[str, Any]], top: int,
             cohorts: list[int] | tuple[int, ...] = COHORTS) -> list[dict[str, Any]]:
    checks = []
    for cohort in cohorts:
        r = next((x for x in ratio_rows if (x["engine"], x["cohort"], x["clients"]) == ("local", cohort, top)), None)
        if r is None:
            checks.append({"target": f"cohort {cohort}: N = {top} vs 10^2", "holds": None,
                           "note": "no successful local runs at both sizes"})
            continue
        for key, label in (("round_time", "median round time (wall)"), ("round_cpu", "median round CPU s"),
                           ("peak_rss", "peak RSS")):
            if key not in r:
                continue
            v = r[key]
            checks.append({
                "target": f"local, cohort {cohort}: {label} at N = {top} / at N = 10^2 <= {TARGET_RATIO}",
                "value": v["ratio"], "min": v["min"], "max": v["max"], "holds": v["ratio"] <= TARGET_RATIO,
                "holds_in_every_repeat": v["max"] is not None and v["max"] <= TARGET_RATIO})
        cell = next(t for t in table if (t["engine"], t["cohort"], t["clients"]) == ("local", cohort, top))
        s = cell["startup_s"]
        checks.append({"target": f"local, cohort {cohort}: start-up at N = {top} < {TARGET_STARTUP_S} s",
                       "value": s["median"], "min": s["min"], "max": s["max"], "holds": s["median"] < TARGET_STARTUP_S,
                       "holds_in_every_repeat": s["max"] < TARGET_STARTUP_S})
    return checks


def exp10(n: int) -> str:
    e = len(str(n)) - 1
    return f"10^{e}" if n == 10**e else str(n)


def fmt(s: dict[str, float] | None, digits: int, spread_too: bool = True) -> str:
    if not s:
        return "–"
    if not spread_too or s["n"] == 1:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def print_report(table: list[dict[str, Any]], ratio_rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> str:
    from fedsim.results import print_table

    rows, failures = [], []
    for t in table:
        status = f"{t['ok']}/{t['runs']}"
        if t["failures"]:
            status = t["failures"][0].split(":")[0] if not t["ok"] else f"{status} !"
            failures += [f"  {t['engine']}, cohort {t['cohort']}, N = {exp10(t['clients'])}: {f}" for f in t["failures"]]
        rows.append([t["engine"], t["cohort"], exp10(t["clients"]), fmt(t["startup_s"], 2), fmt(t["median_round_s"], 3),
                     fmt(t["median_round_cpu_s"], 3), fmt(t["peak_rss_mb"], 0), fmt(t["process_wall_s"], 1, False),
                     fmt(t["total_cpu_s"], 1, False), status])
    text = print_table("Population scaling: medians (min–max over repeats)",
                       ["engine", "cohort", "N", "start-up s", "median round s", "round CPU s", "peak RSS MB",
                        "wall s", "CPU s", "runs"], rows, width=120, compact=True,
                       justify=["left", "right", "right", "right", "right", "right", "right", "right", "right",
                                "right"])
    lines = failures + ([""] if failures else [])
    for r in ratio_rows:
        parts = [f"{name} {v['ratio']:.2f}" + (f" ({v['min']:.2f}–{v['max']:.2f})" if v["min"] is not None else "")
                 for name, v in r.items() if isinstance(v, dict)]
        lines.append(f"  {r['engine']:6} cohort {r['cohort']:3} N {exp10(r['clients']):5} vs 10^2: " + ", ".join(parts))
    lines.append("")
    for c in checks:
        if c["holds"] is None:
            lines.append(f"  ?       {c['target']}: {c['note']}")
            continue
        every = "" if c["holds_in_every_repeat"] == c["holds"] else " (not in every repeat)"
        lines.append(f"  {'HOLDS ' if c['holds'] else 'MISSES'}  {c['target']}: {c['value']:.3f} "
                     f"(min {c['min']:.3f}, max {c['max']:.3f}){every}")
    print("\n".join(lines))
    return text + "\n".join(lines)


def plot(table: list[dict[str, Any]], runs: list[dict[str, Any]], path: Path, flower_limit: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedsim.results import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = (("median_round_s", "median round time (s)"), ("peak_rss_mb", "peak RSS of the process tree (MB)"),
              ("startup_s", "start-up: spawn → round 1 (s)"))
    styles = {("local", 10): ("C0", "o", "-"), ("local", 100): ("C1", "s", "-"),
              ("flower", 10): ("C2", "^", "--"), ("flower", 100): ("C3", "v", "--")}
    for ax, (key, label) in zip(axes, panels, strict=True):
        for (engine, cohort), (color, marker, line) in styles.items():
            cells = [t for t in table if (t["engine"], t["cohort"]) == (engine, cohort) and t[key]]
            if not cells:
                continue
            xs = [t["clients"] for t in cells]
            med = [t[key]["median"] for t in cells]
            lo = [m - t[key]["min"] for m, t in zip(med, cells, strict=True)]
            hi = [t[key]["max"] - m for m, t in zip(med, cells, strict=True)]
            name = "fedsim local" if engine == "local" else "Flower run_simulation"
            ax.errorbar(xs, med, yerr=[lo, hi], color=color, marker=marker, linestyle=line, capsize=3,
                        label=f"{name}, cohort {cohort}")
            stopped = [r for r in runs if (r["engine"], r["cohort"]) == (engine, cohort) and r["status"] != "ok"
                       and r["status"] != "skipped"]
            for r in stopped:  # start-up: it ran past the limit before round 1; elsewhere: at the last value
                y = r["limit_s"] if key == "startup_s" and r["status"] == "timeout" else med[-1]
                text = f"> {r['limit_s']:.0f} s" if key == "startup_s" and r["status"] == "timeout" else r["status"]
                ax.annotate(text, (r["clients"], y), color=color, fontsize=7,
                            textcoords="offset points", xytext=(0, 6 if cohort == 10 else -12), ha="center")
                ax.plot([r["clients"]], [y], marker="x", color=color, linestyle="none")
        if key == "startup_s":
            ax.axhline(TARGET_STARTUP_S, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("registered clients N")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="center right")
    fig.suptitle(f"logreg on Synthetic(0.5, 0.5), {LOCAL_STEPS} local steps × batch {BATCH}, medians with min–max; "
                 f"x = Flower run stopped (limit {flower_limit:.0f} s)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def machine() -> dict[str, Any]:
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    mem = 0
    try:
        mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))) // 1024
    except (OSError, StopIteration):
        pass
    commit = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import psutil

    return {"cores": os.cpu_count(), "cpu_model": model, "memory_mb": mem, "python": platform.python_version(),
            "platform": platform.platform(), "psutil": psutil.__version__, "git_head": commit,
            "load_average_at_start": os.getloadavg()}


# ---- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="local", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--cohort", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cprofile", default="", help=argparse.SUPPRESS)
    parser.add_argument("--shards-kept", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (default 5)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the local engine (default 5)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="registered clients N")
    parser.add_argument("--cohorts", type=int, nargs="+", default=list(COHORTS), help="clients per round")
    parser.add_argument("--local-limit", type=float, default=300.0, help="limit per local run, seconds")
    parser.add_argument("--flower-limit", type=float, default=300.0, help="limit per Flower run, seconds")
    parser.add_argument("--flower-repeats", type=int, default=1, help="Flower repeats (0 = skip Flower)")
    parser.add_argument("--flower-sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, N <= 10^4, Flower at 10^2")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="only profile one local run at N (cohort --cohort) with cProfile")
    parser.add_argument("--diagnose", action="store_true",
                        help="only run one child (--engine, --clients, --cohort; the engine's limit) and write its record")
    parser.add_argument("--shard-cache-ab", action="store_true",
                        help="only diagnose: N = 10^2 with fedsim's client-data cache (256 shards) cut to 8, "
                             "against 10^2 and 10^6 as they are (cohort --cohort, --repeats interleaved)")
    parser.add_argument("--report-only", action="store_true",
                        help="recompute the table, ratios, checks and plot from an existing JSON (no runs)")
    parser.add_argument("--out", default="", help="JSON path (default benchmarks/results/population.json)")
    args = parser.parse_args(argv)
    if args.one:
        child_main(args)
        return 0
    if args.report_only:
        return report_only(Path(args.out) if args.out else RESULTS / "population.json")
    if args.shard_cache_ab:
        return shard_cache_ab(args)
    if args.diagnose:
        limit = args.flower_limit if args.engine == "flower" else args.local_limit
        row = run_child(args.engine, args.clients, args.cohort, args.rounds, args.seed, limit)
        path = RESULTS / f"population_diag_{args.engine}_1e{len(str(args.clients)) - 1}_c{args.cohort}.json"
        path.write_text(json.dumps({"machine": machine(), "run": row}, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k not in ("versions", "stderr_tail")}, indent=1))
        print(f"wrote {path}")
        return 0 if row["status"] == "ok" else 1
    if args.profile:
        path = RESULTS / f"population_profile_1e{len(str(args.profile)) - 1}_c{args.cohort}.txt"
        row = run_child("local", args.profile, args.cohort, args.rounds, 0, args.local_limit, cprofile=str(path))
        print(json.dumps({k: v for k, v in row.items() if k not in ("versions",)}, indent=1))
        print(f"wrote {path}")
        return 0 if row["status"] == "ok" else 1
    if args.quick:
        args.repeats = 1
        args.sizes = [n for n in args.sizes if n <= 10**4]
        args.flower_sizes = [10**2]
    out = Path(args.out) if args.out else RESULTS / ("population_quick.json" if args.quick else "population.json")
    began = time.time()
    info = machine()
    runs: list[dict[str, Any]] = []
    payload: dict[str, Any] = {}

    def save(final: bool = False) -> None:
        table = summarise(runs)
        ratio_rows = ratios(runs, table)
        top = max(args.sizes)
        checks = verdicts(table, ratio_rows, top, args.cohorts) if final and 10**2 in args.sizes else []
        versions = next((r["versions"] for r in runs if r.get("versions")), {})
        payload.update({
            "machine": {**info, "load_average_at_end": os.getloadavg()},
            "versions": versions, "git_commit": next((r["git_commit"] for r in runs if r.get("git_commit")), ""),
            "settings": {**{k: v for k, v in vars(args).items() if k not in ("one", "engine", "clients", "cohort",
                                                                            "seed", "cprofile", "profile")},
                         "workload": {"task": "logreg", "data": "fedprox_synthetic", "alpha": ALPHA, "beta": BETA,
                                      "local_steps": LOCAL_STEPS, "batch_size": BATCH, "lr": LR,
                                      "central_clients": CENTRAL_CLIENTS, "evaluate_clients": "= cohort",
                                      "strategy": "fedavg", "threads": 1}},
            "elapsed_s": time.time() - began, "complete": final,
            "runs": [{k: v for k, v in r.items() if k not in ("versions", "git_commit")} for r in runs],
            "table": table, "ratios_vs_1e2": ratio_rows, "ratios_vs_1e3": ratios(runs, table, base=10**3),
            "checks": checks})
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(out)

    def report(index: int, total: int | str, r: dict[str, Any]) -> None:
        head = f"[{index}/{total}] {r['engine']} N={exp10(r['clients'])} cohort {r['cohort']} seed {r['seed']}:"
        if r["status"] == "ok":
            print(f"{head} start-up {r['startup_s']:.2f} s, median round {r['median_round_s']:.4f} s "
                  f"(CPU {r['median_round_cpu_s']:.4f}), peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"wall {r['process_wall_s']:.1f} s, load {r['load_average_before']:.1f}", flush=True)
        else:
            print(f"{head} {r['status']}: {r['reason']}", flush=True)

    # Local engine: interleaved repeats; the order of the cells alternates so drift does not favour an end.
    cells = [(n, c) for n in args.sizes for c in args.cohorts]
    plan = [(n, c, rep) for rep in range(args.repeats) for n, c in (cells if rep % 2 == 0 else cells[::-1])]
    for index, (n, c, rep) in enumerate(plan, 1):
        r = run_child("local", n, c, args.rounds, rep, args.local_limit)
        runs.append(r)
        report(index, len(plan), r)
        save()
    # Flower: growing N per cohort until a run exceeds the limit or fails.
    stopped: dict[int, dict[str, Any]] = {}
    for rep in range(args.flower_repeats):
        for n in sorted(args.flower_sizes):
            for c in args.cohorts:
                if c in stopped:
                    continue
                prior = next((r for r in runs if r["engine"] == "flower" and r["clients"] == n and r["seed"] == rep
                              and r["status"] == "timeout" and not r["marks"].get("round_start1")), None)
                if prior is not None:
                    r = {"engine": "flower", "clients": n, "cohort": c, "seed": rep, "rounds": args.rounds,
                         "status": "skipped", "limit_s": args.flower_limit,
                         "reason": f"not run: cohort {prior['cohort']} at the same N did not reach round 1 within "
                                   f"{args.flower_limit:.0f} s (start-up does not depend on the cohort)"}
                else:
                    r = run_child("flower", n, c, args.rounds, rep, args.flower_limit)
                runs.append(r)
                report(len(runs), "-", r)
                if r["status"] != "ok":
                    stopped[c] = r
                save()
        stopped = {}  # a later repeat walks the sizes again
    payload["flower_limit"] = flower_limits(runs, args.cohorts, args.flower_limit, args.flower_repeats)
    save(final=True)
    finish(payload, out)
    print(f"\n{(time.time() - began) / 60:.1f} min")
    return 0


def flower_limits(runs: list[dict[str, Any]], cohorts: list[int], limit: float, repeats: int) -> dict[str, Any]:
    """Per cohort: the largest N Flower finished within the limit, where it stopped and why."""
    stop = {}
    for c in cohorts if repeats else ():
        bad = [r for r in runs if r["engine"] == "flower" and r["cohort"] == c and r["status"] != "ok"]
        good = [r["clients"] for r in runs if r["engine"] == "flower" and r["cohort"] == c and r["status"] == "ok"]
        stop[str(c)] = {"largest_n_finished": max(good) if good else None,
                        "stopped_at": min(r["clients"] for r in bad) if bad else None,
                        "why": bad[0]["reason"] if bad else "every size finished within the limit",
                        "limit_s": limit, "repeats": repeats}
    return stop


def finish(payload: dict[str, Any], out: Path) -> None:
    """Print the table, ratios, checks and Flower's limit; write the JSON again with the report; plot."""
    text = print_report(payload["table"], payload["ratios_vs_1e2"], payload["checks"])
    top = max(payload["settings"]["sizes"])
    for r in payload.get("ratios_vs_1e3", []):  # N = 10^2 fits fedsim's client-data cache (256); 10^3 does not
        if r["clients"] == top:
            line = (f"  (context) {r['engine']} cohort {r['cohort']} N {exp10(top)} vs 10^3: " + ", ".join(
                f"{name} {v['ratio']:.2f}" + (f" ({v['min']:.2f}–{v['max']:.2f})" if v["min"] is not None else "")
                for name, v in r.items() if isinstance(v, dict)))
            print(line)
            text += "\n" + line
    for c, s in payload["flower_limit"].items():
        line = (f"  Flower, cohort {c}: finished up to N = {s['largest_n_finished']}; stopped at {s['stopped_at']}: "
                f"{s['why']}")
        print(line)
        text += "\n" + line
    payload["report_text"] = text
    out.write_text(json.dumps(payload, indent=1))
    plot(payload["table"], payload["runs"], out.with_suffix(".png"), payload["settings"]["flower_limit"])
    print(f"wrote {out} and {out.with_suffix('.png')}")


def shard_cache_ab(args: argparse.Namespace) -> int:
    """Is the round-time gap between N = 10^2 and larger N the client-data cache? At N <= 256 every client's
    generated data stay in ``flower_app._SHARDS_KEPT`` (256) after first use; at large N a sampled client
    is generated again each time. Cutting the cache to 8 at N = 10^2 makes it regenerate like N = 10^6."""
    variants = (("1e2", 10**2, -1), ("1e2, cache 8", 10**2, 8), ("1e6", 10**6, -1))
    runs = []
    for rep in range(args.repeats):
        for name, n, kept in (variants if rep % 2 == 0 else variants[::-1]):
            r = run_child("local", n, args.cohort, args.rounds, rep, args.local_limit, shards_kept=kept)
            r["variant"] = name
            runs.append(r)
            print(f"{name:14} seed {rep}: median round {r.get('median_round_s', float('nan')):.4f} s, CPU "
                  f"{r.get('median_round_cpu_s', float('nan')):.4f} s, peak RSS {r.get('peak_rss_mb', 0):.0f} MB",
                  flush=True)
    summary = {name: {key: spread([r.get(key) for r in runs if r["variant"] == name and r["status"] == "ok"])
                      for key in ("median_round_s", "median_round_cpu_s", "peak_rss_mb")} for name, _, _ in variants}
    for name, cell in summary.items():
        print(f"{name:14} round {fmt(cell['median_round_s'], 3)} s, CPU {fmt(cell['median_round_cpu_s'], 3)} s, "
              f"RSS {fmt(cell['peak_rss_mb'], 0)} MB")
    path = RESULTS / f"population_shard_cache_ab_c{args.cohort}.json"
    path.write_text(json.dumps({"machine": machine(), "cohort": args.cohort, "summary": summary,
                                "runs": [{k: v for k, v in r.items() if k != "versions"} for r in runs]}, indent=1))
    print(f"wrote {path}")
    return 0


def report_only(out: Path) -> int:
    payload = json.loads(out.read_text())
    settings, runs = payload["settings"], payload["runs"]
    payload["table"] = summarise(runs)
    payload["ratios_vs_1e2"] = ratios(runs, payload["table"])
    payload["ratios_vs_1e3"] = ratios(runs, payload["table"], base=10**3)
    payload["checks"] = verdicts(payload["table"], payload["ratios_vs_1e2"], max(settings["sizes"]),
                                 settings["cohorts"])
    payload["flower_limit"] = flower_limits(runs, settings["cohorts"], settings["flower_limit"],
                                            settings["flower_repeats"])
    finish(payload, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

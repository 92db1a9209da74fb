"""fedsim against peer FL simulators on one workload: accuracy agreement, round time, start-up, RSS, CPU.

Engines (each run a fresh child process, watched by ``federated_engines.TreeRSS``):
  bare          plain PyTorch FedAvg loop, the reference (fedsim's venv);
  fedsim_run    fedsim's own path: ``run_federated`` on peers_engines/peers_fedsim_task.py (fedsim's ClientApp
                and strategies, local engine);
  fedsim_vec    the same with vectorised clients (``federated.vectorise``: a round's clients trained at once
                with ``torch.func``);
  direct        the Flower app below with no engine: its ServerApp calls the ClientApp directly
                (peers_engines/direct_floor.py), the floor for running that app unchanged;
  fedsim_local  a plain Flower app (peers_engines/flower_app: stock ``flwr.serverapp.strategy.FedAvg``)
                run by fedsim's in-process local engine (``fedsim flower-run --engine local``);
  fedsim_pool   the same with 2 worker processes (``--workers 2``: clients in parallel, replies in order);
  flower        the same app on Flower's ``run_simulation`` (``--engine flower``, Ray);
  pfl           Apple pfl 0.6 (own venv);
  flgo          FLGo 0.4.4 (own venv, installed --no-deps next to torch 2.13 CPU);
  blazefl       BlazeFL 2.0.3 (own venv; 3.0 needs Python 3.14, which this machine lacks).

Workload: fedsim's digits split (stratified, standardised), IID clients less their local hold-out,
``DigitsCNN`` (25,730 parameters, no BatchNorm; peers_engines/peers_workload.py, torch only, imported by
every engine), FedAvg weighted by examples, 1 local epoch, batch 32, SGD lr 0.1, server-side test
accuracy each round, one torch thread per process. The parent writes one .npz per configuration with
what fedsim's own run of it computes (see :func:`make_workload`): the split, the partition, the
per-round client schedule, each sampled client's batch order and the initial weights, so every engine
computes the same FedAvg up to float summation order; an engine "matches" when its test accuracy is
within 1e-4 of bare's in every round.

Measured per run: accuracy history, steady round time (median of rounds 2..R, round = train the
sampled clients + aggregate + evaluate), end-to-end wall of the child process (interpreter start,
imports and teardown included), start-up (child process start to the first client call, wall
clock), peak RSS of the process tree, CPU seconds of the tree. Ratios are medians over repeats,
divided by bare's.

Peer venvs live in ``${FEDSIM_PEERS_DIR:-~/.cache/fedsim-peers}/<engine>``, made on first use with
Python 3.11 and torch==2.13.0 (CPU) unless ``--venv ENGINE=DIR`` (or FEDSIM_PEERS_VENV_<ENGINE>)
points at an existing one; ``--no-install`` skips engines whose venv is missing. An engine whose
venv cannot be built or whose run fails is recorded as skipped with the reason.

Run: ``python benchmarks/peers.py --quick`` (1 repeat, 20 and 100 clients, 3 rounds), or
``python benchmarks/peers.py`` (5 interleaved repeats, four configurations, 10 rounds). Writes
benchmarks/results/peers.json and peers.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ENGINES_DIR = REPO / "benchmarks" / "peers_engines"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(ENGINES_DIR))
sys.path.insert(0, str(REPO / "benchmarks"))  # by path: a site-packages 'benchmarks' package may shadow ours

from federated_engines import TreeRSS  # noqa: E402

ENGINES = ("bare", "direct", "fedsim_run", "fedsim_vec", "fedsim_local", "fedsim_pool", "flower", "pfl", "flgo", "blazefl")
PEERS = ("pfl", "flgo", "blazefl")
LABELS = {"bare": "bare PyTorch", "direct": "the Flower app, no engine (direct-call floor)",
          "fedsim_run": "fedsim run (own ClientApp and strategies)",
          "fedsim_vec": "fedsim run, vectorised clients", "fedsim_local": "fedsim local engine",
          "fedsim_pool": "fedsim local engine, 2 worker processes", "flower": "Flower run_simulation",
          "pfl": "pfl 0.6", "flgo": "FLGo 0.4.4", "blazefl": "BlazeFL 2.0.3 (3.0 needs Python 3.14)"}
CONFIGS = ((20, 10), (100, 10), (1000, 10), (1000, 100))
TORCH = "torch==2.13.0"
FLGO_DEPS = ["tqdm", "scipy", "matplotlib", "prettytable", "ujson", "pynvml", "pyyaml", "networkx", "requests",
             "toolz"]
INSTALL = {  # after `python3.11 -m venv V && V/bin/pip install torch==2.13.0` (see /tmp/peers/REPORT.md)
    "pfl": [["pfl[pytorch]==0.6.*"]],
    "flgo": [["--no-deps", "flgo==0.4.4"], FLGO_DEPS],  # FLGo's unpinned torch would pull a CUDA build
    "blazefl": [["numpy>=2.3.1", "tqdm"], ["--no-deps", "--ignore-requires-python", "blazefl==2.0.3"]],
}
SMOKE = {"pfl": "import pfl.algorithm, pfl.model.pytorch", "flgo": "import flgo, flgo.algorithm.fedbase",
         "blazefl": "import blazefl.contrib"}


# ---- the workload ------------------------------------------------------------------------------------
def make_workload(path: Path, clients: int, per_round: int, rounds: int, seed: int = 0) -> None:
    """fedsim's own run of DigitsCNN on digits, written down for every engine to replay (one .npz).

    The split (fedsim's digits train/test), each client's training indices (fedsim's IID partition
    less its local hold-out), the clients of each round (fedsim's keyed sampling), each client's batch
    order in each round (fedsim's keyed permutation) and the seeded initial weights are exactly what
    ``fedsim run`` computes for ``peers_fedsim_task``, so fedsim's own path needs no replay at all.
    """
    import argparse as _argparse

    import numpy as np
    import peers_fedsim_task as pft
    from federated_engines import client_order, plain_setup

    from fedsim.engines.federated.rounds import sample_clients

    args = _argparse.Namespace(clients=clients, seed=seed)
    _, split, model, train_idx = plain_setup(args, pft.run_config(clients, per_round, rounds, seed))
    x_train, y_train = split.train.tensors  # type: ignore[attr-defined]
    x_test, y_test = split.test.tensors  # type: ignore[attr-defined]
    arrays: dict[str, Any] = {
        "x_train": x_train.reshape(len(x_train), -1).numpy(), "y_train": y_train.numpy().astype(np.int64),
        "x_test": x_test.reshape(len(x_test), -1).numpy(), "y_test": y_test.numpy().astype(np.int64),
        "meta": np.array([clients, per_round, rounds, seed]), "sizes": np.array([len(p) for p in train_idx])}
    for cid, part in enumerate(train_idx):
        arrays[f"part_{cid}"] = part.numpy()
    for r in range(1, rounds + 1):
        sampled = sample_clients(seed, r, clients, per_round)
        arrays[f"sampled_{r}"] = np.array(sampled)
        for cid in sampled:
            arrays[f"order_{r}_{cid}"] = client_order(seed, r, cid, train_idx[cid]).numpy()
    for key, value in model.state_dict().items():
        arrays[f"init/{key}"] = value.numpy().copy()
    np.savez(path, **arrays)


# ---- peer venvs --------------------------------------------------------------------------------------
def peers_dir() -> Path:
    return Path(os.environ.get("FEDSIM_PEERS_DIR", "~/.cache/fedsim-peers")).expanduser()


def venv_python(engine: str, args: argparse.Namespace) -> Path:
    """The peer's interpreter; builds its venv on first use. Raises RuntimeError(reason) if it cannot."""
    given = args.venv.get(engine) or os.environ.get(f"FEDSIM_PEERS_VENV_{engine.upper()}")
    venv = Path(given).expanduser() if given else peers_dir() / engine
    python = venv / "bin" / "python"
    stamp = venv / ".fedsim-peers-ok"
    if given or stamp.exists():
        if not python.exists():
            raise RuntimeError(f"no interpreter at {python}")
        return python
    if args.no_install:
        raise RuntimeError(f"venv {venv} missing and --no-install given")
    base = shutil.which(args.python)
    if base is None:
        raise RuntimeError(f"no {args.python} to build the venv with")
    log = venv.parent / f"{engine}-install.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    if venv.exists():
        shutil.rmtree(venv)
    print(f"building the {engine} venv in {venv} (log {log}) ...", flush=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write(TORCH + "\n")
    steps = [[base, "-m", "venv", str(venv)], [*pip, TORCH]]
    steps += [[*pip, *extra, "-c", constraints.name] for extra in INSTALL[engine]]
    steps += [[str(python), "-W", "ignore", "-c", SMOKE[engine]]]
    with open(log, "w") as out:
        for step in steps:
            out.write("$ " + " ".join(step) + "\n")
            out.flush()
            try:
                done = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"install step timed out: {' '.join(step)}") from None
            if done.returncode != 0:
                tail = log.read_text()[-600:]
                raise RuntimeError(f"install step failed ({' '.join(step[-3:])}): ...{tail}")
    os.unlink(constraints.name)
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    stamp.write_text(freeze)
    return python


# ---- one engine run ----------------------------------------------------------------------------------
def command(engine: str, python: Path | None, workload: Path, out: Path) -> list[str]:
    if engine == "bare":
        return [sys.executable, str(ENGINES_DIR / "bare.py"), str(workload), str(out)]
    if engine in ("fedsim_run", "fedsim_vec"):
        return [sys.executable, str(ENGINES_DIR / "peers_fedsim_task.py"), str(workload), str(out),
                *(["--vectorise"] if engine == "fedsim_vec" else [])]
    if engine in ("fedsim_local", "fedsim_pool", "flower", "direct"):
        mode = {"fedsim_local": "local", "fedsim_pool": "pool", "flower": "flower", "direct": "direct"}[engine]
        return [sys.executable, str(ENGINES_DIR / "flower_app_child.py"), mode, str(workload), str(out)]
    assert python is not None
    return [str(python), "-W", "ignore", str(ENGINES_DIR / f"{engine}_engine.py"), str(workload), str(out)]


def run_engine(engine: str, python: Path | None, workload: Path, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
               "RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        if engine in PEERS:  # fedsim's path must not leak into a peer's interpreter
            env.pop("PYTHONPATH")
            env.pop("VIRTUAL_ENV", None)
        started_epoch, started = time.time(), time.perf_counter()
        proc = subprocess.Popen(command(engine, python, workload, out), cwd=tmp, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        monitor = TreeRSS(proc.pid)
        monitor.start()
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group (Ray's processes included)
            proc.communicate()
            raise RuntimeError(f"exceeded {timeout:.0f} s") from None
        finally:
            monitor.stop.set()
            monitor.join()
            try:  # leftovers of the child's group (a Ray raylet that outlived the driver)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wall = time.perf_counter() - started
        if proc.returncode != 0 or not out.exists():
            last = next((line for line in reversed(output.splitlines()) if line.strip()), "")
            raise RuntimeError(f"exit {proc.returncode}: {last}\n...{output[-1500:]}")
        result = json.loads(out.read_text())
        weights_file = out.with_suffix(".npz")
        if weights_file.exists():
            import numpy as np

            with np.load(weights_file) as z:
                result["weights"] = {k: z[k].copy() for k in z.files}
    times = result["round_times"]
    first = result.get("first_call_epoch")
    return {"accuracy": result["accuracy"], "round_times": times, "weights": result.get("weights"),
            "steady_round_s": statistics.median(times[1:] if len(times) > 1 else times),
            "first_round_s": times[0], "process_wall_s": wall,
            "startup_s": first - started_epoch if first is not None else None,
            "peak_rss_mb": monitor.peak / 2**20, "cpu_s": sum(monitor.cpu.values())}


# ---- summary, table, plot ----------------------------------------------------------------------------
METRICS = ("steady_round_s", "process_wall_s", "startup_s", "peak_rss_mb", "cpu_s")


def summarise(runs: list[dict[str, Any]], skipped: dict[str, str], engines: list[str],
              configs: list[tuple[int, int]]) -> list[dict[str, Any]]:
    rows = []
    for clients, per_round in configs:
        here = [r for r in runs if (r["clients"], r["per_round"]) == (clients, per_round)]
        bare_acc = next((r["accuracy"] for r in here if r["engine"] == "bare"), None)
        medians: dict[str, dict[str, float | None]] = {}
        for engine in engines:
            mine = [r for r in here if r["engine"] == engine and "error" not in r]
            errors = [r["error"] for r in here if r["engine"] == engine and "error" in r]
            row: dict[str, Any] = {"engine": engine, "label": LABELS[engine], "clients": clients,
                                   "per_round": per_round, "repeats": len(mine)}
            if not mine:
                row["skipped"] = skipped.get(engine) or (errors[0] if errors else "not run")
                rows.append(row)
                continue
            row["accuracy"] = mine[0]["accuracy"]
            if bare_acc is not None:
                diffs = [max(abs(a - b) for a, b in zip(r["accuracy"], bare_acc, strict=True)) for r in mine]
                row["max_acc_diff"] = max(diffs)
                row["matches_bare"] = max(diffs) <= 1e-4
            weight_diffs = [r["max_weight_diff"] for r in mine if r.get("max_weight_diff") is not None]
            row["max_weight_diff"] = max(weight_diffs) if weight_diffs else None
            for key in METRICS:
                values = [r[key] for r in mine if r.get(key) is not None]
                row[key] = statistics.median(values) if values else None
            medians[engine] = {k: row[k] for k in METRICS}
            rows.append(row)
        base = medians.get("bare")
        for row in rows[-len(engines):]:
            if base and row["engine"] in medians:
                row["ratio_to_bare"] = {k: (row[k] / base[k] if row[k] is not None and base[k] else None)
                                        for k in METRICS}
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(rows: list[dict[str, Any]]) -> str:
    from fedsim.results import print_table

    columns = ["clients", "engine", "n", "acc last", "= bare", "|dw|", "round ms", "x bare", "wall s", "x bare",
               "start s", "RSS MB", "x bare", "CPU s", "x bare"]
    table = []
    for row in rows:
        where = f"{row['clients']}/{row['per_round']}"
        if "skipped" in row:
            table.append([where, row["engine"], "0", "-", "skipped", *["-"] * 10])
            continue
        ratio = row.get("ratio_to_bare", {})
        same = "-" if "matches_bare" not in row else ("yes" if row["matches_bare"] else f"NO {row['max_acc_diff']:.0e}")
        table.append([where, row["engine"], str(row["repeats"]), f"{row['accuracy'][-1]:.4f}", same,
                      _fmt(row.get("max_weight_diff"), ".0e"),
                      _fmt(row["steady_round_s"] and row["steady_round_s"] * 1e3, ".1f"),
                      _fmt(ratio.get("steady_round_s"), ".2f"), _fmt(row["process_wall_s"], ".2f"),
                      _fmt(ratio.get("process_wall_s"), ".2f"), _fmt(row["startup_s"], ".2f"),
                      _fmt(row["peak_rss_mb"], ".0f"), _fmt(ratio.get("peak_rss_mb"), ".2f"),
                      _fmt(row["cpu_s"], ".1f"), _fmt(ratio.get("cpu_s"), ".2f")])
    justify = ["left", "left", *["right"] * 13]
    text = print_table("Peers: same FedAvg workload (clients/per round); medians; x bare = ratio to bare; "
                       "= bare: test accuracy within 1e-4 of bare every round; |dw|: max final-weight difference",
                       columns, table, width=120, justify=justify, compact=True)
    reasons = {(row["engine"], row["skipped"].splitlines()[0][:200]) for row in rows if "skipped" in row}
    for engine, reason in sorted(reasons):
        line = f"skipped {engine}: {reason}"
        print(line)
        text += line + "\n"
    return text


def plot(rows: list[dict[str, Any]], engines: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r["clients"], r["per_round"]) for r in rows}, key=lambda c: (c[0], c[1]))
    panels = [("steady_round_s", "steady round (s)"), ("startup_s", "start-up (s)"),
              ("peak_rss_mb", "peak RSS of the tree (MB)"), ("cpu_s", "CPU seconds of the tree")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    width = 0.8 / len(engines)
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, engine in enumerate(engines):
            values = []
            for c in configs:
                row = next((r for r in rows if (r["clients"], r["per_round"]) == c and r["engine"] == engine), {})
                values.append(row.get(key) or 0.0)
            ax.bar([j + i * width for j in range(len(configs))], values, width, label=engine)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))], [f"{c}/{p}" for c, p in configs])
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("clients / per round")
    axes[0].legend(fontsize=8)
    fig.suptitle("Same FedAvg workload on fedsim and peer simulators (medians; missing bar = skipped)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------------
def parse_venvs(items: list[str]) -> dict[str, str]:
    venvs = {}
    for item in items:
        engine, _, path = item.partition("=")
        if engine not in PEERS or not path:
            raise SystemExit(f"--venv wants ENGINE=DIR with ENGINE in {', '.join(PEERS)}: {item!r}")
        venvs[engine] = path
    return venvs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 20/10 and 100/10, 3 rounds")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per run (default 10)")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--configs", nargs="+", default=[f"{c}x{p}" for c, p in CONFIGS],
                        help="CLIENTSxPER_ROUND (default: 20x10 100x10 1000x10 1000x100)")
    parser.add_argument("--venv", action="append", default=[], metavar="ENGINE=DIR",
                        help="use an existing venv for a peer (also FEDSIM_PEERS_VENV_<ENGINE>)")
    parser.add_argument("--no-install", action="store_true", help="skip peers whose venv is missing")
    parser.add_argument("--python", default="python3.11", help="interpreter for new peer venvs")
    parser.add_argument("--timeout", type=float, default=900.0, help="limit per engine run, seconds")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "peers.json"))
    args = parser.parse_args(argv)
    args.venv = parse_venvs(args.venv)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs]
    if args.quick:
        args.repeats, args.rounds, configs = 1, 3, list(CONFIGS[:2])
    engines = list(args.engines)

    pythons: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for engine in engines:
        if engine in PEERS:
            try:
                pythons[engine] = venv_python(engine, args)
            except RuntimeError as exc:
                skipped[engine] = f"venv: {exc}"
                print(f"skipping {engine}: {exc}", flush=True)

    runs: list[dict[str, Any]] = []
    bare_weights: dict[tuple[int, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="peers-workload-") as tmp:
        workloads = {}
        for clients, per_round in configs:
            workloads[(clients, per_round)] = Path(tmp) / f"workload_{clients}_{per_round}.npz"
            make_workload(workloads[(clients, per_round)], clients, per_round, args.rounds)
        plan = [(repeat, c, e) for repeat in range(args.repeats) for c in configs for e in engines if e not in skipped]
        for index, (repeat, (clients, per_round), engine) in enumerate(plan, 1):
            record: dict[str, Any] = {"engine": engine, "clients": clients, "per_round": per_round, "repeat": repeat}
            try:
                record.update(run_engine(engine, pythons.get(engine), workloads[(clients, per_round)], args.timeout))
                weights = record.pop("weights", None)
                if engine == "bare" and weights is not None:
                    bare_weights[(clients, per_round)] = weights
                reference = bare_weights.get((clients, per_round))
                if weights is not None and reference is not None:
                    record["max_weight_diff"] = max(float(abs(weights[k] - reference[k]).max()) for k in reference)
                note = (f"steady round {record['steady_round_s'] * 1e3:.1f} ms, wall {record['process_wall_s']:.1f} s, "
                        f"RSS {record['peak_rss_mb']:.0f} MB, acc {record['accuracy'][-1]:.4f}")
            except RuntimeError as exc:
                record["error"] = str(exc)
                note = "FAILED: " + str(exc).splitlines()[0][:200]
            record["load_average"] = os.getloadavg()[0]
            runs.append(record)
            print(f"[{index}/{len(plan)}] {clients}/{per_round} {engine} repeat {repeat}: {note}", flush=True)

    rows = summarise(runs, skipped, engines, configs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform(), "load_average_at_end": os.getloadavg()},
               "settings": {"repeats": args.repeats, "rounds": args.rounds, "configs": configs, "engines": engines,
                            "quick": args.quick, "lr": 0.1, "batch": 32, "local_epochs": 1,
                            "model": "DigitsCNN (25,730 parameters, no BatchNorm)", "match_tolerance": 1e-4},
               "labels": LABELS, "venvs": {k: str(v) for k, v in pythons.items()}, "skipped": skipped,
               "runs": runs, "summary": rows}
    out.write_text(json.dumps(payload, indent=2))
    print_report(rows)
    png = out.with_suffix(".png")
    plot(rows, engines, png)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

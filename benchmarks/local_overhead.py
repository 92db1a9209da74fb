"""What fedsim's local engine adds per client call, against calling the same ClientApp directly.

Three ways to deliver the same messages to the same ClientApp, in one process, interleaved:

  direct        ``peers_engines/direct_floor.DirectGrid``: the ClientApp called on each message, no engine;
  direct_lazy   the same with fedsim's zero-copy arrays installed (``flower_private.zero_copy_arrays``);
  local         fedsim's ``LocalGrid`` (node bookkeeping, a copy of each message's records, seeded
                generators per call, reply copies and ids; zero-copy arrays on, as in ``run_local``).

Two ClientApps: ``echo`` replies with the arrays it got (no decoding: the engine's cost alone) and
``decode`` loads them into tensors and replies with ``ArrayRecord(state_dict)`` (what a PyTorch
Flower app does, so the array path's cost shows). Two models: the peers benchmark's DigitsCNN
(8 arrays, 25,730 parameters) and a wide one (8 arrays, 4.2M parameters): a cost that grows with
bytes shows as a difference between them. Two populations (100 and 1,000,000 nodes): a cost
that grows with the population shows as a difference between them.

Per call = (time of ``send_and_receive`` of K messages) / K, median over rounds and interleaved repeats.
Run: ``python benchmarks/local_overhead.py`` (about a minute); writes benchmarks/results/local_overhead.json
and .png and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks" / "peers_engines"))

MODES = ("direct", "direct_lazy", "local")
APPS = ("echo", "decode")


def model_state(kind: str) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    if kind == "cnn":
        from peers_workload import DigitsCNN

        torch.manual_seed(0)
        return DigitsCNN().state_dict()
    widths = [(64, 1024), (1024, 2048), (2048, 1024), (1024, 10)]  # ~4.2M parameters in 8 arrays
    state = {}
    for i, (n_in, n_out) in enumerate(widths):
        state[f"fc{i}.weight"] = torch.randn(n_out, n_in, generator=generator)
        state[f"fc{i}.bias"] = torch.randn(n_out, generator=generator)
    return state


def client_app(app: str) -> Any:
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Any) -> Message:
        arrays = msg.content["arrays"]
        if app == "decode":
            state = arrays.to_torch_state_dict()
            arrays = ArrayRecord({k: v + 0 if v.is_floating_point() else v for k, v in state.items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    return client


def make_grid(mode: str, app: Any, population: int) -> tuple[Any, Any]:
    """The grid and a function partition -> node id."""
    from fedsim.wire import flower_private as fp

    if mode == "local":
        from fedsim.engines.federated.local.grid import LocalGrid

        grid = LocalGrid(app, population, {}, seed=0)
        grid.set_run(fp.make_run(grid.run_id))
        return grid, grid.node_map().node_of
    from direct_floor import DirectGrid

    grid = DirectGrid(app, population, {})
    return grid, lambda p: p + 1


def measure(mode: str, app_name: str, model: str, population: int, per_round: int, rounds: int) -> list[float]:
    """Per-call seconds of each round."""
    from contextlib import nullcontext

    from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict

    from fedsim.wire import flower_private as fp

    app = client_app(app_name)
    grid, node_of = make_grid(mode, app, population)
    lazy = fp.zero_copy_arrays() if mode in ("direct_lazy", "local") else nullcontext()
    per_call = []
    with fp.task_identity(run_id=getattr(grid, "run_id", 1)), lazy:
        arrays = ArrayRecord(model_state(model))
        stride = max(1, population // per_round)
        for server_round in range(1, rounds + 1):
            # One RecordDict for every message, as Flower's strategies send it.
            content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
            nodes = [node_of((server_round + i * stride) % population) for i in range(per_round)]
            messages = [grid.create_message(content, MessageType.TRAIN, node, str(server_round)) for node in nodes]
            started = time.perf_counter()
            replies = list(grid.send_and_receive(messages))
            per_call.append((time.perf_counter() - started) / per_round)
            assert len(replies) == per_round and not any(r.has_error() for r in replies), mode
            arrays = replies[0].content["arrays"]
    return per_call[1:]  # the first round pays lazy imports and cache fills


def main(argv: list[str] | None = None) -> int:
    import torch

    from fedsim.results import print_table

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 3 rounds")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "local_overhead.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.rounds = 1, 3
    cases = [(app, model, population) for app in APPS for model in ("cnn", "wide") for population in (100, 1_000_000)]
    samples: dict[tuple[str, str, str, int], list[float]] = {}
    for _ in range(args.repeats):
        for app, model, population in cases:
            for mode in MODES:  # interleaved: every mode of a case back to back, every repeat
                samples.setdefault((mode, app, model, population), []).extend(
                    measure(mode, app, model, population, args.per_round, args.rounds))
    rows, table = [], []
    for app, model, population in cases:
        medians = {mode: statistics.median(samples[(mode, app, model, population)]) for mode in MODES}
        spread = {mode: (min(samples[(mode, app, model, population)]), max(samples[(mode, app, model, population)]))
                  for mode in MODES}
        added = medians["local"] - medians["direct_lazy"]
        rows.append({"app": app, "model": model, "population": population, "per_call_s": medians,
                     "spread_s": spread, "local_minus_direct_lazy_s": added,
                     "local_minus_direct_s": medians["local"] - medians["direct"]})
        table.append([app, model, f"{population:,}", *(f"{medians[m] * 1e6:.0f}" for m in MODES),
                      f"{added * 1e6:+.0f}", f"{(medians['local'] - medians['direct']) * 1e6:+.0f}"])
    columns = ["app", "model", "nodes", "direct µs", "direct+lazy µs", "local µs", "local − direct+lazy",
               "local − direct"]
    print_table("Per client call (median µs): fedsim's local engine vs calling the ClientApp directly", columns,
                table, width=120, justify=["left", "left", *["right"] * 6], compact=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform(), "load_average_at_end": os.getloadavg()},
               "settings": vars(args), "rows": rows}
    out.write_text(json.dumps(payload, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.2))
    labels = [f"{r['app']}\n{r['model']}\n{r['population']:.0e}" for r in rows]
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        ax.bar([j + i * width for j in range(len(rows))], [r["per_call_s"][mode] * 1e6 for r in rows], width,
               label=mode)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], labels, fontsize=8)
    ax.set_ylabel("µs per client call (median)")
    ax.set_yscale("log")
    ax.set_title("Per-call cost: direct calls, direct + zero-copy arrays, fedsim's local engine")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

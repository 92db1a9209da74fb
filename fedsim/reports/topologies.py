"""The table and plots of ``experiments/topologies.toml`` (``[report] kind = "topologies"``).

One row per run: final test accuracy (gossip: the mean over nodes, and the averaged model's),
communication rounds, the bytes one node sends plus receives per round and over the whole run,
and wall time. Traffic is what each engine measures where it does (parameter server, gossip,
Flower's message payloads) and, for DDP, the standard ring all-reduce volume of the gradients.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from fedsim.checkpoint import atomic_write_json
from fedsim.config import Experiment, RunConfig
from fedsim.results import format_mean_std, plot_curves, print_table

__all__ = ["report_topologies", "traffic"]

MB = 1e6


def _param_bytes(run: RunConfig) -> tuple[int, int]:
    """(bytes of the trainable parameters, number of training samples) of the run's model."""
    from fedsim.engines.common import build_model, load_task_data

    task, split = load_task_data(run)
    model = build_model(task, split, run, torch.device("cpu"))
    return sum(p.numel() * p.element_size() for p in model.parameters()), len(split.train)


def traffic(run: RunConfig, summary: dict[str, Any]) -> tuple[float, float, float]:
    """(communication rounds per node, bytes per round per node, bytes per node) sent + received."""
    if "communication" in summary:  # parameter server and gossip measure their own
        comm = summary["communication"]
        return comm["rounds_per_node"], comm["bytes_per_round_per_node"], comm["bytes_per_node"]
    if run.mode == "central":
        return 0.0, 0.0, 0.0
    if run.mode == "federated":
        # Round 0 (the initial model's evaluation) moves no arrays: count the training rounds only.
        history = [h for h in summary.get("history") or [] if h.get("round", 0) >= 1 and "bytes_down" in h]
        clients = run.federated.num_clients
        per_round = [(h["bytes_down"] + h["bytes_up"]) / max(len(h.get("clients") or [1]), 1) for h in history]
        total = history[-1].get("bytes_total", 0.0) / clients if history else 0.0
        return float(len(history)), sum(per_round) / max(len(per_round), 1), total
    if run.mode == "ddp":
        # Ring all-reduce: each rank sends and receives 2 (W-1)/W of the gradient bytes per step.
        params, n_train = _param_bytes(run)
        world = run.ddp.nproc * run.ddp.nnodes
        steps = summary.get("steps") or run.train.epochs * math.ceil(n_train / (world * run.train.batch_size))
        per_step = 4 * (world - 1) / world * params
        return float(steps), per_step, per_step * steps
    return float("nan"), float("nan"), float("nan")


def _data(run: RunConfig) -> str:
    if run.mode == "federated":
        cfg: Any = run.federated
        name = cfg.partition
    elif run.mode == "decentralized":
        cfg = run.decentralized
        name = cfg.partition
    elif run.mode == "parameter_server":
        cfg = run.parameter_server
        name = cfg.shards
    else:
        return "all"
    return f"dirichlet({cfg.alpha:g})" if name == "dirichlet" else name


def _topology(run: RunConfig) -> str:
    if run.mode == "decentralized":
        return f"gossip {run.decentralized.topology} ({run.decentralized.nodes} nodes)"
    if run.mode == "parameter_server":
        return f"parameter server {run.parameter_server.variant} ({run.parameter_server.workers} workers)"
    if run.mode == "federated":
        return f"{run.federated.strategy} ({run.federated.num_clients} clients)"
    if run.mode == "ddp":
        return f"ddp all-reduce ({run.ddp.nproc * run.ddp.nnodes} ranks)"
    return run.mode


def _curve(summary: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Test accuracy after each round / epoch (gossip: mean over nodes)."""
    xs, ys = [], []
    for record in summary.get("history") or []:
        if record.get("kind", "epoch") != "epoch" or "test_accuracy" not in record:
            continue
        xs.append(record.get("round", record.get("epoch")))
        ys.append(record["test_accuracy"])
    return xs, ys


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def report_topologies(experiment: Experiment, summaries: list[dict[str, Any]], root: Path) -> None:
    """Print the topology table (mean ± std over seeds), write it as JSON, plot accuracy vs round.

    Two panels (PNG files): runs on iid data (with the central and DDP references) and runs on
    Dirichlet data; each curve is the mean over seeds.
    """
    runs = {run.name: run for run in experiment.runs}
    groups: dict[str, list[dict[str, Any]]] = {}
    for summary in summaries:
        groups.setdefault(summary["name"], []).append(summary)
    rows, table = [], []
    for name, group in groups.items():
        run = runs[name]
        traffic_rows = [traffic(run, s) for s in group]
        rounds, per_round, total = (sum(t[i] for t in traffic_rows) / len(group) for i in range(3))
        accuracy = [s["metrics"].get("accuracy") for s in group]
        averaged = [s["metrics"].get("avg_model_accuracy") for s in group]
        walls = [s.get("launch_wall_time_s", s["wall_time_s"]) for s in group]
        # Start-up before the first step: Ray actors (parameter server) or torchrun + imports (DDP).
        startups = [s.get("startup_s") if run.mode == "parameter_server" else
                    s["launch_wall_time_s"] - s["wall_time_s"] if "launch_wall_time_s" in s else None for s in group]
        row = {"run": name, "topology": _topology(run), "data": _data(run), "seeds": [s["seed"] for s in group],
               "accuracy": accuracy, "avg_model_accuracy": averaged, "rounds": rounds,
               "mb_per_round_per_node": per_round / MB, "mb_per_node": total / MB, "wall_s": walls,
               "startup_s": startups}
        table.append(row)
        accuracy_values = [a for a in accuracy if a is not None]
        averaged_values = [a for a in averaged if a is not None]
        rows.append([name, row["topology"], row["data"], len(group),
                     format_mean_std(accuracy_values) if accuracy_values else "-",
                     format_mean_std(averaged_values) if averaged_values else "-", int(rounds),
                     row["mb_per_round_per_node"], row["mb_per_node"], _mean(walls),
                     "-" if _mean(startups) is None else _mean(startups)])
    print_table(f"{experiment.name}: test accuracy (mean ± std over seeds), traffic per node (sent + received), "
                "wall time", ["run", "topology", "data", "seeds", "accuracy", "avg-model acc", "rounds",
                              "MB/round/node", "MB/node", "wall s", "of which start-up s"], rows)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "topologies_table.json", table)
    for panel, wanted in (("iid", ("iid", "strided")), ("dirichlet", ("dirichlet",))):
        series = {}
        for name, group in groups.items():
            data = _data(runs[name])
            if data != "all" and data.split("(")[0] not in wanted:
                continue
            curves = [_curve(s) for s in group]
            xs = curves[0][0]
            if xs and all(c[0] == xs for c in curves):
                series[name] = (xs, [sum(c[1][i] for c in curves) / len(curves) for i in range(len(xs))])
        if series:
            plot_curves(series, root / f"accuracy_vs_round_{panel}.png", xlabel="round (= one pass over the data)",
                        ylabel="test accuracy (gossip: mean over nodes)",
                        title=f"{experiment.name}: {panel} data (mean over seeds)")

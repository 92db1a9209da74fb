"""``fedsim partitions EXPERIMENT.toml``: who holds which labels, as a table and a PNG heat map.

For every federated run of the experiment (at its first seed), the partition its clients would
train on — fedsim's partitioners, the data's natural clients (LEAF users, a client column) or a
Flower Datasets partitioner: per-client label counts, sizes and the label skew (mean
total-variation distance of a client's label mix from the global one). Many clients or classes
(natural partitions have thousands) give a summary of the size distribution instead of one row per
client, and the heat map shows the first clients. Runs with the same partition settings are shown once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config import Experiment, RunConfig, load_experiment, run_with_seed
from fedsim.data.partition import label_counts, label_skew, partition_labels
from fedsim.errors import FedsimError
from fedsim.results import print_table, save_figure

__all__ = ["partition_report", "heat_map"]


def _settings(run: RunConfig) -> tuple[Any, ...]:
    fed = run.federated
    return (run.task, repr(run.task_options), repr(run.data), run.train.seed, fed.num_clients, fed.partition,
            fed.alpha if fed.partition in ("dirichlet", "quantity_skew") else None,
            fed.shards_per_client if fed.partition == "shards" else None,
            (fed.partitioner, repr(fed.partitioner_options)) if fed.partition == "flwr" else None)


MAX_ROWS, MAX_CLASSES = 30, 20
"""Beyond these, a partition is summarised (size distribution) rather than listed client by client."""


def describe(run: RunConfig) -> str:
    """The partition in words: ``dirichlet(alpha=0.1)``, ``natural``, ``flwr DirichletPartitioner(alpha=0.5)``."""
    fed = run.federated
    if fed.partition in ("dirichlet", "quantity_skew"):
        return f"{fed.partition}(alpha={fed.alpha:g})"
    if fed.partition == "flwr":
        options = ", ".join(f"{k}={v}" for k, v in fed.partitioner_options.items())
        return f"flwr {fed.partitioner}({options})"
    return fed.partition


def size_summary(sizes: np.ndarray) -> list[Any]:
    """min, 10th percentile, median, mean, 90th percentile and max of the clients' sizes."""
    if not len(sizes):
        return [0, "0", "0", "0.0", "0", 0]
    q = np.percentile(sizes, [10, 50, 90])
    return [int(sizes.min()), f"{q[0]:.0f}", f"{q[1]:.0f}", f"{sizes.mean():.1f}", f"{q[2]:.0f}", int(sizes.max())]


def heat_map(counts: np.ndarray, path: Path, title: str) -> Path:
    """Clients x classes heat map of sample counts (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * counts.shape[1] + 2), max(3.0, 0.28 * counts.shape[0] + 1.5)))
    image = ax.imshow(counts, aspect="auto", cmap="viridis")
    ax.set_xlabel("class")
    ax.set_ylabel("client (partition id)")
    ax.set_xticks(range(counts.shape[1]))
    ax.set_yticks(range(counts.shape[0]))
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="samples")
    fig.tight_layout()
    return save_figure(fig, path)


def partition_report(experiment: Experiment | str | Path, out: str | Path = "results",
                     overrides: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Print each distinct partition of the experiment's federated runs; write one heat map each."""
    from fedsim.engines.common import load_task_data
    from fedsim.engines.federated.flower_app import client_partition

    if not isinstance(experiment, Experiment):
        experiment = load_experiment(experiment, overrides)
    runs = [r for r in experiment.runs if r.mode == "federated"]
    if not runs:
        raise FedsimError(f"{experiment.source}: no run with mode = \"federated\"")
    seen: dict[tuple[Any, ...], str] = {}
    reports = []
    for run in runs:
        if experiment.seeds:
            run = run_with_seed(run, experiment.seeds[0])
        key = _settings(run)
        if key in seen:
            print(f"{run.name}: same partition as {seen[key]}")
            continue
        seen[key] = run.name
        task, split = load_task_data(run)
        parts = client_partition(run, task, split)
        labels = partition_labels(split.train.tensors[1])  # type: ignore[attr-defined]
        counts = label_counts(labels, parts, max(split.info.num_classes, 1))
        skew = label_skew(labels, parts)
        title = (f"{experiment.name} / {run.name}: {describe(run)}, {len(parts)} clients, seed {run.train.seed}, "
                 f"label skew {skew:.3f}")
        sizes = counts.sum(axis=1)
        if len(parts) <= MAX_ROWS and counts.shape[1] <= MAX_CLASSES:
            columns = ["client", "samples", *[str(c) for c in range(counts.shape[1])]]
            rows = [[p, int(counts[p].sum()), *[int(v) for v in counts[p]]] for p in range(len(parts))]
        else:
            classes_held = (counts > 0).sum(axis=1)
            columns = ["clients", "samples", "min", "p10", "median", "mean", "p90", "max", "classes/client (median)"]
            rows = [[len(parts), int(sizes.sum()), *size_summary(sizes), f"{np.median(classes_held):.0f}"]]
        print_table(title, columns, rows, width=120)
        shown = counts[:40]  # a readable heat map: the first clients
        path = heat_map(shown, Path(out) / experiment.name / f"partitions-{run.name}.png",
                        title + ("" if len(counts) <= 40 else f" (first 40 of {len(counts)} clients)"))
        print(f"wrote {path}")
        reports.append({"run": run.name, "counts": counts, "skew": skew, "png": path})
    return reports

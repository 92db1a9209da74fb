"""``fedsim partitions EXPERIMENT.toml``: who holds which labels, as a table and a PNG heat map.

For every federated run of the experiment (at its first seed), the partition its clients would
train on: per-client label counts, sizes and the label skew (mean total-variation distance of a
client's label mix from the global one). Runs with the same partition settings are shown once.
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
            fed.shards_per_client if fed.partition == "shards" else None)


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
        fed = run.federated
        title = (f"{experiment.name} / {run.name}: {fed.partition}"
                 + (f"(alpha={fed.alpha:g})" if fed.partition in ("dirichlet", "quantity_skew") else "")
                 + f", {fed.num_clients} clients, seed {run.train.seed}, label skew {skew:.3f}")
        columns = ["client", "samples", *[str(c) for c in range(counts.shape[1])]]
        rows = [[p, int(counts[p].sum()), *[int(v) for v in counts[p]]] for p in range(len(parts))]
        print_table(title, columns, rows)
        path = heat_map(counts, Path(out) / experiment.name / f"partitions-{run.name}.png", title)
        print(f"wrote {path}")
        reports.append({"run": run.name, "counts": counts, "skew": skew, "png": path})
    return reports

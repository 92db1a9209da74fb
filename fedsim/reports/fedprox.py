"""Report of ``experiments/fedprox_synthetic.toml``: FedProx's Figure 1 at small scale.

Registered as ``report.kind = "fedprox"`` in :data:`fedsim.experiment.REPORTS`. Runs are described
by their resolved config — the data set (Synthetic(alpha, beta)), the straggler fraction and what
stragglers do (``federated.straggler_work``), the algorithm (FedAvg; FedProx and its ``proximal_mu``) —
and grouped by run name (seeds give mean ± std). Writes into the experiment folder:

* ``table.md`` / ``table.json``: per run, the global model's final loss and accuracy on the training
  data (the union of the devices' training parts: the paper's Figure 1 metric; computed from the final
  model when the run is in memory) and on the test data (the union of their held-out parts), the lowest
  test loss over rounds, and two stability measures of the test-loss curve: the mean absolute change
  from one round to the next, and the number of rounds in which it went up;
* ``loss_synthetic_<alpha>_<beta>.png``: per data set, test loss and test accuracy per round, one
  line per algorithm, one row per straggler fraction;
* ``fedprox_synthetic.png``: test loss per round, rows = straggler fractions, columns = data sets
  (the layout of the paper's Figure 1, which plots the training loss).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from fedsim.checkpoint import atomic_write_text
from fedsim.config import RunConfig, from_dict
from fedsim.results import markdown_table, mean_std, print_table, save_figure

__all__ = ["PAPER_CLAIM", "report_fedprox", "fedprox_rows", "describe"]

PAPER_CLAIM = (
    "Li et al. (MLSys 2020), section 5.2 and Figure 1 (training loss, Synthetic data, 200 rounds): letting "
    "stragglers contribute partial work (FedProx, mu = 0) already converges better than dropping them "
    "(FedAvg) under systems heterogeneity, and the proximal term (mu > 0) makes convergence more stable, "
    "most visibly on the most heterogeneous data (Synthetic(1,1)) and with 90 % stragglers, where FedAvg "
    "oscillates or diverges."
)
"""The claim the table is read against (a paraphrase of the paper)."""

COLUMNS = ["data", "stragglers", "algorithm", "seeds", "train loss", "train acc", "test loss", "test acc",
           "min test loss", "mean abs Δ test loss", "rounds loss ↑"]
TERMINAL = ["data", "strag.", "algorithm", "seeds", "train loss", "train acc", "test loss", "test acc",
            "min test", "mean |Δ|", "rounds ↑"]
"""The terminal's headers (the table fits 120 columns; data sets and algorithms are abbreviated there)."""


def describe(config: dict[str, Any]) -> tuple[str, float, str]:
    """(data set, straggler fraction, algorithm) of a run from its resolved config."""
    options = config.get("data", {}).get("options", {})
    if options.get("iid", False):
        data = "Synthetic-IID"
    else:
        data = f"Synthetic({float(options.get('alpha', 0.0)):g},{float(options.get('beta', 0.0)):g})"
    fed = config.get("federated", {})
    fraction = float(fed.get("straggler_fraction", 0.0))
    partial = fed.get("straggler_work", "drop") == "partial"
    strategy = str(fed.get("strategy", "fedavg"))
    if strategy == "fedprox":
        mu = float(fed.get("strategy_options", {}).get("proximal_mu", 0.0))
        algorithm = f"FedProx (μ={mu:g})"
    else:
        algorithm = {"fedavg": "FedAvg"}.get(strategy, strategy)
    if fraction > 0:
        algorithm += ", partial work" if partial else ", stragglers dropped"
    elif algorithm == "FedAvg":
        algorithm = "FedAvg = FedProx (μ=0)"  # without stragglers, the same algorithm
    return data, fraction, algorithm


def _curve(group: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Rounds and the mean over seeds of ``key`` (rounds every seed recorded)."""
    per_seed = [{h["round"]: float(h[key]) for h in s.get("history") or [] if key in h} for s in group]
    rounds = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
    return rounds, [sum(c[r] for c in per_seed) / len(per_seed) for r in rounds]


def _train_scores(summary: dict[str, Any], cache: dict[str, Any]) -> dict[str, float]:
    """The final global model's loss and accuracy on the training split (needs the in-memory model)."""
    model = summary.get("model")
    if model is None:
        return {}
    from fedsim.engines.common import load_task_data

    run = from_dict(RunConfig, summary["config"], "<summary>")
    key = json.dumps([run.task, summary["config"].get("data"), run.train.seed], sort_keys=True, default=str)
    if key not in cache:
        cache[key] = load_task_data(run)
    task, split = cache[key]
    model.eval()
    with torch.no_grad():
        return {k: float(v) for k, v in task.evaluate(model, split.train, run.train.eval_batch_size).items()}


def _stat(values: list[float]) -> tuple[float, float, int] | None:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return (*mean_std(values), len(values)) if values else None


def fedprox_rows(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run name: what it is, the (mean, std, n) over seeds of each measure, and its curves."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for summary in summaries:
        groups.setdefault(summary["name"], []).append(summary)
    cache: dict[str, Any] = {}
    rows = []
    for name, group in groups.items():
        data, fraction, algorithm = describe(group[0].get("config", {}))
        row: dict[str, Any] = {"run": name, "data": data, "stragglers": fraction, "algorithm": algorithm,
                               "seeds": len(group)}
        train = [_train_scores(s, cache) for s in group]
        row["train_loss"] = _stat([t["loss"] for t in train if "loss" in t])
        row["train_accuracy"] = _stat([t["accuracy"] for t in train if "accuracy" in t])
        row["test_loss"] = _stat([s["metrics"].get("loss", math.nan) for s in group])
        row["test_accuracy"] = _stat([s["metrics"].get("accuracy", math.nan) for s in group])
        mins, changes, rises = [], [], []
        for summary in group:
            losses = [float(h["test_loss"]) for h in summary.get("history") or [] if "test_loss" in h]
            steps = [b - a for a, b in zip(losses, losses[1:], strict=False)]
            mins.append(min(losses) if losses else math.nan)
            changes.append(sum(abs(d) for d in steps) / len(steps) if steps else math.nan)
            rises.append(float(sum(d > 0 for d in steps)))
        row["min_test_loss"], row["mean_abs_change"], row["rounds_up"] = _stat(mins), _stat(changes), _stat(rises)
        row["curves"] = {key: _curve(group, f"test_{key}") for key in ("loss", "accuracy")}
        rows.append(row)
    return rows


def _fmt(stat: tuple[float, float, int] | None, digits: int = 3) -> str:
    if stat is None:
        return "-"
    mean, std, n = stat
    return f"{mean:.{digits}f}" if n < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def report_fedprox(experiment: Any, summaries: list[dict[str, Any]], root: Path) -> None:
    """Print and write the table, the per-data-set plots and the Figure-1-style grid."""
    rows = sorted(fedprox_rows(summaries), key=lambda r: (r["data"], r["stragglers"]))
    table = [[r["data"], f"{100 * r['stragglers']:.0f} %", r["algorithm"], r["seeds"], _fmt(r["train_loss"]),
              _fmt(r["train_accuracy"]), _fmt(r["test_loss"]), _fmt(r["test_accuracy"]), _fmt(r["min_test_loss"]),
              _fmt(r["mean_abs_change"], 4), _fmt(r["rounds_up"], 1)] for r in rows]
    seeds = max((r["seeds"] for r in rows), default=0)
    short = [[row[0].replace("Synthetic", "Syn"), row[1], _short(row[2]), *row[3:]] for row in table]
    print_table(f"{experiment.name}: final global model (mean ± std over {seeds} seed(s))", TERMINAL, short,
                width=120, compact=True)
    print(f"paper: {PAPER_CLAIM}", flush=True)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "table.md", markdown_table(COLUMNS, table) + f"\nPaper: {PAPER_CLAIM}\n")
    atomic_write_text(root / "table.json", json.dumps(
        [{k: v for k, v in r.items() if k != "curves"} | {"test_loss_curve": r["curves"]["loss"]} for r in rows],
        indent=1) + "\n")
    for data in dict.fromkeys(r["data"] for r in rows):
        _plot_dataset([r for r in rows if r["data"] == data], root / f"loss_{_slug(data)}.png", data)
    _plot_grid(rows, root / "fedprox_synthetic.png", experiment.name)


def _short(algorithm: str) -> str:
    return algorithm.replace(" = FedProx (μ=0)", " = μ=0").replace("FedProx (μ=", "FedProx μ=").replace(
        "), partial work", " partial").replace(")", "").replace(", stragglers dropped", " drop")


def _slug(data: str) -> str:
    return data.lower().replace("(", "_").replace(")", "").replace(",", "_").replace("-", "_").replace(".", "")


_STYLE = {"FedAvg": ("tab:blue", "-"), "FedProx (μ=0)": ("tab:orange", "--"), "FedProx (μ=1)": ("tab:green", "-")}


def _style(algorithm: str) -> tuple[str, str]:
    return next((style for prefix, style in _STYLE.items() if algorithm.startswith(prefix)), ("tab:gray", ":"))


def _plot_dataset(rows: list[dict[str, Any]], path: Path, data: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({r["stragglers"] for r in rows})
    fig, axes = plt.subplots(len(fractions), 2, figsize=(10, 3.4 * len(fractions)), squeeze=False)
    for i, fraction in enumerate(fractions):
        for j, key in enumerate(("loss", "accuracy")):
            ax = axes[i][j]
            for r in (r for r in rows if r["stragglers"] == fraction):
                xs, ys = r["curves"][key]
                color, line = _style(r["algorithm"])
                ax.plot(xs, ys, color=color, linestyle=line, label=r["algorithm"])
            ax.set_title(f"{data}, {100 * fraction:.0f} % stragglers", fontsize=9)
            ax.set_xlabel("round")
            ax.set_ylabel(f"test {key} (global model)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def _plot_grid(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["data"] for r in rows))
    fractions = sorted({r["stragglers"] for r in rows})
    fig, axes = plt.subplots(len(fractions), len(datasets), figsize=(4.2 * len(datasets), 3.2 * len(fractions)),
                             squeeze=False, sharex=True)
    for i, fraction in enumerate(fractions):
        for j, data in enumerate(datasets):
            ax = axes[i][j]
            for r in (r for r in rows if r["stragglers"] == fraction and r["data"] == data):
                xs, ys = r["curves"]["loss"]
                color, line = _style(r["algorithm"])
                ax.plot(xs, ys, color=color, linestyle=line, label=r["algorithm"].split(",")[0])
            ax.set_title(f"{data}, {100 * fraction:.0f} % stragglers", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(fractions) - 1:
                ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel("test loss (global model)")
                ax.legend(fontsize=7)
    fig.suptitle(f"{title}: FedAvg drops stragglers, FedProx aggregates their partial work", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)

"""Central vs federated: the comparison table and the accuracy-vs-round plot.

Used two ways: as the ``central_vs_federated`` experiment report (``report.kind``, called by
``fedsim run`` after the runs) and by ``fedsim compare RESULTS_DIR`` on finished runs (it reads
every ``summary.json`` under the folder). Runs are grouped by name; each group's seeds give the
mean ± std.

Columns: final and best accuracy; rounds until the global model first reaches 90% of the
central run's final accuracy; bytes communicated (model arrays down and up); samples processed
(the budget); wall time; and the worst 10% of clients' accuracy on their own held-out data.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.checkpoint import atomic_write_json, atomic_write_text
from fedsim.errors import FedsimError
from fedsim.results import format_mean_std, markdown_table, mean_std, print_table, save_figure

__all__ = ["load_summaries", "comparison", "write_comparison", "report", "COLUMNS"]

COLUMNS = ["run", "mode", "strategy", "partition", "seeds", "final {m}", "best {m}", "rounds to 90% central",
           "MB sent", "samples", "wall s", "worst-10% client {m}"]
TERMINAL = {"run": "run", "strategy": "strategy", "partition": "partition", "final {m}": "final {m}",
            "rounds to 90% central": "to 90% central", "MB sent": "MB sent", "samples": "samples",
            "worst-10% client {m}": "worst-10% client"}
"""The columns printed on the terminal (under their short headers), so the table fits 120 columns;
``comparison.md`` and ``comparison.json`` keep every column (mode, seeds, best, wall time)."""


def load_summaries(root: str | Path) -> list[dict[str, Any]]:
    """Every ``summary.json`` under ``root`` (sorted by path)."""
    root = Path(root)
    if not root.is_dir():
        raise FedsimError(f"results folder {root} does not exist")
    summaries = []
    for path in sorted(root.rglob("summary.json")):
        summary = json.loads(path.read_text())
        summary.setdefault("folder", path.parent.name)
        summaries.append(summary)
    if not summaries:
        raise FedsimError(f"no summary.json under {root} (run `fedsim run EXPERIMENT.toml` first)")
    return summaries


def _groups(summaries: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for summary in summaries:
        groups.setdefault(summary["name"], []).append(summary)
    return groups


def _central_samples_per_epoch(summary: dict[str, Any]) -> int:
    """Training-set size of a central run (its samples per epoch), from its own config."""
    from fedsim.config import RunConfig, from_dict
    from fedsim.engines.common import load_task_data

    config = {k: v for k, v in summary["config"].items() if k != "source"}
    run = from_dict(RunConfig, config, "summary.json")
    _, split = load_task_data(run)
    return len(split.train)  # type: ignore[arg-type]


def _curve(summary: dict[str, Any], metric: str) -> tuple[list[float], list[float], list[float]]:
    """(step index, samples processed so far, metric) per round/epoch of a run."""
    key = f"test_{metric}"
    history = [h for h in summary.get("history", []) if key in h]
    if summary["mode"] == "federated":
        return ([float(h["round"]) for h in history], [float(h.get("samples_total", 0.0)) for h in history],
                [float(h[key]) for h in history])
    per_epoch = summary.get("_samples_per_epoch", 0)
    return ([float(h["epoch"]) for h in history], [float(h["epoch"] * per_epoch) for h in history],
            [float(h[key]) for h in history])


def _label(summary: dict[str, Any]) -> tuple[str, str]:
    if summary["mode"] != "federated":
        return "-", "-"
    fed = summary["config"]["federated"]
    part = fed["partition"]
    if part in ("dirichlet", "quantity_skew"):
        part = f"{part}({fed['alpha']:g})"
    elif part == "shards":
        part = f"shards({fed['shards_per_client']})"
    options = fed.get("strategy_options") or {}
    short = {"proximal_mu": "mu", "server_learning_rate": "lr_g", "server_momentum": "m"}
    strategy = fed["strategy"] + (" " + ", ".join(f"{short.get(k, k)}={v}" for k, v in options.items())
                                  if options else "")
    return strategy, part


def _rounds(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.1f}" if len(values) < 2 else f"{mean:.1f} ± {std:.1f}"


def _seconds(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.1f}" if len(values) < 2 else f"{mean:.1f} ± {std:.1f}"


def comparison(summaries: Sequence[dict[str, Any]], metric: str = "accuracy") -> dict[str, Any]:
    """Rows of the comparison table (numbers and their formatted text) and the curves to plot."""
    groups = _groups(summaries)
    central = [s for s in summaries if s["mode"] == "central"]
    for summary in central:
        if "_samples_per_epoch" not in summary:
            summary["_samples_per_epoch"] = _central_samples_per_epoch(summary)
    central_final = [s["metrics"][metric] for s in central if metric in s["metrics"]]
    threshold = 0.9 * mean_std(central_final)[0] if central_final else math.nan
    rows, numbers, curves = [], [], {}
    for name, group in groups.items():
        first = group[0]
        strategy, partition = _label(first)
        finals = [s["metrics"][metric] for s in group if metric in s["metrics"]]
        bests, reach, sent, samples, worst = [], [], [], [], []
        for summary in group:
            steps, seen, values = _curve(summary, metric)
            if values:
                bests.append(max(values[1:] or values) if summary["mode"] == "federated" else max(values))
            if summary["mode"] == "federated" and not math.isnan(threshold):
                hit = [step for step, value in zip(steps, values, strict=True) if step > 0 and value >= threshold]
                reach.append(hit[0] if hit else math.inf)
            metrics = summary["metrics"]
            if "bytes_total" in metrics:
                sent.append(metrics["bytes_total"] / 1e6)
            if metrics.get("samples_total"):
                samples.append(metrics["samples_total"])
            elif summary["mode"] == "central" and seen:
                samples.append(seen[-1])
            if f"client_{metric}_worst10" in metrics:
                worst.append(metrics[f"client_{metric}_worst10"])
        reached = [r for r in reach if math.isfinite(r)]
        if not reach:
            reach_text = "-"
        elif len(reached) == len(reach):
            reach_text = _rounds(reached)
        elif reached:
            reach_text = f"{_rounds(reached)} ({len(reached)}/{len(reach)} seeds)"
        else:
            reach_text = f"not in {int(max(s['rounds'] for s in group))} rounds"
        row = [name, first["mode"], strategy, partition, len(group), format_mean_std(finals) if finals else "-",
               format_mean_std(bests) if bests else "-", reach_text,
               f"{mean_std(sent)[0]:.1f}" if sent else "-", f"{mean_std(samples)[0]:.0f}" if samples else "-",
               _seconds([s["wall_time_s"] for s in group]),
               format_mean_std(worst) if worst else ("n/a (trains on all data)" if first["mode"] == "central" else "-")]
        rows.append(row)
        numbers.append({"run": name, "mode": first["mode"], "strategy": strategy, "partition": partition,
                        "seeds": len(group), "final": mean_std(finals), "best": mean_std(bests),
                        "rounds_to_90pct_central": reach, "mb_sent": mean_std(sent)[0] if sent else None,
                        "samples": mean_std(samples)[0] if samples else None,
                        "wall_s": mean_std([s["wall_time_s"] for s in group]),
                        "worst10_client": mean_std(worst) if worst else None})
        curves[name] = (first["mode"], [_curve(s, metric) for s in group])
    columns = [c.format(m=metric) for c in COLUMNS]
    return {"columns": columns, "rows": rows, "numbers": numbers, "curves": curves, "threshold": threshold,
            "metric": metric}


def _plot(table: dict[str, Any], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric = table["metric"]
    fig, (by_round, by_samples) = plt.subplots(1, 2, figsize=(13, 4.8))
    fed_per_round: list[float] = []
    for name, (mode, runs) in table["curves"].items():
        if mode != "federated" or not runs or not runs[0][0]:
            continue
        length = min(len(r[2]) for r in runs)
        steps = np.asarray(runs[0][0][:length])
        values = np.asarray([r[2][:length] for r in runs])
        seen = np.asarray([r[1][:length] for r in runs]).mean(axis=0)
        if length > 1:
            fed_per_round.append(float(seen[-1] / max(steps[-1], 1)))
        mean, std = values.mean(axis=0), values.std(axis=0)
        line = by_round.plot(steps, mean, label=name, marker=".")[0]
        by_round.fill_between(steps, mean - std, mean + std, alpha=0.15, color=line.get_color())
        by_samples.plot(seen, mean, label=name, marker=".", color=line.get_color())
    per_round = float(np.mean(fed_per_round)) if fed_per_round else 0.0
    for name, (mode, runs) in table["curves"].items():
        if mode == "federated" or not runs or not runs[0][0]:
            continue
        length = min(len(r[2]) for r in runs)
        values = np.asarray([r[2][:length] for r in runs]).mean(axis=0)
        seen = np.asarray([r[1][:length] for r in runs]).mean(axis=0)
        by_samples.plot(seen, values, label=f"{name} (per epoch)", color="black", linestyle="--", marker="s")
        if per_round > 0:  # the central curve at the round with the same sample budget
            by_round.plot(seen / per_round, values, label=f"{name} (same samples)", color="black", linestyle="--",
                          marker="s")
        by_round.axhline(values[-1], color="gray", linestyle=":", label=f"{name} final")
    if not math.isnan(table["threshold"]):
        by_round.axhline(table["threshold"], color="red", linestyle=":", linewidth=0.8, label="90% of central")
    by_round.set_xlabel("round")
    by_samples.set_xlabel("training samples processed")
    for ax in (by_round, by_samples):
        ax.set_ylabel(f"test {metric}")
        ax.grid(alpha=0.3)
    by_round.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _terse(cell: Any) -> Any:
    return "n/a (all data)" if cell == "n/a (trains on all data)" else cell


def write_comparison(summaries: Sequence[dict[str, Any]], out_dir: str | Path, *, metric: str = "accuracy",
                     title: str = "central vs federated") -> dict[str, Any]:
    """Print the table; write ``comparison.md``, ``comparison.json`` and ``comparison.png`` to ``out_dir``."""
    out_dir = Path(out_dir)
    table = comparison(summaries, metric)
    shown = [COLUMNS.index(name) for name in TERMINAL]
    terminal_rows = [[_terse(row[i]) for i in shown] for row in table["rows"]]
    print_table(f"{title}: {metric} (mean ± std over seeds; all columns in comparison.md)",
                [TERMINAL[name].format(m=metric) for name in TERMINAL], terminal_rows, width=120, compact=True)
    startup = sum(float(s.get("startup_s", 0.0)) for s in summaries)
    note = (f"\nStart-up of the simulated SuperNodes (for Flower: Ray actors loading the ClientApp), paid once per simulation "
            f"and not in any run's wall time: {startup:.1f} s in total.\n" if startup else "")
    if note:
        print(textwrap.fill(note.strip(), width=120))
    atomic_write_text(out_dir / "comparison.md", markdown_table(table["columns"], table["rows"]) + note)
    atomic_write_json(out_dir / "comparison.json", {"columns": table["columns"], "rows": table["rows"],
                                                    "numbers": table["numbers"], "threshold": table["threshold"]})
    png = _plot(table, out_dir / "comparison.png", f"{title}: test {metric}")
    print(f"wrote {out_dir / 'comparison.md'} and {png}")
    table["png"] = png
    return table


def report(experiment: Any, summaries: list[dict[str, Any]], root: Path) -> None:
    """The ``central_vs_federated`` experiment report (``report.kind``)."""
    metric = str(experiment.report.get("metric", "accuracy"))
    write_comparison(summaries, root, metric=metric, title=experiment.name)

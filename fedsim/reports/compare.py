"""Central vs federated: the comparison table and the accuracy-vs-round plot.

Used two ways: as the ``central_vs_federated`` experiment report (``report.kind``, called by
``fedsim run`` after the runs) and by ``fedsim compare RESULTS_DIR`` on finished runs (it reads
every ``summary.json`` under the folder). Runs are grouped by name; each group's seeds give the
mean ± std.

Columns: final and best accuracy; rounds until the global model first reaches the target fraction
of the central run's final accuracy (``report.target``, default 0.9: "rounds to 90% central");
simulated time until it first gets there ("sim time to 90% central": the virtual clock's
``sim_time_s`` of that round, "-" for central runs and for runs recorded without a virtual clock); bytes communicated (model arrays down and up); samples processed (the budget);
wall time; and the worst 10% of clients' accuracy on their own held-out data.

Simulated time is shown in the unit that reads best for its mean (s under two minutes, min under two
hours, h under two days, else d; the ± std in the same unit): a digits CNN's rounds take seconds, a
FedScale-sized model's hours. A group where only some seeds reach the target shows the mean over those
seeds and "(k/n seeds)"; where none do, "not in N rounds" (rounds) and "not reached" (hours).

``comparison.json`` holds, per run, the numbers behind the cells: ``rounds_to_90pct_central`` (the
key keeps its name whatever the target; the top-level ``target`` says which fraction it is),
``sim_hours_to_target`` (per seed, ``Infinity`` where it is not reached, empty without a clock) and
``sim_hours_total`` (mean over seeds of the run's total simulated hours, ``null`` without a clock).

The plot shows the test metric against the round and against the samples processed, plus, when
some federated run has a virtual clock, against simulated hours (a third panel).
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.checkpoint import atomic_write_json, atomic_write_text
from fedsim.errors import FedsimError
from fedsim.results import format_mean_std, markdown_table, mean_std, print_table, save_figure

__all__ = ["load_summaries", "comparison", "write_comparison", "report", "COLUMNS", "DEFAULT_TARGET"]

DEFAULT_TARGET = 0.9
"""The fraction of the central run's final metric a federated run must reach (``report.target``)."""

COLUMNS = ["run", "mode", "strategy", "partition", "seeds", "final {m}", "best {m}", "rounds to {p}% central",
           "sim time to {p}% central", "MB sent", "samples", "wall s", "worst-10% client {m}"]
TERMINAL = {"run": "run", "strategy": "strategy", "partition": "partition", "final {m}": "final {m}",
            "rounds to {p}% central": "to {p}% central", "sim time to {p}% central": "sim time to {p}%",
            "MB sent": "MB sent", "worst-10% client {m}": "worst-10% cl."}
"""The columns printed on the terminal (under their short headers), so the table fits 120 columns;
``comparison.md`` and ``comparison.json`` keep every column (mode, seeds, best, samples, wall time).
``{m}`` is the metric, ``{p}`` the target in percent. The terminal cells are terse too (:func:`_terse`):
"dir(0.1)" for "dirichlet(0.1)", "(2/3)" for "(2/3 seeds)", "n/a (all data)"."""


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


def _check_target(value: Any, where: str = "target") -> float:
    """``value`` as a fraction in (0, 1], else a :class:`FedsimError` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise FedsimError(f"{where} = {value!r}: must be a number in (0, 1], the fraction of the central run's "
                          f"final metric a federated run must reach (e.g. 0.9 for 90%)")
    return float(value)


def _percent(target: float) -> str:
    """0.9 -> "90", 0.95 -> "95", 0.875 -> "87.5"."""
    return f"{round(target * 100, 4):g}"


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


def _clock(summary: dict[str, Any], metric: str) -> tuple[list[float], list[float], list[float]] | None:
    """(round, simulated hours at its end, metric) per round of a federated run with a virtual clock, else None."""
    if summary["mode"] != "federated":
        return None
    key = f"test_{metric}"
    history = [h for h in summary.get("history", []) if key in h and h.get("sim_time_s") is not None]
    if not history:
        return None
    return ([float(h["round"]) for h in history], [float(h["sim_time_s"]) / 3600 for h in history],
            [float(h[key]) for h in history])


def _sim_hours_total(summary: dict[str, Any]) -> float | None:
    """A federated run's total simulated hours (its ``metrics.sim_time_s``, else its last round's), else None."""
    if summary["mode"] != "federated":
        return None
    total = summary.get("metrics", {}).get("sim_time_s")
    if total is None:
        clocked = [h["sim_time_s"] for h in summary.get("history", []) if h.get("sim_time_s") is not None]
        total = clocked[-1] if clocked else None
    return None if total is None else float(total) / 3600


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


def _time_unit(hours: float) -> tuple[str, float]:
    """The unit that reads best for a simulated time in hours, and the factor from hours to it: seconds under
    two minutes, minutes under two hours, hours under two days, else days."""
    seconds = abs(hours) * 3600
    return ("s", 3600.0) if seconds < 120 else ("min", 60.0) if seconds < 7200 else \
        ("h", 1.0) if seconds < 172800 else ("d", 1 / 24)


def _hours(values: list[float]) -> str:
    """Simulated time given in hours, shown in the unit that reads best for the mean (std in the same unit)."""
    mean, std = mean_std(values)
    unit, scale = _time_unit(mean)
    mean, std = mean * scale, std * scale
    text = f"{mean:.1f}" if len(values) < 2 else f"{mean:.1f} ± {std:.1f}"
    return f"{text} {unit}"


def _reach_text(reach: list[float], fmt: Any, none: str) -> str:
    """The cell for a group's steps (or hours) to the target: mean ± std over the seeds that reach it."""
    reached = [r for r in reach if math.isfinite(r)]
    if not reach:
        return "-"
    if len(reached) == len(reach):
        return fmt(reached)
    if reached:
        return f"{fmt(reached)} ({len(reached)}/{len(reach)} seeds)"
    return none


def _first_reach(steps: list[float], values: list[float], at: list[float], threshold: float) -> float:
    """``at`` of the first step after 0 whose value reaches ``threshold`` (inf if none does)."""
    for step, value, x in zip(steps, values, at, strict=True):
        if step > 0 and value >= threshold:
            return x
    return math.inf


def comparison(summaries: Sequence[dict[str, Any]], metric: str = "accuracy",
               target: float = DEFAULT_TARGET) -> dict[str, Any]:
    """Rows of the comparison table (numbers and their formatted text) and the curves to plot.

    ``target`` is the fraction of the central runs' mean final ``metric`` that defines the threshold
    of the "rounds to" and "sim time to" columns.
    """
    target = _check_target(target)
    groups = _groups(summaries)
    central = [s for s in summaries if s["mode"] == "central"]
    for summary in central:
        if "_samples_per_epoch" not in summary:
            summary["_samples_per_epoch"] = _central_samples_per_epoch(summary)
    # The target is the non-private central model's (DP-SGD runs are rows of the table, not the reference).
    reference = [s for s in central if "dp_epsilon" not in s["metrics"]] or central
    central_final = [s["metrics"][metric] for s in reference if metric in s["metrics"]]
    threshold = target * mean_std(central_final)[0] if central_final else math.nan
    rows, numbers, curves, sim_curves = [], [], {}, {}
    for name, group in groups.items():
        first = group[0]
        strategy, partition = _label(first)
        finals = [s["metrics"][metric] for s in group if metric in s["metrics"]]
        bests, reach, hours, totals, sent, samples, worst = [], [], [], [], [], [], []
        for summary in group:
            steps, seen, values = _curve(summary, metric)
            clock = _clock(summary, metric)
            if values:
                bests.append(max(values[1:] or values) if summary["mode"] == "federated" else max(values))
            if summary["mode"] == "federated" and not math.isnan(threshold):
                reach.append(_first_reach(steps, values, steps, threshold))
                if clock is not None:
                    hours.append(_first_reach(clock[0], clock[2], clock[1], threshold))
            total = _sim_hours_total(summary)
            if total is not None:
                totals.append(total)
            metrics = summary["metrics"]
            if "bytes_total" in metrics:
                sent.append(metrics["bytes_total"] / 1e6)
            if metrics.get("samples_total"):
                samples.append(metrics["samples_total"])
            elif summary["mode"] == "central" and seen:
                samples.append(seen[-1])
            if f"client_{metric}_worst10" in metrics:
                worst.append(metrics[f"client_{metric}_worst10"])
        rounds = max((s.get("rounds", 0) for s in group), default=0)
        reach_text = _reach_text(reach, _rounds, f"not in {int(rounds)} rounds")
        hours_text = _reach_text(hours, _hours, "not reached")
        row = [name, first["mode"], strategy, partition, len(group), format_mean_std(finals) if finals else "-",
               format_mean_std(bests) if bests else "-", reach_text, hours_text,
               f"{mean_std(sent)[0]:.1f}" if sent else "-", f"{mean_std(samples)[0]:.0f}" if samples else "-",
               _seconds([s["wall_time_s"] for s in group]),
               format_mean_std(worst) if worst else ("n/a (trains on all data)" if first["mode"] == "central" else "-")]
        rows.append(row)
        numbers.append({"run": name, "mode": first["mode"], "strategy": strategy, "partition": partition,
                        "seeds": len(group), "final": mean_std(finals), "best": mean_std(bests),
                        "rounds_to_90pct_central": reach, "sim_hours_to_target": hours,
                        "sim_hours_total": mean_std(totals)[0] if totals else None,
                        "mb_sent": mean_std(sent)[0] if sent else None,
                        "samples": mean_std(samples)[0] if samples else None,
                        "wall_s": mean_std([s["wall_time_s"] for s in group]),
                        "worst10_client": mean_std(worst) if worst else None})
        curves[name] = (first["mode"], [_curve(s, metric) for s in group])
        clocked = [c for c in (_clock(s, metric) for s in group) if c is not None]
        if clocked:
            sim_curves[name] = clocked
    percent = _percent(target)
    columns = [c.format(m=metric, p=percent) for c in COLUMNS]
    privacy = _privacy_points(groups, metric)
    if privacy is not None:  # an epsilon column when some run is differentially private
        columns.append(EPSILON)
        for row, number, name in zip(rows, numbers, groups, strict=True):
            epsilons = [s["metrics"]["dp_epsilon"] for s in groups[name] if "dp_epsilon" in s["metrics"]]
            row.append(f"{mean_std(epsilons)[0]:.2f}" if epsilons else "- (no DP)")
            number["epsilon"] = mean_std(epsilons)[0] if epsilons else None
    return {"columns": columns, "rows": rows, "numbers": numbers, "curves": curves, "sim_curves": sim_curves,
            "threshold": threshold, "target": target, "percent": percent, "metric": metric, "privacy": privacy}


EPSILON = "ε"
"""The privacy column (the run's epsilon at its delta, from ``metrics.dp_epsilon``); only when a run has DP."""


def _privacy_points(groups: dict[str, list[dict[str, Any]]], metric: str) -> dict[str, Any] | None:
    """Final ``metric`` against epsilon, per mode, for the private runs; the non-private finals per mode as
    references. None when no run is private."""
    points: dict[str, list[tuple[float, float, float]]] = {}
    references: dict[str, float] = {}
    for group in groups.values():
        finals = [s["metrics"][metric] for s in group if metric in s["metrics"]]
        if not finals:
            continue
        epsilons = [s["metrics"]["dp_epsilon"] for s in group if "dp_epsilon" in s["metrics"]]
        mode = group[0]["mode"]
        mean, std = mean_std(finals)
        if epsilons:
            points.setdefault(mode, []).append((mean_std(epsilons)[0], mean, std))
        else:
            references.setdefault(mode, mean)
    if not points:
        return None
    return {"points": {mode: sorted(p) for mode, p in points.items()}, "references": references}


def _privacy_panel(ax: Any, privacy: dict[str, Any], metric: str) -> None:
    """Final metric against epsilon (log scale) per mode, with the non-private runs as horizontal lines."""
    styles = {"central": ("black", "s"), "federated": ("tab:blue", "o")}
    for mode, points in privacy["points"].items():
        color, marker = styles.get(mode, ("tab:gray", "^"))
        eps, mean, std = zip(*points, strict=True)
        ax.errorbar(eps, mean, yerr=std, color=color, marker=marker, capsize=3, label=f"{mode}, DP")
    for mode, value in privacy["references"].items():
        color, _ = styles.get(mode, ("tab:gray", "^"))
        ax.axhline(value, color=color, linestyle=":", linewidth=1, label=f"{mode}, no DP")
    ax.set_xscale("log")
    ticks = sorted({round(e, 1) for points in privacy["points"].values() for e, _, _ in points})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("ε (privacy budget, log scale)")
    ax.set_title(f"final {metric} vs ε", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")


def _plot(table: dict[str, Any], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric = table["metric"]
    sim_curves = table.get("sim_curves") or {}
    privacy = table.get("privacy")
    panels = 2 + bool(sim_curves) + bool(privacy)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8))
    by_round, by_samples = axes[0], axes[1]
    by_hours = axes[2] if sim_curves else None
    if privacy:
        _privacy_panel(axes[-1], privacy, metric)
    table["plot_panels"] = panels
    fed_per_round: list[float] = []
    longest = max((h for clocked in sim_curves.values() for c in clocked for h in c[1]), default=0.0)
    time_unit, per_hour = _time_unit(longest)
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
        clocked = sim_curves.get(name)
        if by_hours is not None and clocked:  # mean over seeds, aligned by round
            length = min(len(c[2]) for c in clocked)
            hours = np.asarray([c[1][:length] for c in clocked]).mean(axis=0)
            sim_values = np.asarray([c[2][:length] for c in clocked]).mean(axis=0)
            by_hours.plot(hours * per_hour, sim_values, label=name, marker=".", color=line.get_color())
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
        if by_hours is not None:
            by_hours.axhline(values[-1], color="gray", linestyle=":", label=f"{name} final")
    lines = [by_round] if by_hours is None else [by_round, by_hours]
    if not math.isnan(table["threshold"]):
        for ax in lines:
            ax.axhline(table["threshold"], color="red", linestyle=":", linewidth=0.8,
                       label=f"{table.get('percent', '90')}% of central")
    by_round.set_xlabel("round")
    by_samples.set_xlabel("training samples processed")
    if by_hours is not None:
        by_hours.set_xlabel(f"simulated time, {time_unit} (virtual clock)")
        by_hours.legend(fontsize=7, loc="lower right")
    for ax in axes:
        ax.set_ylabel(f"test {metric}")
        ax.grid(alpha=0.3)
    by_round.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


_TERSE_PARTITIONS = {"dirichlet(": "dir(", "quantity_skew(": "qskew("}
_SEEDS_NOTE = re.compile(r" \((\d+/\d+) seeds\)$")


def _terse(column: str, cell: Any) -> Any:
    """A terminal cell: shorter partition names and seed notes (``comparison.md`` keeps the long ones)."""
    if not isinstance(cell, str):
        return cell
    if cell == "n/a (trains on all data)":
        return "n/a (all data)"
    if column == "partition":
        for long, short in _TERSE_PARTITIONS.items():
            if cell.startswith(long):
                return short + cell[len(long):]
    return _SEEDS_NOTE.sub(r" (\1)", cell)


def write_comparison(summaries: Sequence[dict[str, Any]], out_dir: str | Path, *, metric: str = "accuracy",
                     title: str = "central vs federated", target: float = DEFAULT_TARGET) -> dict[str, Any]:
    """Print the table; write ``comparison.md``, ``comparison.json`` and ``comparison.png`` to ``out_dir``."""
    out_dir = Path(out_dir)
    table = comparison(summaries, metric, target)
    terminal = dict(TERMINAL)
    if table["privacy"] is not None:  # room for epsilon on the terminal: the traffic column stays in the files
        terminal = {name: (EPSILON if name == "MB sent" else short) for name, short in TERMINAL.items()}
    shown = [COLUMNS.index(name) if short != EPSILON else len(COLUMNS) for name, short in terminal.items()]
    terminal_rows = [[_terse(COLUMNS[i] if i < len(COLUMNS) else EPSILON, row[i]) for i in shown]
                     for row in table["rows"]]
    partial = any(isinstance(cell, str) and _SEEDS_NOTE.search(cell) for row in table["rows"] for cell in row)
    seeds_note = ", (k/n) = k of n seeds reach it" if partial else ""
    print_table(f"{title}: {metric} (mean ± std over seeds{seeds_note}; all columns in comparison.md)",
                [short.format(m=metric, p=table["percent"]) for short in terminal.values()], terminal_rows,
                width=120, compact=True)
    startup = sum(float(s.get("startup_s", 0.0)) for s in summaries)
    note = (f"\nStart-up of the simulated SuperNodes (for Flower: Ray actors loading the ClientApp), paid once per simulation "
            f"and not in any run's wall time: {startup:.1f} s in total.\n" if startup else "")
    if note:
        print(textwrap.fill(note.strip(), width=120))
    atomic_write_text(out_dir / "comparison.md", markdown_table(table["columns"], table["rows"]) + note)
    atomic_write_json(out_dir / "comparison.json", {"columns": table["columns"], "rows": table["rows"],
                                                    "numbers": table["numbers"], "threshold": table["threshold"],
                                                    "target": table["target"]})
    png = _plot(table, out_dir / "comparison.png", f"{title}: test {metric}")
    print(f"wrote {out_dir / 'comparison.md'} and {png}")
    table["png"] = png
    return table


def report(experiment: Any, summaries: list[dict[str, Any]], root: Path) -> None:
    """The ``central_vs_federated`` experiment report (``report.kind``; ``report.metric``, ``report.target``)."""
    metric = str(experiment.report.get("metric", "accuracy"))
    source = getattr(experiment, "source", "") or "experiment"
    target = _check_target(experiment.report.get("target", DEFAULT_TARGET), f"{source}: key 'report.target'")
    write_comparison(summaries, root, metric=metric, title=experiment.name, target=target)

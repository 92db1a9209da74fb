"""Run records: ``results/<experiment>/<run>/metrics.jsonl`` + ``summary.json``, tables, PNG plots."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from fedsim.checkpoint import CHECKPOINT_NAME, atomic_write_json

LIBRARIES = ("torch", "numpy", "scikit-learn", "flwr", "ray", "fedsim")


class RunDir:
    """The folder of one run. Nothing is created until something is written (ranks > 0 never write)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.root / CHECKPOINT_NAME

    def path(self, name: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / name

    def reset_metrics(self) -> None:
        """A fresh (or re-logged resumed) run starts a fresh metrics file.

        A ``summary.json`` left by an earlier run goes too: until this run writes its own, a run that
        fails must not leave a summary claiming success next to its metrics.
        """
        self.metrics_path.unlink(missing_ok=True)
        self.summary_path.unlink(missing_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line (one epoch, round or step)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record, default=float) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def git_commit() -> str:
    """The commit of the fedsim checkout (with ``+dirty`` if it has uncommitted changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


def make_summary(run: Any, metrics: dict[str, Any], *, primary_metric: str, started: float,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``summary.json`` of a run: final metrics, resolved config, versions and commit.

    ``primary_metric`` is the metric tables lead with (the task's ``Task.primary_metric``).
    """
    from fedsim.config import to_dict

    return {
        "name": run.name,
        "task": run.task,
        "mode": run.mode,
        "seed": run.train.seed,
        "primary_metric": primary_metric,
        "metrics": metrics,
        "wall_time_s": time.time() - started,
        "config": to_dict(run),
        "versions": library_versions(),
        "git_commit": git_commit(),
        **(extra or {}),
    }


# ---- tables and plots -----------------------------------------------------------------------
def format_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, width: int = 200,
                justify: Sequence[str] = (), compact: bool = False) -> str:
    """Print a rich table at ``width`` columns and return its plain-text form (for logs and tests).

    ``justify`` gives each column's alignment ("left", "right", ...; default left); ``compact`` draws
    no vertical rules (two characters less per column).
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD, pad_edge=not compact,
                  padding=(0, 0) if compact else (0, 1))
    for i, column in enumerate(columns):
        # A compact table keeps each cell on one line (headers may wrap): rows stay one line each.
        table.add_column(column, justify=justify[i] if i < len(justify) else "left",  # type: ignore[arg-type]
                         no_wrap=compact)
    rows = [[format_value(v) for v in row] for row in rows]
    for row in rows:
        table.add_row(*row)
    console = Console(width=width)
    console.print(table)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (the ``.md`` files experiment reports write)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def format_mean_std(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.4f}" if len(values) < 2 else f"{mean:.4f} ± {std:.4f}"


MISSING = "–"
"""What a table shows for a figure a run does not have."""

SUMMARY_WIDTH = 120
"""Terminal columns the generic table must fit without wrapping."""


def _primary(summaries: Sequence[dict[str, Any]]) -> str:
    """The metric a group of runs leads with: the summaries' ``primary_metric``, else accuracy, else loss."""
    for summary in summaries:
        name = summary.get("primary_metric")
        if name and isinstance(summary["metrics"].get(name), (int, float)):
            return str(name)
    for name in ("accuracy", "loss"):
        if any(isinstance(s["metrics"].get(name), (int, float)) for s in summaries):
            return name
    return next((k for s in summaries for k, v in s["metrics"].items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)), "")


def _numbers(group: Sequence[dict[str, Any]], get: Any) -> list[float]:
    values = []
    for summary in group:
        value = get(summary)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values.append(float(value))
    return values


def _short(name: str, limit: int) -> str:
    """``name`` cut in the middle to ``limit`` characters (run names differ at both ends: keep both)."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "…" + name[len(name) - (limit - 1 - head):]


def summary_table(summaries: Sequence[dict[str, Any]], title: str = "results", metrics: Sequence[str] | None = None,
                  width: int = SUMMARY_WIDTH) -> str:
    """The table ``fedsim run`` prints first: one row per run name, mean ± std over its seeds.

    Columns: run, mode, seeds, the task's primary metric (``metrics`` names others instead), then a
    few figures in human units: MB of model traffic (federated), samples processed, wall time in
    seconds. Every other figure stays in each run's ``summary.json``; runs without a figure show "–".
    The table fits ``width`` columns (long run names are shortened in the middle).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for summary in summaries:
        groups.setdefault(summary["name"], []).append(summary)
    if metrics is None:
        primaries = {_primary(group) for group in groups.values()} - {""}
        shared = len(primaries) == 1
        metrics = sorted(primaries)[:1] if shared else []
    else:
        shared = True
    columns = ["run", "mode", "seeds", *(metrics if shared else ["main metric"]), "MB sent", "samples", "wall s"]
    rows = []
    for name, group in groups.items():
        row: list[Any] = [name, group[0]["mode"], len(group)]
        keys = list(metrics) if shared else [_primary(group)]
        for key in keys:
            values = _numbers(group, lambda s, key=key: s["metrics"].get(key))
            text = format_mean_std(values) if values else MISSING
            row.append(text if shared or not values else f"{key} {text}")
        sent = _numbers(group, lambda s: s["metrics"].get("bytes_total"))
        samples = _numbers(group, lambda s: s["metrics"].get("samples_total"))
        wall = _numbers(group, lambda s: s.get("wall_time_s"))
        row.append(f"{mean_std(sent)[0] / 1e6:,.1f}" if sent else MISSING)
        row.append(f"{mean_std(samples)[0]:,.0f}" if samples else MISSING)
        row.append(_seconds(wall) if wall else MISSING)
        rows.append(row)
    # Whatever the run names, the other columns have a bounded width: the names get the rest.
    widest = [max([len(str(c))] + [len(str(r[i])) for r in rows]) for i, c in enumerate(columns)]
    budget = width - 3 * len(columns) - 1 - sum(widest[1:])
    limit = max(12, min(widest[0], budget, 40))
    for row in rows:
        row[0] = _short(str(row[0]), limit)
    return print_table(title, columns, rows, width=width, justify=["left", "left", *(["right"] * (len(columns) - 2))])


def _seconds(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:,.1f}" if len(values) < 2 else f"{mean:,.1f} ± {std:.1f}"


def plot_curves(
    series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *, xlabel: str, ylabel: str,
    title: str = "", reference: dict[str, float] | None = None,
) -> Path:
    """Line plot of several (x, y) series, with optional horizontal reference lines; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), label=label, marker="." if len(xs) < 30 else None)
    for label, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", color="gray", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path, dpi: int = 110, **savefig_kwargs: Any) -> Path:
    """Write a matplotlib figure as PNG atomically (through a temporary file) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi, **savefig_kwargs)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path

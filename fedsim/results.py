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
        """A fresh (non-resumed) run starts a fresh metrics file."""
        self.metrics_path.unlink(missing_ok=True)

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


def make_summary(run: Any, metrics: dict[str, Any], *, started: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``summary.json`` of a run: final metrics, resolved config, versions and commit."""
    from fedsim.config import to_dict

    return {
        "name": run.name,
        "task": run.task,
        "mode": run.mode,
        "seed": run.train.seed,
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


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Print a rich table and return its plain-text form (for logs and tests)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    rows = [[format_value(v) for v in row] for row in rows]
    for row in rows:
        table.add_row(*row)
    console = Console(width=200)
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


def summary_table(summaries: Sequence[dict[str, Any]], title: str = "results", metrics: Sequence[str] | None = None) -> str:
    """One row per run name; metrics as mean ± std over seeds when a run has several."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for summary in summaries:
        groups.setdefault(summary["name"], []).append(summary)
    if metrics is None:
        seen: dict[str, None] = {}
        for summary in summaries:
            for key, value in summary["metrics"].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    seen.setdefault(key, None)
        metrics = list(seen)
    rows = []
    for name, group in groups.items():
        row: list[Any] = [name, group[0]["task"], group[0]["mode"], len(group)]
        for key in metrics:
            values = [s["metrics"][key] for s in group if isinstance(s["metrics"].get(key), (int, float))]
            row.append(format_mean_std(values) if values else "-")
        row.append(format_mean_std([s["wall_time_s"] for s in group]))
        rows.append(row)
    return print_table(title, ["run", "task", "mode", "seeds", *metrics, "wall s"], rows)


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

"""Report of ``experiments/mae_masking.toml``: a table next to the paper's Table 1(f), and a plot.

Registered as ``report.kind = "mae_masking"`` in :data:`fedsim.experiment.REPORTS`. Writes
``table.md`` (mean ± std over seeds) and ``accuracy_vs_mask.png`` into the experiment folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsim.checkpoint import atomic_write_text
from fedsim.results import markdown_table, mean_std, print_table, save_figure

__all__ = ["PAPER", "report_masking", "masking_rows"]

# The paper's Table 1(f): ImageNet-1K, ViT-L, (fine-tune, linear probe) top-1 %.
PAPER: dict[tuple[str, float], tuple[float, float]] = {
    ("random", 0.75): (84.9, 73.5),
    ("block", 0.5): (83.9, 72.3),
    ("block", 0.75): (82.8, 63.9),
    ("grid", 0.75): (84.0, 66.0),
}
METRICS = ("loss", "loss_random75", "probe_accuracy", "finetune_accuracy")


def _describe(summary: dict[str, Any]) -> tuple[str, float | None]:
    """(strategy or reference name, mask ratio) of a run from its resolved config."""
    config = summary.get("config", {})
    options = config.get("task_options", {})
    if options.get("reference", "none") != "none":
        return f"ref: {options['reference']}", None
    if config.get("train", {}).get("epochs", 1) == 0:
        return "ref: random_init", None
    strategy = options.get("mask", "random")
    return strategy, float(options.get("mask_ratio", 0.75))


def masking_rows(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run name: strategy, ratio, and (mean, std, n) of each metric over seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for summary in summaries:
        groups.setdefault(summary["name"], []).append(summary)
    rows = []
    for name, group in groups.items():
        strategy, ratio = _describe(group[0])
        row: dict[str, Any] = {"run": name, "strategy": strategy, "ratio": ratio, "seeds": len(group)}
        for metric in METRICS:
            values = [s["metrics"][metric] for s in group if isinstance(s["metrics"].get(metric), (int, float))]
            row[metric] = (*mean_std(values), len(values)) if values else None
        if strategy == "ref: raw_pixels":  # no MAE was trained: its losses would describe an unused model
            row["loss"] = row["loss_random75"] = None
        row["paper"] = PAPER.get((strategy, ratio)) if ratio is not None else None
        rows.append(row)
    return rows


def _fmt(stat: tuple[float, float, int] | None, scale: float = 1.0, digits: int = 3) -> str:
    if stat is None:
        return "-"
    mean, std, n = stat
    return f"{mean * scale:.{digits}f}" if n < 2 else f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def report_masking(experiment: Any, summaries: list[dict[str, Any]], root: Path) -> None:
    """Print and write the Table 1(f)-style table and the accuracy-vs-mask plot."""
    rows = masking_rows(summaries)
    columns = ["run", "mask", "ratio", "test loss (own mask)", "test loss (random 75%)", "linear probe %",
               "fine-tune %", "paper ft / lin %"]
    table = []
    for row in rows:
        paper = row["paper"]
        table.append([row["run"], row["strategy"], "-" if row["ratio"] is None else f"{row['ratio']:.2f}",
                      _fmt(row["loss"]), _fmt(row["loss_random75"]), _fmt(row["probe_accuracy"], 100, 1),
                      _fmt(row["finetune_accuracy"], 100, 1), f"{paper[0]} / {paper[1]}" if paper else "-"])
    seeds = max((r["seeds"] for r in rows), default=0)
    print_table(f"{experiment.name}: MAE masking on digits (mean ± std over {seeds} seeds)", columns, table)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "table.md", markdown_table(columns, table))
    _plot(rows, root / "accuracy_vs_mask.png", experiment.name)


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"probe_accuracy": "tab:blue", "finetune_accuracy": "tab:orange"}
    labels = {"probe_accuracy": "linear probe", "finetune_accuracy": "fine-tune"}
    markers = {"block": "s", "grid": "^"}
    for metric, color in colors.items():
        random_rows = sorted((r for r in rows if r["strategy"] == "random" and r[metric]), key=lambda r: r["ratio"])
        if random_rows:
            ax.errorbar([r["ratio"] for r in random_rows], [100 * r[metric][0] for r in random_rows],
                        yerr=[100 * r[metric][1] for r in random_rows], color=color, marker="o", capsize=3,
                        label=f"{labels[metric]}: random")
        for strategy, marker in markers.items():
            pts = [r for r in rows if r["strategy"] == strategy and r[metric]]
            if pts:
                ax.errorbar([r["ratio"] for r in pts], [100 * r[metric][0] for r in pts],
                            yerr=[100 * r[metric][1] for r in pts], color=color, marker=marker, linestyle="none",
                            capsize=3, label=f"{labels[metric]}: {strategy}")
        for r in rows:
            if r["strategy"].startswith("ref") and r[metric]:
                ax.axhline(100 * r[metric][0], color=color, linestyle="--" if "random" in r["strategy"] else ":",
                           alpha=0.7, label=f"{labels[metric]}: {r['strategy']}")
    ax.set_xlabel("mask ratio")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title}: digits, mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)

"""Report of ``experiments/fewshot_dc.toml``: the paper's Table 4 ablation next to our runs, and a plot.

Registered as ``report.kind = "fewshot_dc"`` in :data:`fedsim.experiment.REPORTS`. Writes
``table.md`` (accuracy % mean ± 95% CI over episodes) and ``fewshot_dc.png`` into the
experiment folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedsim.checkpoint import atomic_write_text
from fedsim.results import markdown_table, print_table, save_figure

__all__ = ["PAPER", "report_fewshot", "ablation_rows"]

# "Free Lunch for Few-shot Learning" (ICLR 2021), miniImageNet, WRN-28-10 features, 5-way,
# with both Tukey's transformation and generated features: (1-shot, 5-shot) accuracy % ± 95% CI.
PAPER: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "miniImageNet (paper), Tukey + generated": ((68.57, 0.55), (82.88, 0.42)),
}


def _cell(options: dict[str, Any]) -> tuple[str, str, str]:
    source = options.get("features", "backbone")
    source = {"backbone": f"digits ({options.get('backbone', 'bn_cnn')} backbone)"}.get(source, source)
    dc = options.get("dc", {})  # unset keys take DCConfig's defaults (Tukey and generation on)
    tukey = "yes" if dc.get("tukey", True) else "no"
    if dc.get("tukey", True) and dc.get("tukey_base", False):
        tukey = "yes (base too)"
    return source, tukey, "yes" if dc.get("generate", True) else "no"


def ablation_rows(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: feature source, Tukey, generated features, and the metrics of each shot."""
    rows = []
    for summary in summaries:
        options = summary.get("config", {}).get("task_options", {})
        source, tukey, generated = _cell(options)
        metrics = summary["metrics"]
        row: dict[str, Any] = {"run": summary["name"], "features": source, "tukey": tukey, "generated": generated,
                               "seed": summary.get("seed")}
        for shot in options.get("shots", [1, 5]):
            if f"acc_{shot}shot" in metrics:
                row[shot] = (metrics[f"acc_{shot}shot"], metrics[f"ci95_{shot}shot"],
                             metrics.get(f"plain_acc_{shot}shot"), metrics.get(f"gain_{shot}shot"))
        rows.append(row)
    return rows


def _pct(stat: tuple[float, ...] | None) -> str:
    return "-" if stat is None else f"{100 * stat[0]:.2f} ± {100 * stat[1]:.2f}"


def report_fewshot(experiment: Any, summaries: list[dict[str, Any]], root: Path) -> None:
    """Print and write the Table 4-style table and a bar plot with 95% CIs."""
    rows = ablation_rows(summaries)
    columns = ["run", "features", "Tukey", "generated", "5-way 1-shot %", "5-way 5-shot %",
               "gain vs plain LR 1-shot / 5-shot (points)"]
    table = []
    for row in rows:
        gains = " / ".join("-" if row.get(s) is None or row[s][3] is None else f"{100 * row[s][3]:+.2f}"
                           for s in (1, 5))
        table.append([row["run"], row["features"], row["tukey"], row["generated"], _pct(row.get(1)),
                      _pct(row.get(5)), gains])
    for name, ((m1, c1), (m5, c5)) in PAPER.items():
        table.append(["paper", name, "yes", "yes", f"{m1:.2f} ± {c1:.2f}", f"{m5:.2f} ± {c5:.2f}", "-"])
    print_table(f"{experiment.name}: Table 4 ablation (accuracy %, mean ± 95% CI over episodes)", columns, table)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "table.md", markdown_table(columns, table))
    _plot(rows, root / "fewshot_dc.png")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(r["features"] for r in rows))
    fig, axes = plt.subplots(1, len(sources), figsize=(5.5 * len(sources), 4.2), squeeze=False)
    for ax, source in zip(axes[0], sources, strict=True):
        group = [r for r in rows if r["features"] == source]
        labels = [f"T:{r['tukey'].split()[0]}{'*' if 'base' in r['tukey'] else ''}\nG:{r['generated']}" for r in group]
        width = 0.38
        for offset, shot in ((-width / 2, 1), (width / 2, 5)):
            means = [100 * r[shot][0] if r.get(shot) else 0 for r in group]
            cis = [100 * r[shot][1] if r.get(shot) else 0 for r in group]
            ax.bar([i + offset for i in range(len(group))], means, width, yerr=cis, capsize=3, label=f"{shot}-shot")
        ax.set_xticks(range(len(group)), labels, fontsize=8)
        ax.set_title(source, fontsize=10)
        ax.set_ylabel("5-way accuracy %")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Distribution calibration ablation (T = Tukey, * = base too; G = generated features)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)

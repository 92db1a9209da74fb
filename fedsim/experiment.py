"""Running an experiment: every run (x every seed) through its engine, then one table and plot."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsim.config import Experiment, experiment_from_dict, load_experiment, run_with_seed
from fedsim.engines import engine_for
from fedsim.engines.common import RunContext
from fedsim.errors import FedsimError
from fedsim.registry import import_object
from fedsim.results import RunDir, plot_curves, summary_table
from fedsim.validation import validate_experiment

# Experiment-level reports beyond the generic table (``report.kind`` in the experiment file).
REPORTS: dict[str, str] = {
    "mae_masking": "fedsim.reports.mae:report_masking",
    "central_vs_federated": "fedsim.reports.compare:report",
    "topologies": "fedsim.reports.topologies:report_topologies",
    "fewshot_dc": "fedsim.reports.fewshot:report_fewshot",
    "fedprox": "fedsim.reports.fedprox:report_fedprox",
}


def resolve(config: Experiment | str | Path | dict[str, Any], overrides: tuple[str, ...] = ()) -> Experiment:
    if isinstance(config, Experiment):
        if overrides:
            raise FedsimError("overrides apply to experiment files or dicts, not to a loaded Experiment")
        return config
    if isinstance(config, dict):
        return experiment_from_dict(config, "<dict>", overrides)
    return load_experiment(config, overrides)


def run_folder(name: str, seed: int, repeated: bool) -> str:
    return f"{name}-seed{seed}" if repeated else name


def is_rank0() -> bool:
    """Under torchrun every rank runs the CLI; only rank 0 prints tables and plots."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def run_experiment(
    config: Experiment | str | Path | dict[str, Any],
    overrides: tuple[str, ...] | list[str] = (),
    *,
    out: str | Path = "results",
    resume: bool = False,
    only: tuple[str, ...] | list[str] = (),
    quiet: bool = False,
    on_summary: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every run of an experiment (each seed in ``seeds``); print a table; return the summaries."""
    experiment = resolve(config, tuple(overrides))
    runs = [r for r in experiment.runs if not only or r.name in only]
    if only and not runs:
        raise FedsimError(f"no run named {', '.join(only)} in {experiment.source}")
    # The checks that need the task or the data, before any run starts; natural partitions' client
    # counts come back resolved from the data.
    runs = validate_experiment(experiment, runs)
    root = Path(out) / experiment.name
    summaries: list[dict[str, Any]] = []
    repeated = bool(experiment.seeds)
    # Every (run, seed) this call will execute, in order: engines may start shared work for later
    # runs early (the federated engine runs compatible runs in one Flower simulation).
    planned = [(run_with_seed(run, seed), root / run_folder(run.name, seed, repeated))
               for run in runs for seed in experiment.seeds or (run.train.seed,)]
    for run in runs:
        for seed in experiment.seeds or (run.train.seed,):
            seeded = run_with_seed(run, seed)
            folder = run_folder(run.name, seed, repeated)
            ctx = RunContext(out=RunDir(root / folder), experiment=experiment, overrides=tuple(overrides),
                             resume=resume, rank0=is_rank0(), extras={"planned": planned})
            summary = engine_for(seeded.mode)(seeded, ctx)
            summary.setdefault("folder", folder)
            summaries.append(summary)
            if on_summary is not None:
                on_summary(summary)
    if is_rank0() and not quiet and summaries:
        report(experiment, summaries, root)
    return summaries


def report(experiment: Experiment, summaries: list[dict[str, Any]], root: Path) -> None:
    """The generic table + a curve plot, then the experiment's own report if it names one."""
    summary_table(summaries, title=f"{experiment.name}: final metrics (mean ± std over seeds)")
    metric = experiment.report.get("plot_metric")
    if metric:
        series = {}
        for summary in summaries:
            history = summary.get("history") or []
            xs = [h.get("round", h.get("epoch")) for h in history if metric in h]
            ys = [h[metric] for h in history if metric in h]
            if xs:
                series[summary.get("folder", summary["name"])] = (xs, ys)
        if series:
            plot_curves(series, root / f"{metric}.png", xlabel="epoch / round", ylabel=metric, title=experiment.name)
    kind = experiment.report.get("kind")
    if kind:
        if kind not in REPORTS:
            raise FedsimError(f"{experiment.source}: key 'report.kind' = {kind!r}: unknown; known: {sorted(REPORTS)}")
        import_object(REPORTS[kind])(experiment, summaries, root)


def replace_runs(experiment: Experiment, **changes: Any) -> Experiment:
    """Every run with some top-level fields replaced (used by tests and reports)."""
    return dataclasses.replace(experiment, runs=tuple(dataclasses.replace(r, **changes) for r in experiment.runs))

"""Federated subcommands: ``fedsim partitions EXPERIMENT.toml`` and ``fedsim compare RESULTS_DIR``."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def add_partitions(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "partitions", help="show how an experiment's federated runs split the data",
        description="Per-client label counts of every federated run's partition (table) and a PNG heat map "
                    "in OUT/<experiment>/partitions-<run>.png.")
    parser.add_argument("experiment", help="experiment TOML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run field, e.g. --set federated.alpha=0.1 (repeatable)")
    parser.add_argument("--out", default="results", help="results folder (default: results)")
    parser.set_defaults(func=_partitions)


def _partitions(args: argparse.Namespace) -> int:
    from fedsim.config import load_experiment
    from fedsim.reports.partitions import partition_report
    from fedsim.validation import validate_experiment

    experiment = load_experiment(args.experiment, tuple(args.overrides))
    federated = validate_experiment(experiment, [r for r in experiment.runs if r.mode == "federated"])
    partition_report(dataclasses.replace(experiment, runs=tuple(federated)), args.out)
    return 0


def add_compare(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "compare", help="central vs federated table and plot from finished runs",
        description="Read every summary.json under RESULTS_DIR (e.g. results/central_vs_federated), print the "
                    "comparison table (mean ± std over seeds) and write comparison.md/.json/.png there.")
    parser.add_argument("results_dir", help="folder holding run folders with summary.json")
    parser.add_argument("--metric", default="accuracy", help="metric to compare (default: accuracy)")
    parser.add_argument("--target", type=float, default=0.9,
                        help="fraction of the central run's final metric the 'to X%% central' columns count up to "
                             "(default: 0.9)")
    parser.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedsim.reports.compare import load_summaries, write_comparison

    root = Path(args.results_dir)
    write_comparison(load_summaries(root), root, metric=args.metric, title=root.name, target=args.target)
    return 0

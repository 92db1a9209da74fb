"""Core subcommands: ``run``, ``list``, ``part-a``."""

from __future__ import annotations

import argparse
from typing import Any


def add_run(subparsers: Any) -> None:
    parser = subparsers.add_parser("run", help="run an experiment file", description=(
        "Run every run of EXPERIMENT.toml (each seed), write results/<experiment>/<run>/, print a table. "
        "Also what `torchrun -m fedsim run ...` executes on every rank."))
    parser.add_argument("experiment", help="experiment TOML file (see experiments/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run field for every run, e.g. --set train.epochs=2 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue each run from its last checkpoint")
    parser.add_argument("--out", default="results", help="results folder (default: results)")
    parser.add_argument("--only", action="append", default=[], metavar="RUN", help="run only this run (repeatable)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fedsim.experiment import run_experiment

    run_experiment(args.experiment, args.overrides, out=args.out, resume=args.resume, only=args.only)
    return 0


def add_list(subparsers: Any) -> None:
    parser = subparsers.add_parser("list", help="list tasks, datasets and modes",
                                   description="Tasks (with what each supports), datasets and execution modes.")
    parser.set_defaults(func=_list)


def _capabilities(name: str) -> list[str]:
    from fedsim.errors import FedsimError
    from fedsim.tasks import make_task

    try:
        task = make_task(name)  # default options: some tasks derive their split points from them
    except FedsimError as exc:
        return [name, "-", "-", f"unavailable: {exc}", "-"]
    ddp = "yes" if task.supports_data_parallel else f"no: {task.data_parallel_reason}"
    pipe = ", ".join(task.pipeline_split_points) if task.pipeline_split_points else f"no: {task.pipeline_reason}"
    return [name, task.description, ddp, pipe, "yes" if task.vectorisable else "no"]


def _list(args: argparse.Namespace) -> int:
    from fedsim.data import DATASETS
    from fedsim.engines import ENGINES
    from fedsim.results import print_table
    from fedsim.tasks import TASKS

    print_table("tasks", ["task", "description", "data-parallel", "pipeline split points", "vectorisable"],
                [_capabilities(name) for name in TASKS], width=120)
    print_table("datasets", ["dataset"], [[name] for name in DATASETS], width=120)
    print_table("modes", ["mode", "engine"], [[mode, spec] for mode, spec in ENGINES.items()], width=120)
    return 0


def add_part_a(subparsers: Any) -> None:
    parser = subparsers.add_parser("part-a", help="print the exam's worked examples",
                                   description="The 2x2 inverse check, ExamNet's forward/backward step, f and f', "
                                               "and gradient descent vs Adagrad on the slow objective (PNG).")
    parser.add_argument("--out", default="results/part_a_report", help="folder for the slow-objective plot")
    parser.set_defaults(func=_part_a)


def _part_a(args: argparse.Namespace) -> int:
    from fedsim.reports.part_a import part_a_report

    print(part_a_report(args.out))
    return 0

"""The ``fedsim`` command. Subcommands live in small modules listed in :data:`COMMANDS`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fedsim.errors import FedsimError
from fedsim.registry import import_object

# Subcommand -> "module:function" that adds its parser (``add(subparsers)``) and sets ``func``.
COMMANDS: dict[str, str] = {
    "run": "fedsim.cli.core:add_run",
    "list": "fedsim.cli.core:add_list",
    "part-a": "fedsim.cli.core:add_part_a",
    "partitions": "fedsim.cli.federated:add_partitions",
    "compare": "fedsim.cli.federated:add_compare",
    "flower-run": "fedsim.cli.flower_run:add_flower_run",
    "cluster": "fedsim.cli.cluster:add_cluster",
    "certs": "fedsim.cli.certs:add_certs",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsim",
        description="Distributed and federated training simulator: one task, many execution modes.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for spec in COMMANDS.values():
        import_object(spec)(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # As with `python -m`, the working directory is importable: users' `module:attribute` tasks,
    # datasets and apps live next to their experiment files.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FedsimError as exc:
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fedsim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

"""``fedsim flower-run APP_DIR``: any Flower app on fedsim's in-process engine or Flower's simulation."""

from __future__ import annotations

import argparse
from typing import Any


def add_flower_run(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "flower-run", help="run a Flower app (pyproject with [tool.flwr.app]) on fedsim's local engine",
        description="Run any Flower app, ServerApp and ClientApp as named in APP_DIR/pyproject.toml, with "
                    "in-process SuperNodes (--engine local) or Flower's own simulation (--engine flower).")
    parser.add_argument("app_dir", metavar="APP_DIR", help="folder holding the app's pyproject.toml")
    parser.add_argument("--engine", choices=["local", "flower"], default="local",
                        help="local = fedsim's in-process Grid (default); flower = Flower's Ray simulation")
    parser.add_argument("--num-supernodes", type=int, default=None, metavar="N",
                        help="simulated SuperNodes (default: the app's default federation)")
    parser.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="override a [tool.flwr.app.config] value (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of node ids and client random generators")
    parser.add_argument("--workers", type=int, default=0, help="client worker processes (0 = in this process)")
    parser.add_argument("--client-threads", type=int, default=0, help="torch threads per client call (0 = as is)")
    parser.set_defaults(func=_flower_run)


def _flower_run(args: argparse.Namespace) -> int:
    from fedsim.engines.federated.flower_run import flower_run

    result = flower_run(args.app_dir, args.num_supernodes, engine=args.engine, run_config=args.run_config,
                        seed=args.seed, workers=args.workers, client_threads=args.client_threads)
    print(f"fedsim flower-run: {result['num_supernodes']} SuperNodes on the {result['engine']} engine, "
          f"{result['wall_time_s']:.2f} s")
    return 0

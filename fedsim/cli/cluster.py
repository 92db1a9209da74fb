"""``fedsim cluster up|down|status``: local Ray or Flower clusters as processes on loopback."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEFAULT_STATE = ".fedsim/cluster"


def add_cluster(subparsers: Any) -> None:
    parser = subparsers.add_parser("cluster", help="start/stop a local Ray or Flower cluster",
                                   description="Local clusters as plain processes on 127.0.0.x.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    up = actions.add_parser("up", help="start a cluster")
    kind = up.add_mutually_exclusive_group(required=True)
    kind.add_argument("--ray", action="store_true", help="Ray head on 127.0.0.2 + workers on 127.0.0.3...")
    kind.add_argument("--flower", action="store_true", help="Flower SuperLink + SuperNodes on 127.0.0.1")
    up.add_argument("--nodes", type=int, default=2, help="Ray nodes including the head (max 8)")
    up.add_argument("--cpus-per-node", type=float, default=1, help="CPUs each Ray node declares")
    up.add_argument("--gpus-per-node", type=int, default=0, help="GPUs each Ray node declares")
    up.add_argument("--supernodes", type=int, default=2, help="Flower SuperNodes")
    up.add_argument("--insecure", action="store_true", help="Flower without TLS (TLS is on by default)")
    up.add_argument("--certs", default="", help="folder with ca.crt/server.pem/server.key (fedsim certs)")
    up.add_argument("--auth", action="store_true", help="enable SuperNode authentication (key per SuperNode)")
    for sub in (up, *(actions.add_parser(name, help=text) for name, text in
                      (("down", "stop the processes `up` started"), ("status", "show the cluster's processes")))):
        sub.add_argument("--state-dir", default=DEFAULT_STATE, help=f"cluster state folder (default {DEFAULT_STATE})")
    parser.set_defaults(func=_cluster)


def _cluster(args: argparse.Namespace) -> int:
    from fedsim.ops import cluster, procs

    state_dir = Path(args.state_dir)
    if args.action == "up":
        if args.ray:
            state = cluster.ray_up(state_dir, args.nodes, args.cpus_per_node, args.gpus_per_node)
            print(f"Ray cluster up: address {state.info['address']} ({args.nodes} nodes)")
            print(f"  use: ray_address = \"{state.info['address']}\" in [ddp] / [federated] / [parameter_server]")
        else:
            state = cluster.flower_up(state_dir, args.supernodes, insecure=args.insecure,
                                      certs_dir=Path(args.certs) if args.certs else None, auth=args.auth)
            print(f"Flower cluster up: SuperLink {state.info['address']}, {args.supernodes} SuperNodes")
            print(f"  run:  FLWR_HOME={state.info['flwr_home']} flwr run . {cluster.FLOWER_CONNECTION} --stream")
        for process in state.processes:
            print(f"  {process.role:12s} pid {process.pid}  {process.address}  log {process.log}")
        return 0
    if args.action == "down":
        stopped = cluster.down(state_dir)
        print(f"stopped {len(stopped)} processes" + "".join(f"\n  {p.role} pid {p.pid}" for p in stopped))
        return 0
    state = cluster.ClusterState.load(state_dir)
    if state is None:
        print(f"no cluster recorded in {state_dir}")
        return 0
    for process in state.processes:
        print(f"{process.role:12s} pid {process.pid} {'alive' if procs.alive(process) else 'dead'} {process.address}")
    return 0

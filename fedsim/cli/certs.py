"""``fedsim certs``: a CA and a server certificate for Flower's TLS."""

from __future__ import annotations

import argparse


def add_certs(subparsers: object) -> None:
    parser = subparsers.add_parser("certs", help="make a CA and a server certificate for Flower TLS",  # type: ignore[attr-defined]
                                   description="Write ca.crt/ca.key/server.pem/server.key into --out.")
    parser.add_argument("--out", default=".fedsim/certs", help="folder (default .fedsim/certs)")
    parser.add_argument("--host", action="append", default=[], help="extra host name or IP for the certificate")
    parser.set_defaults(func=_certs)


def _certs(args: argparse.Namespace) -> int:
    from fedsim.ops.certs import DEFAULT_HOSTS, make_certificates  # cryptography loads only for this command

    paths = make_certificates(args.out, DEFAULT_HOSTS + tuple(args.host))
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0

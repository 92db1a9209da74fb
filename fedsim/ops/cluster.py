"""Local clusters as plain processes on loopback: a Ray head + workers, or a Flower SuperLink +
SuperNodes. ``docker-compose.yml`` describes the same topologies for machines with Docker.

State (the processes started, their addresses) is kept in ``<state_dir>/cluster.json`` so that
``fedsim cluster down`` stops exactly those processes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.checkpoint import atomic_write_json, atomic_write_text
from fedsim.errors import FedsimError
from fedsim.ops import procs

MAX_RAY_NODES = 8  # 127.0.0.2 .. 127.0.0.9: Ray rewrites 127.0.0.1 to the host's address
WORKER_PORTS = 64  # worker processes per node, each with its own port
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0"}
FLOWER_CONNECTION = "fedsim-local"


@dataclass
class ClusterState:
    kind: str
    processes: list[procs.ManagedProcess] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, state_dir: Path) -> None:
        atomic_write_json(state_dir / "cluster.json", {
            "kind": self.kind, "info": self.info, "processes": [p.to_dict() for p in self.processes]})

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState | None:
        path = state_dir / "cluster.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return cls(raw["kind"], [procs.ManagedProcess(**p) for p in raw["processes"]], raw["info"])


def _bin(name: str) -> str:
    """Console scripts of the running interpreter's environment (not whatever is first on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _ray_node_ports(host: str, taken: set[int]) -> dict[str, int]:
    """Distinct ports for everything a Ray node listens on (several nodes share one machine).

    ``taken`` holds the ports already given out (GCS, client server, other nodes): a port freed
    after an earlier draw may be handed out again by the OS, and Ray refuses a port used twice.
    """
    names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port"]
    for _ in range(50):
        drawn = procs.free_ports(len(names), host)
        if not taken.intersection(drawn):
            break
    else:
        raise FedsimError(f"no {len(names)} free ports on {host} distinct from {sorted(taken)}")
    taken.update(drawn)
    ports = dict(zip(names, drawn, strict=True))
    # Worker ports: a block below the ephemeral range, so no port picked above can fall inside it.
    for _ in range(50):
        base = procs.free_port_range(WORKER_PORTS, host)
        if taken.isdisjoint(range(base, base + WORKER_PORTS)):
            break
    taken.update(range(base, base + WORKER_PORTS))
    ports["min-worker-port"], ports["max-worker-port"] = base, base + WORKER_PORTS - 1
    return ports


def ray_up(state_dir: Path, nodes: int, cpus_per_node: float = 1, gpus_per_node: int = 0,
           timeout: float = 120.0) -> ClusterState:
    """Start a Ray head on 127.0.0.2 and ``nodes - 1`` workers on 127.0.0.3, ..., each a session."""
    if not 1 <= nodes <= MAX_RAY_NODES:
        raise FedsimError(f"--nodes {nodes}: between 1 and {MAX_RAY_NODES} (127.0.0.2 .. 127.0.0.9)")
    _refuse_running(state_dir)
    head_host = "127.0.0.2"
    gcs_port, client_port = procs.free_ports(2, head_host)
    taken = {gcs_port, client_port}
    address = f"{head_host}:{gcs_port}"
    # A short temp dir: Ray's unix socket paths must stay under 107 characters.
    temp_dir = Path("/tmp") / f"fedsim-ray-{os.getpid()}-{gcs_port}"
    state = ClusterState("ray", info={"address": address, "temp_dir": str(temp_dir), "nodes": nodes})
    common = ["--block", "--disable-usage-stats", f"--num-cpus={cpus_per_node:g}", f"--num-gpus={gpus_per_node}"]
    try:
        for index in range(nodes):
            host = f"127.0.0.{index + 2}"
            ports = [f"--{k}={v}" for k, v in _ray_node_ports(host, taken).items()]
            if index == 0:
                cmd = [_bin("ray"), "start", "--head", f"--node-ip-address={host}", f"--port={gcs_port}",
                       "--include-dashboard=false", f"--ray-client-server-port={client_port}",
                       f"--temp-dir={temp_dir}", *ports, *common]
            else:
                cmd = [_bin("ray"), "start", f"--address={address}", f"--node-ip-address={host}", *ports, *common]
            # Nodes on one machine would all hand out GPU 0, 1, ...: give each its own GPUs.
            gpus = {"CUDA_VISIBLE_DEVICES": ",".join(str(index * gpus_per_node + g) for g in range(gpus_per_node))
                    } if gpus_per_node > 0 else {}
            process = procs.start(f"ray-{'head' if index == 0 else f'worker{index}'}", cmd,
                                  state_dir / f"ray-node{index}.log", {**QUIET_ENV, **gpus}, address=host)
            state.processes.append(process)
            state.save(state_dir)
            if index == 0:
                procs.wait_for_port(head_host, gcs_port, timeout, process)
        _wait_ray_nodes(address, nodes, timeout, state)
    except BaseException:
        procs.stop(state.processes)
        raise
    return state


def _wait_ray_nodes(address: str, nodes: int, timeout: float, state: ClusterState) -> None:
    """Ask the cluster (from a throw-away driver process) until ``nodes`` nodes are alive."""
    import subprocess

    probe = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False);"
             "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.monotonic() + timeout
    seen = "0"
    while time.monotonic() < deadline:
        dead = [p for p in state.processes if not procs.alive(p)]
        if dead:
            raise FedsimError(f"Ray node {dead[0].role} exited: {procs.log_tail(dead[0].log)}")
        result = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True,
                                timeout=max(deadline - time.monotonic(), 5), env=procs.child_env(QUIET_ENV))
        seen = (result.stdout.strip().splitlines() or ["0"])[-1]
        if seen.isdigit() and int(seen) >= nodes:
            return
        time.sleep(1.0)
    raise FedsimError(f"Ray cluster at {address}: {seen} of {nodes} nodes alive after {timeout:.0f}s")


def flower_up(state_dir: Path, supernodes: int, *, insecure: bool = False, certs_dir: Path | None = None,
              auth: bool = False, timeout: float = 60.0) -> ClusterState:
    """Start a SuperLink and ``supernodes`` SuperNodes on 127.0.0.1, each with its own port and FLWR_HOME.

    TLS is on unless ``insecure``: certificates come from ``certs_dir`` (made by ``fedsim certs``
    if missing). A ``$FLWR_HOME/config.toml`` under the state folder names the connection
    ``fedsim-local`` for ``flwr run . fedsim-local --stream``.
    """
    if supernodes < 1:
        raise FedsimError(f"--supernodes {supernodes}: at least 1")
    _refuse_running(state_dir)
    host = "127.0.0.1"
    port = procs.free_port(host)
    state = ClusterState("flower", info={"address": f"{host}:{port}", "supernodes": supernodes,
                                         "insecure": insecure})
    tls_link: list[str] = ["--insecure"]
    tls_node: list[str] = ["--insecure"]
    certs: dict[str, Path] = {}
    if not insecure:
        from fedsim.ops.certs import make_certificates

        certs_dir = certs_dir or state_dir / "certs"
        certs = {"ca_cert": certs_dir / "ca.crt", "server_cert": certs_dir / "server.pem",
                 "server_key": certs_dir / "server.key"}
        if not all(p.exists() for p in certs.values()):
            certs = make_certificates(certs_dir)
        tls_link = [f"--ssl-ca-certfile={certs['ca_cert']}", f"--ssl-certfile={certs['server_cert']}",
                    f"--ssl-keyfile={certs['server_key']}"]
        tls_node = [f"--root-certificates={certs['ca_cert']}"]
    auth_link, node_keys = ([], [])
    if auth:
        auth_link, node_keys = ["--enable-supernode-auth"], _supernode_keys(state_dir, supernodes)
    try:
        link = procs.start("superlink", [
            _bin("flower-superlink"), f"--host={host}", f"--port={port}", "--disable-runtime-dependency-installation",
            f"--fleet-api-address={host}:{port}", *tls_link, *auth_link,
        ], state_dir / "superlink.log", {**QUIET_ENV, "FLWR_HOME": str(state_dir / "home-superlink")},
            address=f"{host}:{port}")
        state.processes.append(link)
        state.save(state_dir)
        procs.wait_for_port(host, port, timeout, link)
        # The connection file first: `flwr supernode register` (auth) talks to the SuperLink through it.
        write_flower_connection(state_dir / "flwr-home", f"{host}:{port}", insecure, certs.get("ca_cert"))
        state.info["flwr_home"] = str(state_dir / "flwr-home")
        if auth:
            state.info["node_ids"] = [register_supernode(state_dir / "flwr-home", key.with_suffix(".pub"),
                                                         f"supernode{i}", timeout)
                                      for i, key in enumerate(node_keys)]
        for index in range(supernodes):
            node_port = procs.free_port(host)
            key_args = [f"--auth-supernode-private-key={node_keys[index]}"] if auth else []
            node = procs.start(f"supernode{index}", [
                _bin("flower-supernode"), f"--superlink={host}:{port}", f"--host={host}", f"--port={node_port}",
                f"--node-config=partition-id={index} num-partitions={supernodes}", *tls_node, *key_args,
            ], state_dir / f"supernode{index}.log",
                {**QUIET_ENV, "FLWR_HOME": str(state_dir / f"home-supernode{index}")}, address=f"{host}:{node_port}")
            state.processes.append(node)
            state.save(state_dir)
    except BaseException:
        procs.stop(state.processes)
        raise
    return state


def write_flower_connection(flwr_home: Path, address: str, insecure: bool, ca_cert: Path | None) -> Path:
    """``$FLWR_HOME/config.toml`` naming the SuperLink as connection ``fedsim-local``."""
    lines = ["[superlink]", f'default = "{FLOWER_CONNECTION}"', "", f"[superlink.{FLOWER_CONNECTION}]",
             f'address = "{address}"']
    lines.append("insecure = true" if insecure else f'root-certificates = "{ca_cert}"')
    path = flwr_home / "config.toml"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def register_supernode(flwr_home: Path, public_key: Path, name: str, timeout: float = 60.0) -> int:
    """Register a SuperNode's public key with the SuperLink (``flwr supernode register``); its node id.

    With ``--enable-supernode-auth`` (flwr >= 1.2x) the SuperLink keeps the allowed keys in its
    state, added through the Control API; a SuperNode whose key is not registered is refused.
    """
    import subprocess

    cmd = [_bin("flwr"), "supernode", "register", str(public_key), FLOWER_CONNECTION, "--name", name,
           "--format", "json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            env=procs.child_env({**QUIET_ENV, "FLWR_HOME": str(flwr_home)}))
    try:
        reply = json.loads(result.stdout[result.stdout.index("{"):])
    except ValueError:
        reply = {}
    if result.returncode != 0 or not reply.get("success"):
        raise FedsimError(f"registering {public_key} with the SuperLink failed: "
                          f"{(result.stdout + result.stderr).strip()[-1500:]}")
    return int(reply["node-id"])


def _supernode_keys(state_dir: Path, count: int) -> list[Path]:
    """One ECDSA P-384 key pair per SuperNode, both in OpenSSH format (flower-supernode reads the
    private key with ``load_ssh_private_key``; ``flwr supernode register`` takes the public one)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    paths = []
    for index in range(count):
        key = ec.generate_private_key(ec.SECP384R1())
        private = state_dir / "keys" / f"supernode{index}.key"
        atomic_write_text(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                     serialization.NoEncryption()).decode())
        atomic_write_text(private.with_suffix(".pub"), key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + "\n")
        private.chmod(0o600)
        paths.append(private)
    return paths


def _refuse_running(state_dir: Path) -> None:
    existing = ClusterState.load(state_dir)
    if existing and any(procs.alive(p) for p in existing.processes):
        raise FedsimError(f"a {existing.kind} cluster from {state_dir} is still running; `fedsim cluster down` first")


def down(state_dir: Path) -> list[procs.ManagedProcess]:
    """Stop exactly the processes recorded in ``state_dir`` (and their children); return them."""
    state = ClusterState.load(state_dir)
    if state is None:
        return []
    procs.stop(state.processes)
    if state.info.get("temp_dir"):  # Ray's session folders (sockets, logs) of this cluster only
        shutil.rmtree(state.info["temp_dir"], ignore_errors=True)
    (state_dir / "cluster.json").unlink(missing_ok=True)
    return state.processes

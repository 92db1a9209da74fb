"""`fedsim cluster up/down` start real Ray / Flower processes on loopback and stop exactly those."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.ops import procs
from fedsim.ops.certs import make_certificates

pytestmark = pytest.mark.slow


def fedsim_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedsim", *args], capture_output=True, text=True, timeout=timeout)


def recorded(state_dir: Path) -> list[procs.ManagedProcess]:
    raw = json.loads((state_dir / "cluster.json").read_text())
    return [procs.ManagedProcess(**p) for p in raw["processes"]]


def assert_all_gone(processes: list[procs.ManagedProcess]) -> None:
    for process in processes:
        assert not procs.session_members(process.pid), f"{process.role} (session {process.pid}) still running"


def test_ray_cluster_up_down_by_pid(tmp_path: Path) -> None:
    state = tmp_path / "ray"
    up = fedsim_cli("cluster", "up", "--ray", "--nodes", "2", "--state-dir", str(state))
    started = recorded(state) if (state / "cluster.json").exists() else []
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        assert [p.address for p in started] == ["127.0.0.2", "127.0.0.3"]
        assert all(procs.alive(p) for p in started)
        # Every Ray daemon of a node (gcs, raylet, ...) lives in the session the node's `ray start` leads.
        assert len(procs.session_members(started[0].pid)) > 2
    finally:
        down = fedsim_cli("cluster", "down", "--state-dir", str(state))
        procs.stop(started)  # no-op when `down` worked; cleans up if it did not
    assert down.returncode == 0, down.stderr
    assert_all_gone(started)


def test_flower_cluster_tls_up_down_by_pid(tmp_path: Path) -> None:
    state = tmp_path / "flower"
    up = fedsim_cli("cluster", "up", "--flower", "--supernodes", "2", "--state-dir", str(state))
    started = recorded(state) if (state / "cluster.json").exists() else []
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        assert [p.role for p in started] == ["superlink", "supernode0", "supernode1"]
        config = (state / "flwr-home" / "config.toml").read_text()
        assert "root-certificates" in config and "insecure" not in config  # TLS by default
        assert all(procs.alive(p) for p in started)
    finally:
        down = fedsim_cli("cluster", "down", "--state-dir", str(state))
        procs.stop(started)
    assert down.returncode == 0
    assert_all_gone(started)


def test_certificates_chain_to_the_ca(tmp_path: Path) -> None:
    from cryptography import x509

    paths = make_certificates(tmp_path)
    ca = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert oct(paths["server_key"].stat().st_mode & 0o777) == "0o600"

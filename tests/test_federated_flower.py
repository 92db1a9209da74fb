"""The federated apps on Flower's own machinery: ``run_simulation`` (Ray) and ``flwr run . --stream``.

Slow: each starts Ray actors (and the second a SuperLink). The SuperLink is started by the test
itself, on free loopback ports with a temporary FLWR_HOME, so ``flwr run`` finds it running and
the test stops exactly the process group it started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsim.config import experiment_from_dict
from fedsim.engines.common import RunContext
from fedsim.engines.federated.engine import run_federated
from fedsim.results import RunDir

TINY = "tests.helpers.tiny_task:TinyTask"
BIN = Path(sys.executable).parent


def run_config(engine: str) -> dict[str, Any]:
    return {
        "name": "fed", "task": TINY, "mode": "federated", "task_options": {"hidden": 8},
        "train": {"lr": 0.2, "batch_size": 16, "progress": False, "threads": 1, "dtype": "float64"},
        "federated": {"engine": engine, "num_clients": 4, "clients_per_round": 3, "rounds": 3, "strategy": "scaffold",
                      "partition": "dirichlet", "alpha": 0.5, "dropout_fraction": 0.3, "cpus_per_client": 1.0},
    }


@pytest.mark.slow
def test_run_simulation_equals_local_grid_and_survives_failing_clients(tmp_path: Path) -> None:
    """Same seed, same rounds on Ray actors as in-process: identical parameters; raising clients are logged."""
    results = {}
    for engine in ("flower", "local"):
        run = experiment_from_dict(run_config(engine)).runs[0]
        results[engine] = run_federated(run, RunContext(out=RunDir(tmp_path / engine)))
    flower, local = results["flower"], results["local"]
    for record in flower["history"][1:]:
        assert len(record["failed"]) == 1  # one of three sampled clients raised in its ClientApp
        assert len(record["aggregated"]) == 2
    for name, value in flower["model"].state_dict().items():
        assert torch.equal(value, local["model"].state_dict()[name]), name
    assert [h["test_accuracy"] for h in flower["history"]] == [h["test_accuracy"] for h in local["history"]]
    assert flower["metrics"]["accuracy"] > 0.3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "flower-superlink exited during startup"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("flower-superlink did not become healthy")


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group we started (SuperLink + its simulation child), then SIGKILL."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    try:  # the simulation child exits when its parent is gone; make sure of it
        os.killpg(process.pid, 0)
        time.sleep(3)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_flwr_run_stream_runs_the_app(tmp_path: Path, repo_root: str) -> None:
    http_port, control_port = free_port(), free_port()
    home = tmp_path / "flwr_home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control_port), "FLWR_TELEMETRY_ENABLED": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    # The command `flwr run` would start itself (flwr/cli/local_superlink.py), minus the dependency
    # install into a fresh environment (the test environment already has everything).
    superlink = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1", "--port", str(http_port),
         "--database", str(home / "state.db"), "--disable-runtime-dependency-installation"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = tmp_path / "results"
    try:
        wait_healthy(http_port, superlink)
        completed = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "--stream", "--federation-config", "num-supernodes=3",
             "--run-config", f'out="{out}"', "--run-config", 'overrides="federated.rounds=2;train.threads=1"'],
            cwd=repo_root, env=env, capture_output=True, text=True, timeout=420)
    finally:
        stop_group(superlink)
    log = completed.stdout + completed.stderr
    assert completed.returncode == 0, log[-3000:]
    assert "fedsim: 3 SuperNodes in this federation" in log, log[-3000:]
    final = [line for line in log.splitlines() if line.startswith("fedsim: final ")]
    assert final, log[-3000:]
    metrics = json.loads(final[-1][len("fedsim: final "):])
    assert metrics["accuracy"] > 0.2
    summary = json.loads((out / "flower_app" / "flower_app-seed0" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["config"]["federated"]["num_clients"] == 3


@pytest.mark.slow
def test_central_vs_federated_experiment_file(tmp_path: Path, repo_root: str) -> None:
    """The README's experiment, shrunk, on Flower's simulation: shares one simulation, writes table + PNG."""
    from fedsim.cli import main

    experiment = Path(repo_root) / "experiments" / "central_vs_federated.toml"
    code = main(["run", str(experiment), "--out", str(tmp_path), "--set", "federated.engine=flower",
                 "--set", "seeds=[0]", "--set", "train.epochs=1",
                 "--set", "federated.rounds=2", "--set", "federated.num_clients=6",
                 "--set", "federated.clients_per_round=3", "--only", "central", "--only", "fedavg-iid",
                 "--only", "fedprox-dir0.1"])
    assert code == 0
    folder = tmp_path / "central_vs_federated"
    table = (folder / "comparison.md").read_text()
    assert table.count("\n| ") == 3 and "fedprox mu=0.1" in table
    assert (folder / "comparison.png").stat().st_size > 10_000
    first = json.loads((folder / "fedavg-iid-seed0" / "summary.json").read_text())
    second = json.loads((folder / "fedprox-dir0.1-seed0" / "summary.json").read_text())
    assert first["engine"] == "flower" and first["startup_s"] > 0  # Ray started once ...
    assert second["startup_s"] == 0  # ... and the second run reused its SuperNodes
    assert len(second["history"]) == 3 and second["metrics"]["bytes_total"] > 0

"""A real Flower deployment from ``fedsim cluster up --flower``: SuperLink + SuperNodes on 127.0.0.1
with TLS, ``flwr run . fedsim-local --stream`` against it, a SuperNode killed mid-round, and
SuperNode authentication.

Deployment starts a fresh ClientApp process per message (seconds each here), so the runs are
one or two rounds of a tiny MLP. Every cluster is stopped with ``fedsim cluster down`` and checked
by PID; the ``flwr run`` processes run in their own sessions and are killed by session on timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from fedsim.checkpoint import load_checkpoint
from fedsim.ops import procs
from fedsim.ops.cluster import FLOWER_CONNECTION, ClusterState
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

EXPERIMENT = """
name = "deploy"
mode = "federated"
task = "tests.helpers.tiny_task:TinyTask"
task_options = {hidden = 8}
seeds = [3]
[train]
lr = 0.2
batch_size = 16
threads = 1
dtype = "float64"
progress = false
[federated]
engine = "flower"
num_clients = 2
rounds = 2
partition = "dirichlet"
alpha = 1.0
cpus_per_client = 1.0
"""

ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
BIN = Path(sys.executable).parent


def fedsim_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedsim", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT, env=ENV)


def cluster_up(state_dir: Path, *args: str) -> list[procs.ManagedProcess]:
    up = fedsim_cli("cluster", "up", "--flower", *args, "--state-dir", str(state_dir))
    state = ClusterState.load(state_dir)
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    assert state is not None
    return state.processes


def cluster_down(state_dir: Path, started: list[procs.ManagedProcess]) -> None:
    down = fedsim_cli("cluster", "down", "--state-dir", str(state_dir), timeout=120)
    procs.stop(started)  # a no-op when `down` worked
    assert down.returncode == 0, down.stderr
    for process in started:
        assert not procs.session_members(process.pid), f"{process.role} (session {process.pid}) still running"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("flower_cluster")
    state_dir = root / "state"
    (root / "deploy.toml").write_text(EXPERIMENT)
    started: list[procs.ManagedProcess] = []
    try:
        started = cluster_up(state_dir, "--supernodes", "2")  # TLS: the default
        yield {"root": root, "state_dir": state_dir, "processes": started}
    finally:
        cluster_down(state_dir, started or (ClusterState.load(state_dir) or ClusterState("flower")).processes)


def flwr_run(deployment: dict[str, Any], out: Path, overrides: str = "") -> subprocess.Popen[str]:
    """``flwr run . fedsim-local --stream`` from the repository (the app), with the cluster's FLWR_HOME."""
    run_config = f'experiment="{deployment["root"] / "deploy.toml"}" out="{out}" overrides="{overrides}"'
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 - the process owns it until it exits
    return subprocess.Popen([str(BIN / "flwr"), "run", ".", FLOWER_CONNECTION, "--stream", "--run-config", run_config],
                            cwd=REPO_ROOT, env={**ENV, "FLWR_HOME": str(deployment["state_dir"] / "flwr-home")},
                            stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen[str], out: Path, timeout: float = 480) -> str:
    try:
        code = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:  # the session this test started, nothing else
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    log = out.with_suffix(".log").read_text(errors="replace")
    assert code == 0, log[-4000:]
    return log


def test_flwr_run_on_two_tls_supernodes_matches_the_simulation(deployment: dict[str, Any]) -> None:
    from fedsim.config import load_experiment, run_with_seed
    from fedsim.engines.common import RunContext
    from fedsim.engines.federated.engine import run_federated
    from fedsim.results import RunDir

    config = (deployment["state_dir"] / "flwr-home" / "config.toml").read_text()
    assert "root-certificates" in config and "insecure" not in config
    out = deployment["root"] / "deployed"
    process = flwr_run(deployment, out)
    log = finish(process, out)
    folder = out / "deploy" / "deploy-seed3"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["config"]["federated"]["num_clients"] == 2, log[-2000:]
    assert all(r["aggregated"] == [0, 1] and not r["failed"] for r in summary["history"][1:])
    deployed = load_checkpoint(folder / "checkpoint.pt")["model"]

    # The same run (seed 3, the same Dirichlet partitions) in Flower's simulation, in this process.
    torch.set_num_threads(1)
    experiment = load_experiment(deployment["root"] / "deploy.toml")
    run = run_with_seed(experiment.runs[0], 3)
    simulated = run_federated(run, RunContext(out=RunDir(deployment["root"] / "simulated")))
    reference = simulated["model"].state_dict()
    assert deployed.keys() == reference.keys()
    diff = max(float((deployed[k] - reference[k]).abs().max()) for k in reference)
    assert diff < 1e-6, diff
    assert summary["metrics"]["accuracy"] == pytest.approx(simulated["metrics"]["accuracy"], abs=1e-9)
    # The virtual clock is the ServerApp's: the deployed run's simulated times are the simulation's, and the
    # real wall time of each round is reported beside them.
    assert [h["sim_time_s"] for h in summary["history"]] == [h["sim_time_s"] for h in simulated["history"]]
    assert summary["metrics"]["sim_time_s"] == simulated["metrics"]["sim_time_s"] > 0
    assert all(h["round_time_s"] > 0 and h["sim_round_s"] > 0 for h in summary["history"][1:])


# The reply timeout must cover a live client's whole reply: a fresh ClientApp process (imports of
# torch + flwr) plus its training. ~20 s is enough on an idle machine; the shared 2-core CI box
# measured 43 s per round, so the test gives 60 s (override with FEDSIM_TEST_REPLY_TIMEOUT_S).
REPLY_TIMEOUT_S = float(os.environ.get("FEDSIM_TEST_REPLY_TIMEOUT_S", "60"))


def test_killed_supernode_times_out_and_the_round_finishes_without_it(deployment: dict[str, Any]) -> None:
    """SuperNode 1 dies right after the server's "round 1 started" marker: with a short reply timeout
    the round aggregates node 0 alone and the run completes."""
    out = deployment["root"] / "killed"
    process = flwr_run(deployment, out, f"federated.rounds=1;federated.reply_timeout_s={REPLY_TIMEOUT_S:g}")
    marker = out / "deploy" / "deploy-seed3" / "round_started.json"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, out.with_suffix(".log").read_text()[-3000:]
        time.sleep(0.1)
    assert json.loads(marker.read_text())["round"] == 1
    victim = next(p for p in deployment["processes"] if p.role == "supernode1")
    for member in procs.session_members(victim.pid):  # a crash, not a clean shutdown: SIGKILL the session
        try:
            member.kill()
        except psutil.Error:
            pass
    finish(process, out)
    summary = json.loads((out / "deploy" / "deploy-seed3" / "summary.json").read_text())
    record = summary["history"][1]
    assert record["aggregated"] == [0] and record["failed"] == [1], record
    assert summary["metrics"]["failed_client_rounds"] == 1
    assert not procs.session_members(victim.pid)


def test_authenticated_supernode_connects_and_an_unregistered_one_is_refused(tmp_path: Path) -> None:
    state_dir = tmp_path / "auth"
    started: list[procs.ManagedProcess] = []
    stranger: procs.ManagedProcess | None = None
    try:
        started = cluster_up(state_dir, "--supernodes", "1", "--auth")
        state = ClusterState.load(state_dir)
        assert state is not None
        registered = state.info["node_ids"][0]
        link = next(p for p in started if p.role == "superlink")
        assert "--enable-supernode-auth" in " ".join(psutil.Process(link.pid).cmdline())
        wait_for_line(Path(link.log), f"Activated node_id={registered}", 120)
        # A SuperNode with a key the SuperLink never registered is refused.
        from fedsim.ops.cluster import _supernode_keys

        key = _supernode_keys(tmp_path / "stranger", 1)[0]
        stranger = procs.start("stranger", [
            str(BIN / "flower-supernode"), f"--superlink={state.info['address']}", "--host=127.0.0.1",
            f"--port={procs.free_port()}", f"--root-certificates={state_dir / 'certs' / 'ca.crt'}",
            f"--auth-supernode-private-key={key}", "--node-config=partition-id=1 num-partitions=2",
        ], tmp_path / "stranger.log", ENV)
        text = wait_for_line(tmp_path / "stranger.log", "", 120, until=lambda t: "ERROR" in t or "denied" in t.lower())
        assert "Failed to activate SuperNode" in text and "SuperNode ID" not in text, text[-2000:]
        assert f"Activated node_id={registered}" in Path(link.log).read_text()
    finally:
        if stranger is not None:
            procs.stop([stranger])
        cluster_down(state_dir, started)


def wait_for_line(path: Path, needle: str, timeout: float, until: Any = None) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if (until(text) if until else needle in text):
            return text
        time.sleep(0.5)
    raise TimeoutError(f"{path}: no {needle or 'match'} after {timeout:.0f}s:\n{text[-2000:]}")

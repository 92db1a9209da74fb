"""A real 2-node Ray cluster from ``fedsim cluster up --ray``: DDP across its nodes, Flower's simulation
on the same cluster, and Ray Train surviving a killed worker and a lost node.

The cluster (head on 127.0.0.2, worker on 127.0.0.3, 2 CPUs each) is started once for the module
and stopped by ``fedsim cluster down``, which stops exactly the sessions it recorded; the test
then checks by PID that none of them is left. Order matters: the node-loss test runs last, it
destroys the worker node.

Faults are placed deterministically: with ``ddp.fault_marker`` the chosen rank(s) write where they
are (pid, node) at ``ddp.fail_at_step`` and wait; the test then kills that process / node.
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

import pytest
import torch

from fedsim.checkpoint import load_checkpoint
from fedsim.ops import procs
from fedsim.ops.cluster import ClusterState
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

DDP = """
name = "clusterddp"
mode = "ddp"
task = "tests.helpers.tiny_task:TinyTask"
[train]
epochs = 3
max_steps = 4
batch_size = 8
lr = 0.1
dtype = "float64"
threads = 1
progress = false
[ddp]
launcher = "ray"
nproc = 1
nnodes = 2
max_restarts = 1
timeout_s = 240
"""

FED = """
name = "clusterfed"
mode = "federated"
task = "tests.helpers.tiny_task:TinyTask"
task_options = {hidden = 8}
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
partition = "iid"
cpus_per_client = 2.0
"""

HEAD, WORKER = "127.0.0.2", "127.0.0.3"
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}


def fedsim_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedsim", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT, env=ENV)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("ray_cluster")
    state_dir = root / "state"
    up = fedsim_cli("cluster", "up", "--ray", "--nodes", "2", "--cpus-per-node", "2", "--state-dir", str(state_dir))
    state = ClusterState.load(state_dir)
    started = state.processes if state else []
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        assert state is not None and [p.address for p in started] == [HEAD, WORKER]
        (root / "ddp.toml").write_text(DDP)
        (root / "fed.toml").write_text(FED)
        yield {"root": root, "address": state.info["address"], "processes": started, "state_dir": state_dir}
    finally:
        down = fedsim_cli("cluster", "down", "--state-dir", str(state_dir), timeout=120)
        procs.stop(started)  # a no-op when `down` worked
    assert down.returncode == 0, down.stderr
    for process in started:
        assert not procs.session_members(process.pid), f"{process.role} (session {process.pid}) still running"


def run_ddp(cluster: dict[str, Any], out: Path, *sets: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "fedsim", "run", str(cluster["root"] / "ddp.toml"), "--out", str(out),
            "--set", f"ddp.ray_address={cluster['address']}", *(a for s in sets for a in ("--set", s))]
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 - closed with the process below
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT, env=ENV,
                            start_new_session=True)


def finish(process: subprocess.Popen[str], out: Path, timeout: float = 300) -> dict[str, Any]:
    try:
        code = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:  # stop exactly the driver session this test started
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    log = out.with_suffix(".log").read_text(errors="replace")
    assert code == 0, log[-4000:]
    folder = out / "clusterddp" / "clusterddp"
    summary = json.loads((folder / "summary.json").read_text())
    summary["params"] = load_checkpoint(folder / "checkpoint.pt")["model"]
    return summary


def wait_for(paths: list[Path], process: subprocess.Popen[str], timeout: float = 180) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [json.loads(p.read_text()) for p in paths if p.exists()]
        if found:
            return found
        assert process.poll() is None, "the run ended before the fault marker appeared"
        time.sleep(0.2)
    raise TimeoutError(f"no fault marker among {paths} after {timeout:.0f}s")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(cluster: dict[str, Any]) -> dict[str, Any]:
    out = cluster["root"] / "ddp-clean"
    return finish(run_ddp(cluster, out), out)


def test_ddp_one_worker_per_node_and_flower_simulation_on_the_same_cluster(
        cluster: dict[str, Any], uninterrupted: dict[str, Any]) -> None:
    summary = uninterrupted
    assert summary["launcher"] == "ray" and summary["world_size"] == 2 and summary["steps"] == 12
    assert summary["ray_address"] == cluster["address"]
    nodes = {w["rank"]: w["node_ip"] for w in summary["workers"]}
    assert sorted(nodes) == [0, 1] and sorted(nodes.values()) == [HEAD, WORKER], summary["workers"]
    assert summary["history"][-1]["test_accuracy"] > 0.3

    # Flower's simulation attaches to the same cluster: its ClientApp actors run on both nodes.
    out = cluster["root"] / "fed"
    fed = fedsim_cli("run", str(cluster["root"] / "fed.toml"), "--out", str(out),
                     "--set", f"federated.ray_address={cluster['address']}")
    assert fed.returncode == 0, fed.stdout[-3000:] + fed.stderr[-3000:]
    fed_summary = json.loads((out / "clusterfed" / "clusterfed" / "summary.json").read_text())
    assert fed_summary["rounds"] == 2 and fed_summary["metrics"]["accuracy"] > 0.5
    assert all(not r["failed"] for r in fed_summary["history"][1:])
    assert actor_nodes(cluster["address"], "ClientAppActor") == {HEAD, WORKER}


def actor_nodes(address: str, class_name: str) -> set[str]:
    """Node IPs of every actor of ``class_name`` the cluster ever ran (from its GCS actor table)."""
    probe = ("import json, sys, ray\n"
             "from ray._private.state import actors\n"  # the GCS table; ray.util.state needs a dashboard
             "ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2], logging_level='ERROR', log_to_driver=False)\n"
             "print(json.dumps([[a['ActorClassName'], a['Address']['IPAddress']] for a in actors().values()]))\n")
    result = subprocess.run([sys.executable, "-c", probe, address, HEAD], capture_output=True, text=True,
                            timeout=120, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    return {ip for name, ip in json.loads(result.stdout.strip().splitlines()[-1]) if name == class_name}


def test_killed_ray_train_worker_restarts_from_the_last_checkpoint(
        cluster: dict[str, Any], uninterrupted: dict[str, Any]) -> None:
    out = cluster["root"] / "ddp-killed-worker"
    marker = cluster["root"] / "worker-fault.json"
    # Step 6 is in epoch 2: epoch 1's checkpoint exists when rank 1 stops there and gets SIGKILLed.
    process = run_ddp(cluster, out, "ddp.fail_at_step=6", "ddp.fail_rank=1", f"ddp.fault_marker={marker}")
    victim = wait_for([marker], process)[0]
    os.kill(victim["pid"], signal.SIGKILL)  # exactly the worker process that reported itself
    summary = finish(process, out)
    # The restarted group resumed from epoch 1's checkpoint: its rank 1 did not reach the fault again.
    assert json.loads(marker.read_text())["pid"] == victim["pid"]
    pids = [w["pid"] for w in summary["workers"]]
    assert victim["pid"] in pids and len(pids) == 4, summary["workers"]  # two worker groups of two
    assert summary["steps"] == 12 and [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    # Resumed from epoch 1's checkpoint (weights, optimiser, RNG): the same result as without the fault.
    assert max_diff(summary["params"], uninterrupted["params"]) < 1e-12


def test_lost_node_is_replaced_by_spare_capacity_on_the_head(
        cluster: dict[str, Any], uninterrupted: dict[str, Any]) -> None:
    """The worker node dies mid-run; the head's spare CPU (2 per node, 1 per worker) takes both workers."""
    out = cluster["root"] / "ddp-lost-node"
    marker = cluster["root"] / "node-fault.json"
    process = run_ddp(cluster, out, "ddp.fail_at_step=6", "ddp.fail_rank=-1", f"ddp.fault_marker={marker}")
    markers = [Path(f"{marker}.rank{r}") for r in range(2)]
    deadline = time.monotonic() + 180
    while len(seen := [json.loads(p.read_text()) for p in markers if p.exists()]) < 2:
        assert time.monotonic() < deadline and process.poll() is None, f"fault markers: {seen}"
        time.sleep(0.2)
    assert {m["node_ip"] for m in seen} == {HEAD, WORKER}, seen
    worker_node = next(p for p in cluster["processes"] if p.address == WORKER)
    procs.stop([worker_node])  # the whole node: its raylet, object store and Ray Train worker
    summary = finish(process, out)
    assert [json.loads(p.read_text()) for p in markers] == seen  # resumed past the fault: no new markers
    after = [w for w in summary["workers"] if w["pid"] not in {m["pid"] for m in seen}]
    assert len(after) == 2 and {w["node_ip"] for w in after} == {HEAD}, summary["workers"]
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    assert max_diff(summary["params"], uninterrupted["params"]) < 1e-12

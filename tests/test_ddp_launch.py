"""Launch paths of data-parallel runs, for real: ``fedsim run`` spawning torchrun, a killed worker
and torchrun's restart, two c10d "nodes" on 127.0.0.1, Ray Train workers, errors and timeouts.

Every job trains the same small run; the uninterrupted ``fedsim run`` (torchrun, 2 gloo ranks) is
the reference whose final parameters the other paths must reproduce.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from fedsim.checkpoint import load_checkpoint
from fedsim.engines.parallel.launch import run_with_timeout
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

EXPERIMENT = """
name = "tinyddp"
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
nproc = 2
timeout_s = 240
"""


def _fedsim(args: list[str], cwd: str, timeout: float = 300) -> int:
    return run_with_timeout([sys.executable, "-m", "fedsim", "run", *args], timeout, what="fedsim run", cwd=cwd)


def _fedsim_captured(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The CLI in this process, for runs that must fail before anything is launched: (exit code, stderr)."""
    from fedsim.cli import main

    code = main(["run", *args])
    return code, capsys.readouterr().err


def _params(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder / "checkpoint.pt")["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp_launch")
    (root / "tiny.toml").write_text(EXPERIMENT)
    return root


@pytest.fixture(scope="module")
def reference(workdir: Path) -> dict[str, Any]:
    """`fedsim run FILE` with mode = "ddp" spawns torchrun itself (2 gloo ranks), uninterrupted."""
    assert _fedsim([str(workdir / "tiny.toml"), "--out", str(workdir / "ref")], REPO_ROOT) == 0
    folder = workdir / "ref" / "tinyddp" / "tinyddp"
    return {"params": _params(folder), "summary": json.loads((folder / "summary.json").read_text()), "folder": folder}


def test_fedsim_run_spawns_torchrun_and_writes_results(reference: dict[str, Any]) -> None:
    summary = reference["summary"]
    assert summary["mode"] == "ddp" and summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert summary["steps"] == 12 and summary["global_batch_size"] == 16 and summary["restart_count"] == 0
    records = [json.loads(line) for line in (reference["folder"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["test_accuracy"] > 0.3  # it learns (chance is 0.1)
    assert (reference["folder"] / "launch.json").exists()


def test_killed_worker_restarts_and_resumes_to_the_same_parameters(
        workdir: Path, reference: dict[str, Any], repo_root: str, capfd: pytest.CaptureFixture[str]) -> None:
    # Execute: rank 1 SIGKILLs itself at global step 6 (epoch 2); torchrun --max-restarts 1 restarts
    # the group, which resumes from the checkpoint of epoch 1.
    out = workdir / "restart"
    code = _fedsim([str(workdir / "tiny.toml"), "--out", str(out), "--set", "ddp.fail_at_step=6",
                    "--set", "ddp.fail_rank=1", "--set", "ddp.max_restarts=1"], repo_root)
    captured = capfd.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "rank 1 killing itself at step 6" in captured.err
    folder = out / "tinyddp" / "tinyddp"
    summary = json.loads((folder / "summary.json").read_text())
    # Assert: a restart happened, from epoch 1, and training ended where the uninterrupted run did.
    assert summary["restart_count"] == 1 and summary["resumed_from_epoch"] == 1 and summary["steps"] == 12
    assert _max_diff(_params(folder), reference["params"]) < 1e-12
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]


def test_killed_worker_without_restarts_fails_the_run(workdir: Path, repo_root: str,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    code = _fedsim([str(workdir / "tiny.toml"), "--out", str(workdir / "norestart"), "--set", "ddp.fail_at_step=2"],
                   repo_root)
    assert code == 2
    assert "torchrun for run 'tinyddp' exited with code" in capfd.readouterr().err


def test_two_nodes_rendezvous_on_loopback(workdir: Path, reference: dict[str, Any], repo_root: str) -> None:
    # Execute: two torchrun "nodes" of one process each meet at a c10d endpoint on 127.0.0.1.
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "fedsim-two-nodes",
               "-m", "fedsim", "run", str(workdir / "tiny.toml"), "--out", str(workdir / f"node{node}")]
        nodes.append(subprocess.Popen(cmd, start_new_session=True, cwd=repo_root))
    try:
        codes = [p.wait(timeout=240) for p in nodes]
    finally:
        from fedsim.engines.parallel.launch import terminate_tree

        for p in nodes:
            if p.poll() is None:
                terminate_tree(p)
    assert codes == [0, 0]
    # Assert: c10d gives global rank 0 to whichever node joined first; that one wrote the results.
    written = [workdir / f"node{n}" / "tinyddp" / "tinyddp" for n in range(2)
               if (workdir / f"node{n}" / "tinyddp" / "tinyddp" / "summary.json").exists()]
    assert len(written) == 1
    summary = json.loads((written[0] / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert _max_diff(_params(written[0]), reference["params"]) < 1e-12


def test_ray_train_two_workers_reach_the_torchrun_parameters(workdir: Path, reference: dict[str, Any],
                                                             repo_root: str) -> None:
    out = workdir / "ray"
    assert _fedsim([str(workdir / "tiny.toml"), "--out", str(out), "--set", "ddp.launcher=ray"], repo_root) == 0
    folder = out / "tinyddp" / "tinyddp"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["launcher"] == "ray" and summary["world_size"] == 2 and summary["steps"] == 12
    assert _max_diff(_params(folder), reference["params"]) < 1e-12
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 3


def test_timeout_stops_the_job_and_every_process_it_started(workdir: Path, repo_root: str,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    out = workdir / "timeout"
    code = _fedsim([str(workdir / "tiny.toml"), "--out", str(out), "--set", "ddp.timeout_s=3",
                    "--set", "train.epochs=100000", "--set", "train.max_steps=0"], repo_root)
    assert code == 2
    assert "did not finish within 3 s" in capfd.readouterr().err
    spec = str(out / "tinyddp" / "tinyddp" / "launch.json")
    leftovers = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if spec in " ".join(proc.info["cmdline"] or []):
                leftovers.append(proc.pid)
        except psutil.Error:
            continue
    assert leftovers == []


# ---- errors: a clear message and a non-zero exit, before anything is launched ------------------
def test_per_rank_batch_of_zero_exits_non_zero(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _fedsim_captured([str(workdir / "tiny.toml"), "--set", "train.batch_size=0", "--out",
                                  str(workdir / "err")], capsys)
    assert code == 2
    # Refused when the experiment is loaded, before torchrun starts (the validation pass).
    assert "tiny.toml: key 'train.batch_size' = 0: must be >= 1" in err and len(err.strip().splitlines()) == 1


def test_task_that_cannot_run_data_parallel_exits_non_zero(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _fedsim_captured([str(workdir / "tiny.toml"), "--set", "task=gan", "--out", str(workdir / "err")],
                                 capsys)
    assert code == 2
    assert "task 'gan' cannot run data-parallel" in err


def test_port_in_use_exits_non_zero(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        code, err = _fedsim_captured([str(workdir / "tiny.toml"), "--set", f'ddp.rdzv_endpoint="127.0.0.1:{port}"',
                                      "--out", str(workdir / "err")], capsys)
    assert code == 2
    assert f"port {port} on 127.0.0.1 is already in use" in err


def test_the_ddp_digits_experiment_runs_under_fedsim_run(tmp_path: Path, repo_root: str) -> None:
    exp = Path(repo_root) / "experiments" / "ddp_digits.toml"
    code = _fedsim([str(exp), "--out", str(tmp_path), "--set", "train.epochs=1", "--set", "train.max_steps=5"],
                   repo_root)
    assert code == 0
    summary = json.loads((tmp_path / "ddp_digits" / "ddp_digits" / "summary.json").read_text())
    assert summary["task"] == "bn_cnn" and summary["world_size"] == 2 and summary["steps"] == 5
    assert summary["config"]["ddp"]["sync_bn"] is True

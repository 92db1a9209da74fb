"""Parameter server on real Ray actors: sync == large-batch central, async staleness, placement errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import fedsim
from fedsim.errors import FedsimError, UnsupportedError

TINY = "tests.helpers.tiny_task:TinyTask"
EXACT = {"dtype": "float64", "threads": 1, "optimizer": "sgd", "momentum": 0.0, "lr": 0.1, "progress": False,
         "checkpoint": False}


def ps(name: str, train: dict, **options: object) -> dict:
    return {"name": name, "task": TINY, "mode": "parameter_server", "train": train,
            "parameter_server": {"ray_num_cpus": 2, **options}}


def ray_is_down() -> bool:
    import ray

    return not ray.is_initialized()


@pytest.fixture(scope="class")
def callers_ray() -> Iterator[None]:
    """One Ray session for the tests that train (the engine uses a caller's session and leaves it up)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
class TestInACallersSession:
    """Runs that share one Ray session started by the caller (torn down after this class)."""

    def test_sync_equals_central_with_batch_w_times_b_and_resumes(self, tmp_path: Path, callers_ray: None) -> None:
        # W=2 workers x b=8 for one full epoch (90 steps; the last global batch has 13 samples, split 7/6)
        # must take exactly the steps of central training with batch 16 over the same samples.
        import ray

        workers, batch = 2, 8
        train = {**EXACT, "batch_size": batch, "momentum": 0.9, "checkpoint": True}  # torch SGD with momentum

        def server_run(epochs: int, resume: bool = False) -> dict:
            config = ps("sync", {**train, "epochs": epochs}, workers=workers, variant="sync", steps=0)
            return fedsim.run(config, out=tmp_path, resume=resume, quiet=True)[0]

        def central_run(epochs: int) -> dict:
            config = {"name": f"central{epochs}", "task": TINY,
                      "train": {**train, "batch_size": workers * batch, "epochs": epochs}}
            return fedsim.run(config, out=tmp_path, quiet=True)[0]

        server, central = server_run(1), central_run(1)
        assert server["steps"] == 90 == central["steps"]
        for key, value in central["model"].state_dict().items():
            assert (server["model"].state_dict()[key] - value).abs().max() < 1e-5, key
        assert abs(server["metrics"]["accuracy"] - central["metrics"]["accuracy"]) < 1e-9
        assert server["staleness"]["max"] == 0  # sync: every gradient is computed on the current version
        steps = [json.loads(line) for line in (tmp_path / "sync" / "sync" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in steps if r["kind"] == "step"] == list(range(1, 91))
        assert steps[-2]["samples"] == 13
        # --resume continues from the epoch-1 checkpoint (server optimizer state, worker positions) and
        # lands where two uninterrupted central epochs do.
        resumed, central2 = server_run(2, resume=True), central_run(2)
        assert resumed["steps"] == 180 == central2["steps"]
        for key, value in central2["model"].state_dict().items():
            assert (resumed["model"].state_dict()[key] - value).abs().max() < 1e-5, key
        assert [h["epoch"] for h in resumed["history"]] == [1, 2]
        assert ray.is_initialized()  # the caller's session is left running


    def test_async_applies_on_arrival_and_reports_staleness(self, tmp_path: Path, callers_ray: None) -> None:
        total = 40
        summary = fedsim.run(ps("async", {"batch_size": 16, "lr": 0.05, "progress": False, "threads": 1}, workers=2,
                                variant="async", steps=total), out=tmp_path, quiet=True)[0]
        records = [json.loads(line) for line in (tmp_path / "async" / "async" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if r["kind"] == "step"]
        assert [r["step"] for r in steps] == list(range(1, total + 1))
        assert all(isinstance(r["staleness"], int) and 0 <= r["staleness"] < r["step"] for r in steps)
        histogram = summary["staleness"]["histogram"]
        assert sum(histogram.values()) == total
        assert summary["staleness"]["max"] >= 1  # two workers in flight: one of them always computed on an old version
        assert sorted({r["worker"] for r in steps}) == [0, 1]
        epochs = [r for r in records if r["kind"] == "epoch"]
        assert epochs and "staleness_mean" in epochs[-1] and "test_accuracy" in epochs[-1]
        assert summary["metrics"]["accuracy"] > 0.3  # 40 noisy steps from 10% (chance)


@pytest.mark.slow
def test_more_workers_than_ray_can_place_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FedsimError, match=r"workers = 3 .* needs 3 CPU but the Ray cluster has 2"):
        fedsim.run(ps("big", {"progress": False}, workers=3, cpus_per_worker=1.0), out=tmp_path, quiet=True)
    assert ray_is_down()


def test_multi_player_task_is_refused_before_ray_starts(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="gan.*one loss under one optimizer"):
        fedsim.run({"name": "gan", "task": "gan", "mode": "parameter_server", "train": {"progress": False}},
                   out=tmp_path, quiet=True)
    assert ray_is_down()
    assert torch.get_num_threads() >= 1


@pytest.mark.slow
def test_runs_on_an_existing_two_node_cluster(tmp_path: Path, repo_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real Ray head (127.0.0.2) and worker node (127.0.0.3) with one CPU each, started and stopped by
    # fedsim.ops.cluster (exactly those processes): the two workers must be placed one per node.
    from fedsim.ops import cluster

    monkeypatch.chdir(repo_root)  # Ray adds the driver's working directory to the workers' import path
    state_dir = tmp_path / "cluster"
    state_dir.mkdir()
    try:
        state = cluster.ray_up(state_dir, nodes=2, cpus_per_node=1, timeout=180)
        train = {**EXACT, "batch_size": 8, "epochs": 1}
        summary = fedsim.run(ps("remote", train, workers=2, variant="sync", steps=5,
                                ray_address=state.info["address"]), out=tmp_path / "out", quiet=True)[0]
        assert summary["steps"] == 5 and summary["staleness"]["histogram"] == {"0": 10}
        assert ray_is_down()  # disconnected from the cluster...
        assert all(p.pid and cluster.procs.alive(p) for p in state.processes)  # ...which keeps running
        with pytest.raises(FedsimError, match="needs 3 CPU but the Ray cluster has 2"):
            fedsim.run(ps("remote3", train, workers=3, ray_address=state.info["address"]), out=tmp_path / "out",
                       quiet=True)
    finally:
        stopped = cluster.down(state_dir)
    assert not any(cluster.procs.alive(p) for p in stopped)


"""A pool of worker processes gives the same run as sequential delivery (and keeps node state)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsim.engines.federated.flower_run import flower_run

APP_DIR = Path(__file__).parent / "fixtures" / "third_party_app"


@pytest.mark.slow
def test_worker_pool_equals_sequential(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = ["num-server-rounds=2", "fail-partition=3"]
    # 6 nodes on 2 workers: runs of 2 consecutive messages per task (fedsim.engines.federated.local.pool)
    flower_run(APP_DIR, 6, run_config=[*config, "output=seq.pt"], client_threads=1)
    flower_run(APP_DIR, 6, run_config=[*config, "output=pool.pt"], client_threads=1, workers=2)
    seq, pool = torch.load(tmp_path / "seq.pt"), torch.load(tmp_path / "pool.pt")
    for name, value in seq["state_dict"].items():
        assert torch.equal(value, pool["state_dict"][name]), name  # same arithmetic, other processes
    # Context.state came back from the workers: the healthy nodes count two visits in round 2.
    assert pool["train_metrics"][2]["times-trained"] == pytest.approx(2.0)
    assert pool["accuracy"] == seq["accuracy"]

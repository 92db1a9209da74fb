"""The central engine and the shared loop: determinism, per-epoch checkpoints, resume == uninterrupted."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import fedsim
from fedsim.checkpoint import load_checkpoint

TINY = "tests.helpers.tiny_task:TinyTask"


def experiment(epochs: int, **train: object) -> dict:
    return {"name": "core", "task": TINY, "train": {"epochs": epochs, "lr": 0.1, "progress": False, **train}}


def test_same_seed_same_metrics_and_files(tmp_path: Path) -> None:
    first = fedsim.run(experiment(2), out=tmp_path / "a", quiet=True)[0]
    second = fedsim.run(experiment(2), out=tmp_path / "b", quiet=True)[0]
    assert first["metrics"] == second["metrics"]
    assert first["metrics"]["accuracy"] > 0.85
    run_dir = tmp_path / "a" / "core" / "core"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["train"]["epochs"] == 2 and "torch" in summary["versions"] and summary["git_commit"]
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint["epoch"] == 2 and set(checkpoint["optimizers"]) == {"model"}
    third = fedsim.run(experiment(2), ["train.seed=1"], out=tmp_path / "c", quiet=True)[0]
    assert third["metrics"] != first["metrics"]


def test_resume_matches_uninterrupted(tmp_path: Path) -> None:
    settings = {"optimizer": "sgd", "momentum": 0.9}  # optimizer state must survive the restart too
    full = fedsim.run(experiment(4, **settings), out=tmp_path / "full", quiet=True)[0]
    fedsim.run(experiment(2, **settings), out=tmp_path / "cut", quiet=True)
    resumed = fedsim.run(experiment(4, **settings), out=tmp_path / "cut", resume=True, quiet=True)[0]
    for name, tensor in full["model"].state_dict().items():
        assert torch.equal(tensor, resumed["model"].state_dict()[name]), name
    assert resumed["metrics"] == full["metrics"]
    assert len(resumed["history"]) == 4


def test_schedules_and_optimizers_run(tmp_path: Path) -> None:
    for settings in ({"optimizer": "adam", "lr": 0.01, "schedule": "cosine"},
                     {"optimizer": "adagrad", "schedule": "step", "step_size": 1, "gamma": 0.5}):
        summary = fedsim.run(experiment(2, **settings), out=tmp_path, quiet=True)[0]
        assert summary["metrics"]["accuracy"] > 0.5
    assert summary["history"][1]["lr"] == 0.1 * 0.5 * 0.5  # step schedule halved twice

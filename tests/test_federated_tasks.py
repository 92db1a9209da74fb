"""Every task trains federated (in-process grid), and federated calibration statistics equal central ones."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedsim.config import experiment_from_dict
from fedsim.data.partition import partition
from fedsim.engines.common import RunContext, load_task_data
from fedsim.engines.federated.engine import run_federated
from fedsim.engines.federated.fewshot import central_statistics, client_sufficient_statistics
from fedsim.models.fewshot import merge_sufficient_statistics, statistics_from_sufficient
from fedsim.results import RunDir
from fedsim.tasks import TASKS

FEWSHOT_OPTIONS = {"episodes": 8, "shots": [1, 5], "queries": 5, "n_way": 5}


def federated(task: str, tmp_path: Path, task_options: dict[str, Any] | None = None, **fed: Any) -> dict[str, Any]:
    config = {"name": task, "task": task, "mode": "federated", "task_options": task_options or {},
              "train": {"lr": 0.05, "batch_size": 32, "progress": False, "threads": 1},
              "federated": {"engine": "local", "num_clients": 3, "clients_per_round": 2, "rounds": 2,
                            "local_steps": 2, "partition": "iid", **fed}}
    run = experiment_from_dict(config).runs[0]
    return run_federated(run, RunContext(out=RunDir(tmp_path / task)))


@pytest.mark.parametrize("task", ["exam_net", "linear_ae", "bn_cnn", "gan", "dual_head_vit", "mae"])
def test_every_task_trains_federated(tmp_path: Path, task: str) -> None:
    assert task in TASKS
    summary = federated(task, tmp_path)
    history = summary["history"]
    assert [h["round"] for h in history] == [0, 1, 2]
    assert all(len(h["aggregated"]) == 2 for h in history[1:])
    numbers = [v for k, v in history[-1].items() if k.startswith("test_") and isinstance(v, float)]
    assert numbers and all(math.isfinite(v) for v in numbers)
    before = summary["history"][0]
    changed = [k for k in before if k.startswith("test_") and before[k] != history[-1].get(k)]
    assert changed, "two federated rounds left every test metric unchanged"


def test_federated_calibration_statistics_equal_central(tmp_path: Path) -> None:
    """Per-client sufficient statistics, merged, give the central base-class means and covariances."""
    config = {"name": "fs", "task": "fewshot_dc", "task_options": FEWSHOT_OPTIONS, "train": {"threads": 1}}
    run = experiment_from_dict(config).runs[0]
    task, split = load_task_data(run)
    torch.manual_seed(0)
    model = task.build_model(split.info).eval()
    x, y = split.train.tensors
    parts = partition(y.numpy(), 7, "dirichlet", seed=0, alpha=0.3)
    client_stats = [client_sufficient_statistics(task, model, x[p], y[p], split.info.num_classes) for p in parts]
    fed = statistics_from_sufficient(merge_sufficient_statistics(client_stats))
    central = central_statistics(task, model, split)
    assert fed.means.shape == central.means.shape and fed.covs.shape[0] == split.info.num_classes
    for merged, pooled in ((fed.means, central.means), (fed.covs, central.covs)):
        scale = float(pooled.abs().max())
        assert scale > 1e-6  # non-trivial statistics (Tukey-transformed features are small)
        assert float((merged - pooled).abs().max()) <= 1e-9 * scale  # equal up to float64 rounding


def test_fewshot_backbone_trains_federated_with_federated_statistics(tmp_path: Path) -> None:
    summary = federated("fewshot_dc", tmp_path, FEWSHOT_OPTIONS, partition="dirichlet", alpha=0.5)
    metrics = summary["metrics"]
    assert metrics["fed_stats_clients"] == 3
    assert metrics["fed_stats_max_rel_diff"] < 1e-9  # merged client statistics == pooled features
    for shot in (1, 5):
        assert 0.2 <= metrics[f"acc_{shot}shot"] <= 1.0  # 5-way: chance is 0.2
    assert np.isfinite(metrics["accuracy"])

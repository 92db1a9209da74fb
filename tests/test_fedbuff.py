"""FedBuff (Nguyen et al., AISTATS 2022) as a server mode of the round loop: the update's arithmetic, its
equality with FedAvg when nothing is stale, staleness on the clock, determinism and resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from fedsim.config import experiment_from_dict
from fedsim.engines.common import RunContext
from fedsim.engines.federated.engine import run_federated
from fedsim.errors import ConfigError
from fedsim.results import RunDir
from fedsim.wire.array_codec import arrays_to_record, weighted_average
from strategies.math import fedbuff_update, staleness_weight


def test_staleness_weights_match_the_formula() -> None:
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)  # 1 / sqrt(1 + 3)
    assert staleness_weight(8, exponent=1.0) == pytest.approx(1 / 9)
    assert staleness_weight(5, exponent=0.0) == 1.0
    with pytest.raises(ValueError):
        staleness_weight(-1)


def test_fedbuff_update_on_a_hand_example() -> None:
    x = {"w": np.array([1.0, -1.0])}
    deltas = [{"w": np.array([2.0, 0.0])}, {"w": np.array([4.0, 2.0])}]
    # uniform weights, staleness 0 and 3: (1 * d1 + 0.5 * d2) / 2 = [2, 0.5]
    out = fedbuff_update(x, deltas, [1.0, 1.0], [0, 3], exponent=0.5, server_lr=1.0)
    np.testing.assert_allclose(out["w"], [3.0, -0.5], rtol=0, atol=1e-15)
    out = fedbuff_update(x, deltas, [1.0, 1.0], [0, 3], exponent=0.5, server_lr=0.5)
    np.testing.assert_allclose(out["w"], [2.0, -0.75], rtol=0, atol=1e-15)
    # example weights 1 and 3, both fresh: (1 * d1 + 3 * d2) / 4
    out = fedbuff_update(x, deltas, [1.0, 3.0], [0, 0])
    np.testing.assert_allclose(out["w"], [1.0 + 3.5, -1.0 + 1.5], rtol=0, atol=1e-15)


def test_fresh_example_weighted_update_is_fedavgs_mean() -> None:
    """No staleness, eta_g = 1, example weights: x + sum w_i (y_i - x) / sum w_i = FedAvg's weighted mean,
    computed by the strategies' own codec average (float64: equal to rounding)."""
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(5, 3)), "b": rng.normal(size=4)}
    models = [{k: v + rng.normal(size=v.shape) for k, v in x.items()} for _ in range(6)]
    examples = [3, 10, 7, 1, 12, 5]
    replies = [RecordDict({"arrays": arrays_to_record(m), "metrics": MetricRecord({"num-examples": n})})
               for m, n in zip(models, examples, strict=True)]
    fedavg = {k: a.numpy() for k, a in weighted_average(replies, "num-examples").items()}
    deltas = [{k: m[k] - x[k] for k in x} for m in models]
    fedbuff = fedbuff_update(x, deltas, [float(n) for n in examples], [0] * 6, exponent=0.5, server_lr=1.0)
    for key in x:
        np.testing.assert_allclose(fedbuff[key], fedavg[key], rtol=0, atol=1e-13)


def synthetic_run(tmp_path: Path, rounds: int = 3, **federated: Any) -> dict[str, Any]:
    system = federated.pop("system", {})
    return {
        "name": "fb", "task": "logreg", "mode": "federated",
        "data": {"name": "fedprox_synthetic", "test_fraction": 0.1,
                 "options": {"alpha": 1.0, "beta": 1.0, "num_clients": 12, "size_cap": 60}},
        "train": {"lr": 0.05, "batch_size": 10, "progress": False, "threads": 1, "dtype": "float64"},
        "federated": {"engine": "local", "partition": "natural", "num_clients": 12, "clients_per_round": 4,
                      "rounds": rounds, "local_epochs": 1, "system": system, **federated},
    }


def run(config: dict[str, Any], out: Path, **extras: Any) -> dict[str, Any]:
    experiment = experiment_from_dict(config)
    return run_federated(experiment.runs[0], RunContext(out=RunDir(out), extras=extras))


def test_one_fresh_buffer_equals_a_fedavg_round(tmp_path: Path) -> None:
    """M = concurrency = K, identical devices (the first cohort arrives together, before any replacement),
    eta_g = 1, example weights: FedBuff's first update is FedAvg's first round."""
    trace = tmp_path / "same.csv"
    trace.write_text("client_id,compute_sps,down_mbps,up_mbps\n" + "".join(f"{k},100,10,10\n" for k in range(12)))
    fedavg = run(synthetic_run(tmp_path, rounds=1, system={"device_trace": str(trace)}), tmp_path / "avg")
    fedbuff = run(synthetic_run(tmp_path, rounds=1, system={
        "device_trace": str(trace), "server": "fedbuff", "buffer_size": 4, "buffer_weights": "examples",
        "server_learning_rate": 1.0}), tmp_path / "buff")
    assert fedbuff["history"][1]["clients"] == fedavg["history"][1]["clients"]
    assert fedbuff["history"][1]["staleness"] == [0, 0, 0, 0]
    for name, value in fedavg["model"].state_dict().items():
        torch.testing.assert_close(fedbuff["model"].state_dict()[name], value, rtol=0, atol=1e-12)


def test_staleness_on_the_clock_and_determinism(tmp_path: Path) -> None:
    config = synthetic_run(tmp_path, rounds=5, clients_per_round=6,
                           system={"server": "fedbuff", "buffer_size": 2, "staleness_exponent": 0.5})
    a = run(config, tmp_path / "a")
    b = run(config, tmp_path / "b")
    rounds = a["history"][1:]
    assert [h["model_version"] for h in rounds] == [1, 2, 3, 4, 5]
    assert all(len(h["clients"]) == 2 == len(h["staleness"]) for h in rounds)
    assert any(s > 0 for h in rounds for s in h["staleness"])  # clients that started on older models
    times = [h["sim_time_s"] for h in rounds]
    assert times == sorted(times) and times[0] > 0
    keys = ("clients", "staleness", "client_time_s", "sim_time_s")
    assert [[h[k] for k in keys] for h in rounds] == [[h[k] for k in keys] for h in b["history"][1:]]
    for name, value in a["model"].state_dict().items():
        assert torch.equal(value, b["model"].state_dict()[name])
    assert a["metrics"]["sim_time_s"] == pytest.approx(times[-1])


def test_fedbuff_resumes_where_it_stopped(tmp_path: Path) -> None:
    config = synthetic_run(tmp_path, rounds=4, clients_per_round=6, system={"server": "fedbuff", "buffer_size": 2})
    whole = run(config, tmp_path / "whole")
    run(config, tmp_path / "cut", stop_after_round=2)
    resumed = run_federated(experiment_from_dict(config).runs[0], RunContext(out=RunDir(tmp_path / "cut"), resume=True))
    assert [h["sim_time_s"] for h in resumed["history"]] == [h["sim_time_s"] for h in whole["history"]]
    for name, value in whole["model"].state_dict().items():
        assert torch.equal(value, resumed["model"].state_dict()[name])


def test_fedbuff_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="federated.strategy"):
        experiment_from_dict(synthetic_run(tmp_path, strategy="scaffold", system={"server": "fedbuff", "buffer_size": 2}))
    with pytest.raises(ConfigError, match="dropout_fraction"):
        experiment_from_dict(synthetic_run(tmp_path, dropout_fraction=0.25,
                                           system={"server": "fedbuff", "buffer_size": 2}))

"""The federated engine's ServerApp/ClientApp and round loop, on fedsim's in-process grid (fast).

The same apps run on Flower's own simulation in ``tests/test_federated_flower.py``.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fedsim
from fedsim.config import RunConfig, experiment_from_dict
from fedsim.engines.common import RunContext
from fedsim.engines.federated.engine import run_federated
from fedsim.engines.federated.rounds import num_sampled, sample_clients, simulated_faults
from fedsim.errors import ConfigError, FedsimError
from fedsim.results import RunDir

TINY = "tests.helpers.tiny_task:TinyTask"


def fed_run(tmp_path: Path, engine: str = "local", **federated: Any) -> dict[str, Any]:
    return {
        "name": "fed", "task": TINY, "mode": "federated", "task_options": {"hidden": 8},
        "train": {"lr": 0.2, "batch_size": 16, "progress": False, "threads": 1, "dtype": "float64"},
        "federated": {"engine": engine, "num_clients": 6, "clients_per_round": 3, "rounds": 4,
                      "partition": "dirichlet", "alpha": 0.5, **federated},
    }


def one_run(config: dict[str, Any], out: Path, resume: bool = False, **extras: Any) -> dict[str, Any]:
    run: RunConfig = experiment_from_dict(config).runs[0]
    return run_federated(run, RunContext(out=RunDir(out), resume=resume, extras=extras))


def params(summary: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in summary["model"].state_dict().items()}


def test_sampling_and_faults_are_seeded_functions() -> None:
    assert sample_clients(0, 3, 20, 10) == sample_clients(0, 3, 20, 10)
    assert sample_clients(0, 3, 20, 10) != sample_clients(0, 4, 20, 10)
    assert sample_clients(1, 3, 20, 10) != sample_clients(0, 3, 20, 10)
    sampled = sample_clients(0, 1, 20, 10)
    assert sampled == sorted(sampled) and len(set(sampled)) == 10
    drop, slow = simulated_faults(0, 1, sampled, 0.2, 0.1)
    assert len(drop) == 2 and len(slow) == 1 and not set(drop) & set(slow) and set(drop) <= set(sampled)
    assert simulated_faults(0, 1, sampled, 0.2, 0.1) == (drop, slow)
    assert simulated_faults(0, 1, sampled, 0.0, 0.0) == ([], [])
    assert num_sampled(20, 0, 0.25) == 5 and num_sampled(20, 10, 1.0) == 10
    with pytest.raises(FedsimError, match="clients_per_round"):
        num_sampled(5, 6, 1.0)


@pytest.mark.parametrize("num_clients", [1, 3])
def test_fedavg_full_batch_gd_equals_central_gd_step(tmp_path: Path, num_clients: int) -> None:
    """K clients, one full-batch GD step each, example-weighted: the same step as central full-batch GD."""
    train = {"epochs": 1, "lr": 0.5, "batch_size": 4096, "dtype": "float64", "threads": 1, "shuffle": False,
             "progress": False}
    central = fedsim.run({"name": "c", "task": TINY, "train": train}, out=tmp_path / "c", quiet=True)[0]
    federated = one_run({"name": "f", "task": TINY, "mode": "federated", "train": train,
                         "federated": {"engine": "local", "num_clients": num_clients, "clients_per_round": num_clients,
                                       "rounds": 1, "local_steps": 1, "client_test_fraction": 0.0,
                                       "partition": "iid"}}, tmp_path / "f")
    start = fedsim.run({"name": "c0", "task": TINY, "train": {**train, "epochs": 0}}, out=tmp_path / "c0",
                       quiet=True)[0]
    for name, value in params(central).items():
        fed_value = params(federated)[name]
        assert not torch.equal(value, params(start)[name])  # the step moved the weights
        torch.testing.assert_close(fed_value, value, rtol=1e-12, atol=1e-13)


def test_same_seed_same_run_other_seed_other(tmp_path: Path) -> None:
    a = one_run(fed_run(tmp_path), tmp_path / "a")
    b = one_run(fed_run(tmp_path), tmp_path / "b")
    c_cfg = fed_run(tmp_path)
    c_cfg["train"]["seed"] = 1
    c = one_run(c_cfg, tmp_path / "c")
    for name, value in params(a).items():
        assert torch.equal(value, params(b)[name])
    assert [h["clients"] for h in a["history"][1:]] == [h["clients"] for h in b["history"][1:]]
    assert [h["clients"] for h in a["history"][1:]] != [h["clients"] for h in c["history"][1:]]
    assert a["metrics"]["accuracy"] > 0.5  # 4 rounds of 3 clients on a tiny MLP; chance is 0.1
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5  # round 0 (initial model) + 4 rounds
    assert a["metrics"]["bytes_total"] > 0 and a["metrics"]["samples_total"] > 0
    assert a["metrics"]["clients_evaluated"] == 6  # every client of a small population scores the final model
    assert "client_metrics" not in a  # per-client rows go to client_metrics.jsonl.gz when asked for


def test_failing_and_slow_clients_do_not_stop_a_round(tmp_path: Path) -> None:
    summary = one_run(fed_run(tmp_path, num_clients=10, clients_per_round=5, dropout_fraction=0.2,
                              straggler_fraction=0.2), tmp_path / "faults")
    rounds = summary["history"][1:]
    assert len(rounds) == 4
    for record in rounds:
        assert len(record["failed"]) == 1 and len(record["stragglers"]) == 1
        assert sorted(record["aggregated"] + record["failed"] + record["stragglers"]) == record["clients"]
    assert summary["metrics"]["failed_client_rounds"] == 4
    assert summary["metrics"]["accuracy"] > summary["history"][0]["test_accuracy"] + 0.2


@pytest.mark.parametrize("strategy,options", [("fedavgm", {"server_momentum": 0.9}), ("scaffold", {}),
                                              ("fedadam", {"eta": 0.05})])
def test_resume_matches_uninterrupted(tmp_path: Path, strategy: str, options: dict[str, Any]) -> None:
    config = fed_run(tmp_path, strategy=strategy, strategy_options=options, dropout_fraction=0.3)
    full = one_run(config, tmp_path / "full")
    cut = one_run(copy.deepcopy(config), tmp_path / "cut", stop_after_round=2)
    assert cut == {"interrupted_after_round": 2}
    resumed = one_run(copy.deepcopy(config), tmp_path / "cut", resume=True)
    assert resumed["resumed"] is True
    for name, value in params(full).items():
        assert torch.equal(value, params(resumed)[name]), name
    assert [h["test_accuracy"] for h in resumed["history"]] == [h["test_accuracy"] for h in full["history"]]
    assert resumed["metrics"]["bytes_total"] == full["metrics"]["bytes_total"]
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 5


def test_scaffold_keeps_client_controls_per_partition(tmp_path: Path) -> None:
    from fedsim.checkpoint import load_checkpoint

    summary = one_run(fed_run(tmp_path, strategy="scaffold", rounds=3), tmp_path / "s")
    state = load_checkpoint(tmp_path / "s" / "checkpoint.pt")["engine_state"]
    trained = {p for h in summary["history"][1:] for p in h["aggregated"]}
    assert set(state["client_state"]) == trained
    control = state["strategy"]["control"]["__dict__"]
    assert set(control) == {name for name, _ in summary["model"].named_parameters()}
    assert any(np.abs(v).sum() > 0 for v in control.values())
    assert summary["metrics"]["accuracy"] > 0.4


@pytest.mark.parametrize("strategy", ["fedprox", "fednova", "fedmedian", "fedtrimmedavg", "krum", "fedyogi",
                                      "fedadagrad"])
def test_every_strategy_trains(tmp_path: Path, strategy: str) -> None:
    options = {"fedprox": {"proximal_mu": 0.1}, "fedtrimmedavg": {"beta": 0.2}, "fedyogi": {"eta": 0.05},
               "fedadagrad": {"eta": 0.05}}.get(strategy, {})
    summary = one_run(fed_run(tmp_path, strategy=strategy, strategy_options=options, partition="iid", rounds=3,
                              num_clients=5, clients_per_round=5, local_epochs=2), tmp_path / strategy)
    assert summary["metrics"]["accuracy"] > 0.3, summary["metrics"]


def test_bad_federated_settings_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="federated.strategy_options.mu"):
        one_run(fed_run(tmp_path, strategy="fedprox", strategy_options={"mu": 1.0}), tmp_path / "x")
    with pytest.raises(FedsimError, match="clients_per_round"):
        one_run(fed_run(tmp_path, clients_per_round=9), tmp_path / "y")


def test_compare_and_partitions_commands(tmp_path: Path) -> None:
    """The comparison report after `fedsim run`, then `fedsim compare` and `fedsim partitions` from the CLI."""
    from fedsim.cli import main

    experiment = tmp_path / "cvf.toml"
    experiment.write_text(f'''
name = "cvf"
seeds = [0, 1]
task = "{TINY}"
task_options = {{ hidden = 8 }}
[train]
epochs = 2
lr = 0.2
batch_size = 16
threads = 1
progress = false
[federated]
engine = "local"
num_clients = 6
clients_per_round = 3
rounds = 5
[report]
kind = "central_vs_federated"
[[runs]]
name = "central"
mode = "central"
[[runs]]
name = "fedavg-dir"
mode = "federated"
federated = {{ partition = "dirichlet", alpha = 0.3 }}
''')
    out = tmp_path / "results"
    assert main(["run", str(experiment), "--out", str(out)]) == 0
    folder = out / "cvf"
    for name in ("comparison.md", "comparison.json", "comparison.png"):
        assert (folder / name).stat().st_size > 0
    (folder / "comparison.md").unlink()
    assert main(["compare", str(folder)]) == 0
    table = (folder / "comparison.md").read_text()
    assert "| central | central |" in table and "| fedavg-dir | federated | fedavg | dirichlet(0.3) | 2 |" in table
    import json

    numbers = {row["run"]: row for row in json.loads((folder / "comparison.json").read_text())["numbers"]}
    assert numbers["fedavg-dir"]["samples"] > 0 and numbers["fedavg-dir"]["mb_sent"] > 0
    assert numbers["central"]["final"][0] > 0.8
    assert main(["partitions", str(experiment), "--out", str(out)]) == 0
    assert (folder / "partitions-fedavg-dir.png").stat().st_size > 0
    assert main(["compare", str(tmp_path / "nothing")]) == 2


def test_compatible_runs_share_one_flower_simulation(tmp_path: Path) -> None:
    """plan_jobs: later federated runs with the same clients/resources join the first one's simulation."""
    from fedsim.engines.federated.engine import plan_jobs

    base = fed_run(tmp_path, engine="flower")
    experiment = experiment_from_dict({**base, "seeds": [0, 1], "runs": [
        {"name": "central", "mode": "central"},
        {"name": "a"},
        {"name": "b", "federated": {"strategy": "fedprox", "strategy_options": {"proximal_mu": 0.1}}},
        {"name": "other-size", "federated": {"num_clients": 8}},
    ]})
    planned = [(dataclasses.replace(r, train=dataclasses.replace(r.train, seed=s)), tmp_path / f"{r.name}-{s}")
               for r in experiment.runs for s in (0, 1)]
    first_fed = planned[2]
    jobs = plan_jobs(first_fed[0], RunContext(out=RunDir(first_fed[1]), extras={"planned": planned}))
    assert [(j.run.name, j.run.train.seed) for j in jobs] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    alone = plan_jobs(first_fed[0], RunContext(out=RunDir(first_fed[1]), extras={"planned": planned,
                                                                                "stop_after_round": 1}))
    assert len(alone) == 1

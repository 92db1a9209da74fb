"""Same results: the local engine vs Flower's own simulation (Ray), same apps, same seed.

Threads are pinned to 1 in every client (Ray gives each actor ``num_cpus`` threads, which changes
float summation order), so the two engines must agree to float rounding of the aggregation
order: max abs diff < 1e-6 on the final global parameters.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fedsim.config import RunConfig, from_dict, load_experiment, run_with_seed
from fedsim.results import RunDir
from fedsim.wire import flower_private as fp

REPO = Path(__file__).resolve().parents[1]
APP_DIR = Path(__file__).parent / "fixtures" / "third_party_app"
COMPARISON = REPO / "experiments" / "central_vs_federated.toml"
RAY_ONE_CPU = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"include_dashboard": False, "log_to_driver": False}}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def comparison_fedavg_iid_run() -> RunConfig:
    """The comparison experiment's FedAvg IID run, cut to 3 rounds with one torch thread per client."""
    overrides = ["federated.rounds=3", "train.threads=1", "train.progress=false"]
    if COMPARISON.is_file():
        experiment = load_experiment(COMPARISON, overrides)
        runs = [r for r in experiment.runs if r.mode == "federated" and r.federated.strategy == "fedavg"
                and r.federated.partition == "iid"]
        assert runs, f"{COMPARISON} has no federated FedAvg IID run"
        run = runs[0]
        return run_with_seed(run, experiment.seeds[0]) if experiment.seeds else run
    # Until the comparison file exists: the same structure (bn_cnn on digits, 20 clients, 10 per round).
    return from_dict(RunConfig, {"name": "fedavg_iid", "task": "bn_cnn", "mode": "federated",
                                 "train": {"threads": 1, "progress": False, "lr": 0.05, "batch_size": 32},
                                 "federated": {"num_clients": 20, "clients_per_round": 10, "rounds": 3,
                                               "strategy": "fedavg", "partition": "iid"}})


@pytest.mark.slow
def test_fedsim_app_local_engine_equals_flower_simulation(tmp_path: Path) -> None:
    from fedsim.engines.common import RunContext
    from fedsim.engines.federated.engine import run_federated

    run = comparison_fedavg_iid_run()
    finals = {}
    for engine in ("flower", "local"):
        engine_run = dataclasses.replace(run, federated=dataclasses.replace(run.federated, engine=engine,
                                                                            cpus_per_client=1.0))
        summary = run_federated(engine_run, RunContext(out=RunDir(tmp_path / engine)))
        finals[engine] = {k: v.detach().clone() for k, v in summary["model"].state_dict().items()}
        assert summary["metrics"]["accuracy"] > 0.2, summary["metrics"]
    diff = max_abs_diff(finals["local"], finals["flower"])
    assert diff < 1e-6, f"local vs run_simulation: max abs diff {diff:.3g}"
    # The runs trained: the final parameters are not the initial ones.
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in finals["local"].values())


@pytest.mark.slow
@pytest.mark.parametrize("system", [
    {"availability": "daily", "online_hours_median": 20.0, "deadline_s": 1.5, "late_work": "partial",
     "over_selection": 0.3},
    {"server": "fedbuff", "buffer_size": 4},
], ids=["deadline-overselection", "fedbuff"])
def test_clock_runs_are_the_same_on_both_engines(tmp_path: Path, system: dict) -> None:
    """With the virtual clock deciding who trains (availability, deadline with partial work,
    over-selection) or when updates arrive (FedBuff), Flower's simulation and the local engine give the
    same clock, the same cohorts and the same parameters."""
    from fedsim.config import SystemConfig
    from fedsim.engines.common import RunContext
    from fedsim.engines.federated.engine import run_federated

    run = comparison_fedavg_iid_run()
    fed = dataclasses.replace(run.federated, rounds=2, local_epochs=2, system=SystemConfig(**system))
    keys = ("clients", "aggregated", "late", "offline", "staleness", "client_time_s", "sim_time_s")
    results = {}
    for engine in ("flower", "local"):
        engine_run = dataclasses.replace(run, federated=dataclasses.replace(fed, engine=engine, cpus_per_client=1.0))
        summary = run_federated(engine_run, RunContext(out=RunDir(tmp_path / engine)))
        results[engine] = ({k: v.detach().clone() for k, v in summary["model"].state_dict().items()},
                           [[h.get(k) for k in keys] for h in summary["history"]])
    assert results["local"][1] == results["flower"][1]
    assert any(h[0] for h in results["local"][1][1:])  # rounds had clients
    diff = max_abs_diff(results["local"][0], results["flower"][0])
    assert diff < 1e-6, f"local vs run_simulation with the clock on: max abs diff {diff:.3g}"


@pytest.mark.slow
def test_third_party_app_local_engine_equals_flower_simulation(tmp_path: Path, monkeypatch) -> None:
    import os

    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from fedsim.engines.federated.flower_run import load_component, parse_run_config, read_app_config
    from fedsim.engines.federated.local.grid import run_local

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(APP_DIR), os.environ.get("PYTHONPATH", "")]))
    spec = read_app_config(APP_DIR)
    server_app = load_component(spec.serverapp, spec.app_dir, ServerApp)
    client_app = load_component(spec.clientapp, spec.app_dir, ClientApp)
    results = {}
    for engine in ("flower", "local"):
        config = parse_run_config([f"output={engine}.pt"], spec.run_config, "pyproject.toml")
        if engine == "flower":
            fp.run_flower_simulation(server_app, client_app, 5, config, app_dir=str(APP_DIR),
                                     backend_config=RAY_ONE_CPU)
        else:
            run_local(server_app, client_app, 5, config, client_threads=1)
        results[engine] = torch.load(tmp_path / f"{engine}.pt")
    diff = max_abs_diff(results["local"]["state_dict"], results["flower"]["state_dict"])
    assert diff < 1e-6, f"local vs run_simulation: max abs diff {diff:.3g}"
    assert results["local"]["accuracy"] == pytest.approx(results["flower"]["accuracy"])
    assert results["local"]["train_metrics"][3]["times-trained"] == pytest.approx(3.0)
    assert results["flower"]["train_metrics"][3]["times-trained"] == pytest.approx(3.0)

"""Stragglers doing partial work (``federated.straggler_work``) and ``experiments/fedprox_synthetic.toml``.

FedProx (Li et al., MLSys 2020, section 5.2): a straggler trains a random number of local epochs in
[1, E] and its reply is aggregated (FedProx), or it is dropped (FedAvg). Fast: a few small clients of
Synthetic(1,1), a couple of rounds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsim.cli import main
from fedsim.config import RunConfig, experiment_from_dict, load_experiment
from fedsim.engines.common import RunContext
from fedsim.engines.federated import flower_app
from fedsim.engines.federated.engine import run_federated
from fedsim.engines.federated.rounds import LOCAL_EPOCHS_KEY, partial_work
from fedsim.errors import ConfigError
from fedsim.results import RunDir

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, BATCH = 3, 10


def synthetic_run(**federated: Any) -> dict[str, Any]:
    return {
        "name": "fp", "task": "logreg", "mode": "federated",
        "data": {"name": "fedprox_synthetic", "test_fraction": 0.1,
                 "options": {"alpha": 1.0, "beta": 1.0, "num_clients": 8, "size_cap": 80}},
        "train": {"lr": 0.01, "batch_size": BATCH, "progress": False, "threads": 1, "checkpoint": False},
        "federated": {"engine": "local", "partition": "natural", "num_clients": 8, "clients_per_round": 4, "rounds": 2,
                      "local_epochs": EPOCHS, **federated},
    }


def run_capturing_replies(config: dict[str, Any], out: Path, monkeypatch: pytest.MonkeyPatch
                          ) -> tuple[dict[str, Any], dict[int, list[Any]]]:
    """Run one federated run; also return, per round, the replies the strategy was given to aggregate."""
    given: dict[int, list[Any]] = {}
    make = flower_app.make_strategy

    def recording_strategy(*args: Any, **kwargs: Any) -> Any:
        strategy = make(*args, **kwargs)
        aggregate = strategy.aggregate_train

        def aggregate_train(server_round: int, replies: Any) -> Any:
            replies = list(replies)
            given[server_round] = replies
            return aggregate(server_round, replies)

        strategy.aggregate_train = aggregate_train
        return strategy

    monkeypatch.setattr(flower_app, "make_strategy", recording_strategy)
    run: RunConfig = experiment_from_dict(config).runs[0]
    return run_federated(run, RunContext(out=RunDir(out))), given


def metrics_of(reply: Any) -> dict[str, Any]:
    return dict(reply.content["metrics"])


def test_partial_work_is_a_seeded_draw_in_one_to_e() -> None:
    draws = [partial_work(0, r, p, 20) for r in range(1, 30) for p in range(10)]
    assert draws == [partial_work(0, r, p, 20) for r in range(1, 30) for p in range(10)]  # deterministic
    assert min(draws) == 1 and max(draws) == 20 and len(set(draws)) == 20  # uniform over [1, 20]
    assert draws != [partial_work(1, r, p, 20) for r in range(1, 30) for p in range(10)]  # keyed by seed
    assert partial_work(0, 3, 5, 20) == partial_work(0, 3, 5, 20)
    assert {partial_work(0, r, 5, 20) for r in range(1, 30)} != {partial_work(0, 3, 5, 20)}  # ... and round
    assert {partial_work(0, 3, 5, 1), partial_work(0, 4, 2, 1)} == {1}


@pytest.mark.parametrize("strategy,options", [("fedprox", {"proximal_mu": 1.0}), ("fedavg", {})])
def test_partial_stragglers_train_their_epochs_and_are_aggregated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str, options: dict[str, Any]) -> None:
    config = synthetic_run(strategy=strategy, strategy_options=options, straggler_fraction=0.5,
                           straggler_work="partial")
    summary, given = run_capturing_replies(config, tmp_path / "partial", monkeypatch)
    rounds = summary["history"][1:]
    assert len(rounds) == 2
    seen_partial = set()
    for record in rounds:
        r, stragglers = record["round"], record["stragglers"]
        assert len(stragglers) == 2 and set(stragglers) <= set(record["clients"])
        # every sampled client is aggregated and counted, stragglers included
        assert record["aggregated"] == record["clients"] and record["failed"] == []
        expected = {p: partial_work(0, r, p, EPOCHS) for p in stragglers}
        assert record["partial_epochs"] == [expected[p] for p in stragglers]
        replies = given[r]
        assert len(replies) == len(record["clients"])
        samples = 0
        for partition, reply in zip(record["aggregated"], replies, strict=True):
            metrics = metrics_of(reply)
            epochs = expected.get(partition, EPOCHS)
            seen_partial.add(epochs)
            n = int(metrics["num-examples"])
            assert metrics["local-steps"] == epochs * math.ceil(n / BATCH), (r, partition)
            assert metrics["samples"] == epochs * n
            samples += epochs * n
        assert record["samples_total"] - (rounds[0]["samples_total"] if r > 1 else 0) == samples
    assert seen_partial - {EPOCHS}  # some straggler did less than the full local work
    # the same seed draws the same stragglers and the same epoch counts
    again, _ = run_capturing_replies(config, tmp_path / "again", monkeypatch)
    assert [h.get("partial_epochs") for h in again["history"]] == [h.get("partial_epochs") for h in summary["history"]]
    for name, value in summary["model"].state_dict().items():
        assert torch.equal(value, again["model"].state_dict()[name])


def test_drop_still_discards_stragglers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert experiment_from_dict(synthetic_run()).runs[0].federated.straggler_work == "drop"  # the default
    summary, given = run_capturing_replies(synthetic_run(straggler_fraction=0.5), tmp_path / "drop", monkeypatch)
    for record in summary["history"][1:]:
        assert len(record["stragglers"]) == 2 and "partial_epochs" not in record
        assert sorted(record["aggregated"] + record["stragglers"]) == record["clients"]
        replies = given[record["round"]]
        assert len(replies) == 2
        for reply in replies:  # the clients that were not stragglers did the full local work
            metrics = metrics_of(reply)
            assert metrics["local-steps"] == EPOCHS * math.ceil(int(metrics["num-examples"]) / BATCH)


def test_the_local_epochs_key_is_only_sent_to_partial_stragglers(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict[str, Any]] = []
    original = flower_app.RoundLoop._per_client

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        message = original(self, *args, **kwargs)
        sent.append(dict(message.content["config"]))
        return message

    monkeypatch.setattr(flower_app.RoundLoop, "_per_client", recording)
    run_capturing_replies(synthetic_run(straggler_fraction=0.5), tmp_path / "drop", monkeypatch)
    assert sent and not any(LOCAL_EPOCHS_KEY in config for config in sent)
    sent.clear()
    run_capturing_replies(synthetic_run(straggler_fraction=0.5, straggler_work="partial"), tmp_path / "p", monkeypatch)
    assert sum(LOCAL_EPOCHS_KEY in config for config in sent) == 4  # 2 stragglers x 2 rounds


def test_fedavg_is_fedprox_mu0_without_stragglers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the experiment runs FedAvg alone at 0 % stragglers: FedProx with mu = 0 gives the same model."""
    fedavg, _ = run_capturing_replies(synthetic_run(local_epochs=1), tmp_path / "a", monkeypatch)
    fedprox, _ = run_capturing_replies(synthetic_run(local_epochs=1, strategy="fedprox",
                                                     strategy_options={"proximal_mu": 0.0}), tmp_path / "b", monkeypatch)
    for name, value in fedavg["model"].state_dict().items():
        assert torch.equal(value, fedprox["model"].state_dict()[name]), name


def test_straggler_work_is_validated() -> None:
    with pytest.raises(ConfigError, match="straggler_work"):
        experiment_from_dict(synthetic_run(straggler_work="late"))
    # every sampled client a straggler: nothing to aggregate when they are dropped, fine with partial work
    with pytest.raises(ConfigError, match="no round would have a reply"):
        experiment_from_dict(synthetic_run(straggler_fraction=1.0))
    run = experiment_from_dict(synthetic_run(straggler_fraction=1.0, straggler_work="partial")).runs[0]
    assert run.federated.straggler_work == "partial"


def test_the_experiment_file_runs_cut_short(tmp_path: Path) -> None:
    path = ROOT / "experiments" / "fedprox_synthetic.toml"
    experiment = load_experiment(path)
    runs = {r.name: r for r in experiment.runs}
    assert len(runs) == 15 and experiment.report["kind"] == "fedprox"
    for run in runs.values():
        fed = run.federated
        assert (fed.clients_per_round, fed.local_epochs, run.train.batch_size, run.train.lr) == (10, 20, 10, 0.01)
        assert run.data.options["num_clients"] == 30 and fed.partition == "natural" and run.task == "logreg"
        assert fed.straggler_fraction in (0.0, 0.9)
        assert fed.straggler_work == ("partial" if run.name.startswith("fedprox") and fed.straggler_fraction else "drop")
    assert runs["fedprox1-s11-90"].federated.strategy_options == {"proximal_mu": 1.0}
    only = [arg for name in runs if "-s11-" in name for arg in ("--only", name)]
    code = main(["run", str(path), "--out", str(tmp_path), *only, "--set", "federated.rounds=2",
                 "--set", "federated.local_epochs=2"])
    assert code == 0
    folder = tmp_path / "fedprox_synthetic"
    assert (folder / "fedprox_synthetic.png").stat().st_size > 0
    assert (folder / "loss_synthetic_1_1.png").stat().st_size > 0
    table = (folder / "table.md").read_text()
    assert "Synthetic(1,1)" in table and "FedProx (μ=1), partial work" in table and "Li et al." in table
    assert len([line for line in table.splitlines() if line.startswith("| Synthetic")]) == 5

"""Flower's SecAgg+ in fedsim's rounds (``federated.secure_aggregation``; fedsim/engines/federated/secagg.py).

The aggregate must be FedAvg's up to the protocol's quantisation: every round, the SecAgg+ aggregate is
compared with the weighted mean of the very models the clients trained (recorded by a spy on the client's
layout adapter, which the server never sees), within :func:`secagg.aggregate_tolerance`; and a whole SecAgg+
run with the plain run of the same config. Logistic regression on Synthetic(1, 1): no BatchNorm counters,
updates far inside the ±8 clipping range. Fast: 4 small clients, 3 rounds, fedsim's local engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedsim.config import RunConfig, experiment_from_dict
from fedsim.engines.common import RunContext
from fedsim.engines.federated import flower_app, secagg
from fedsim.engines.federated.engine import run_federated
from fedsim.errors import ConfigError, RunFailedError
from fedsim.results import RunDir
from fedsim.wire import flower_private as fp
from fedsim.wire.array_codec import record_to_numpy

ROUNDS = 3
FLOAT32_SLACK = 8 * float(np.finfo(np.float32).eps)
"""Relative rounding of float32 results (the aggregate is cast back to float32 and averaged by the strategy)."""


def config(secure: bool, engine: str = "local", **federated: Any) -> dict[str, Any]:
    return {
        "name": "secagg", "task": "logreg", "mode": "federated",
        "data": {"name": "fedprox_synthetic", "test_fraction": 0.1,
                 "options": {"alpha": 1.0, "beta": 1.0, "num_clients": 4, "size_cap": 80}},
        "train": {"lr": 0.01, "batch_size": 10, "progress": False, "threads": 1, "checkpoint": False},
        "federated": {"engine": engine, "partition": "natural", "num_clients": 4, "clients_per_round": 4,
                      "rounds": ROUNDS, "local_epochs": 2, "secure_aggregation": secure, "cpus_per_client": 1.0,
                      **federated},
    }


def run(cfg: dict[str, Any], out: Path) -> tuple[RunConfig, dict[str, Any]]:
    run_config = experiment_from_dict(cfg).runs[0]
    return run_config, run_federated(run_config, RunContext(out=RunDir(out)))


def n_train(run_config: RunConfig, partition: int) -> int:
    return len(flower_app.client_data(run_config).shard(partition).train_idx)


def spy(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[tuple[int, int], tuple[dict, float]], dict[int, dict]]:
    """Record what the server never sees (each client's trained arrays and weight, by round and partition)
    and what it computes (the strategy's aggregate, by round)."""
    trained: dict[tuple[int, int], tuple[dict, float]] = {}
    aggregates: dict[int, dict] = {}
    adapter = secagg._train_in_legacy_layout

    def recording_adapter(msg: Message, ctxt: Context, train: Any) -> Message:
        def recording_train(message: Message, context: Context) -> Message:
            reply = train(message, context)
            key = (int(message.content["config"]["server-round"]), int(context.node_config["partition-id"]))
            arrays = {k: np.array(v, dtype=np.float64) for k, v in record_to_numpy(reply.content["arrays"]).items()}
            trained[key] = arrays, float(reply.content["metrics"]["num-examples"])
            return reply

        return adapter(msg, ctxt, recording_train)

    make = flower_app.make_strategy

    def recording_strategy(*args: Any, **kwargs: Any) -> Any:
        strategy = make(*args, **kwargs)
        aggregate = strategy.aggregate_train

        def aggregate_train(server_round: int, replies: Any) -> Any:
            arrays, metrics = aggregate(server_round, list(replies))
            aggregates[server_round] = record_to_numpy(arrays)
            return arrays, metrics

        strategy.aggregate_train = aggregate_train
        return strategy

    monkeypatch.setattr(secagg, "_train_in_legacy_layout", recording_adapter)
    monkeypatch.setattr(flower_app, "make_strategy", recording_strategy)
    return trained, aggregates


def check_rounds_equal_fedavg(run_config: RunConfig, summary: dict[str, Any], trained: dict, aggregates: dict) -> None:
    """Every round: the SecAgg+ aggregate is the weighted mean of the aggregated clients' models, within the
    quantisation tolerance of that round (its clients, its max_weight, its total weight)."""
    assert sorted(aggregates) == list(range(1, ROUNDS + 1))
    for record in summary["history"][1:]:
        server_round = record["round"]
        contributors = record["aggregated"]
        models = [trained[(server_round, p)] for p in contributors]
        total = sum(weight for _, weight in models)
        max_weight = max(n_train(run_config, p) for p in record["clients"])
        tolerance = secagg.aggregate_tolerance(len(contributors), max_weight, total)
        assert tolerance < 1e-5  # the bound is meaningful: far below the updates' size
        for name, value in aggregates[server_round].items():
            fedavg = sum(arrays[name] * weight for arrays, weight in models) / total
            error = np.abs(value.astype(np.float64) - fedavg).max()
            assert error <= tolerance + FLOAT32_SLACK * np.abs(fedavg).max(), (server_round, name, error, tolerance)


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


def run_tolerance(run_config: RunConfig, summary: dict[str, Any]) -> float:
    """The sum of the rounds' tolerances: local SGD on logistic regression (convex, no momentum, small lr) does
    not expand differences of the starting model, so each round adds at most its own quantisation error."""
    total = 0.0
    for record in summary["history"][1:]:
        sizes = [n_train(run_config, p) for p in record["aggregated"]]
        total += secagg.aggregate_tolerance(len(sizes), max(n_train(run_config, p) for p in record["clients"]),
                                            sum(sizes))
    return total + 1e-6  # float32 rounding of the models (|w| < 1) over the rounds


# ---- fast: the local engine -------------------------------------------------------------------------------
def test_secagg_aggregate_equals_fedavg_within_quantisation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained, aggregates = spy(monkeypatch)
    run_config, secure = run(config(True), tmp_path / "secagg")
    check_rounds_equal_fedavg(run_config, secure, trained, aggregates)
    monkeypatch.undo()
    _, plain = run(config(False), tmp_path / "plain")
    for a, b in zip(secure["history"][1:], plain["history"][1:], strict=True):
        assert a["aggregated"] == b["aggregated"] == [0, 1, 2, 3] and a["failed"] == []
        assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)  # the clients' own metrics, averaged
        assert a["samples_total"] == b["samples_total"] and a["bytes_total"] == b["bytes_total"]
    assert 0 < max_difference(secure, plain) <= run_tolerance(run_config, secure)  # quantised, and close


def test_secagg_run_with_a_dropped_client_equals_fedavg_over_the_survivors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # dropout_fraction 1/4: one of the 4 clients raises in train, i.e. at the collect-masked-vectors stage,
    # after sharing its keys; threshold 3 of 4, so its pairwise masks are rebuilt from the survivors' shares.
    trained, aggregates = spy(monkeypatch)
    run_config, secure = run(config(True, dropout_fraction=0.25), tmp_path / "secagg")
    for record in secure["history"][1:]:
        assert len(record["dropouts"]) == 1 and record["failed"] == record["dropouts"]
        assert sorted(record["aggregated"] + record["dropouts"]) == record["clients"] == [0, 1, 2, 3]
        assert all((record["round"], p) not in trained for p in record["dropouts"])
    assert len({tuple(r["dropouts"]) for r in secure["history"][1:]}) > 1  # not always the same client
    assert secure["metrics"]["failed_client_rounds"] == ROUNDS
    check_rounds_equal_fedavg(run_config, secure, trained, aggregates)
    monkeypatch.undo()
    _, plain = run(config(False, dropout_fraction=0.25), tmp_path / "plain")
    assert [r["aggregated"] for r in secure["history"][1:]] == [r["aggregated"] for r in plain["history"][1:]]
    assert max_difference(secure, plain) <= run_tolerance(run_config, secure)


def test_secagg_discarded_straggler_is_held_back_not_summed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A straggler whose reply comes too late trains, but its masked vector never reaches the sum.
    trained, aggregates = spy(monkeypatch)
    run_config, secure = run(config(True, straggler_fraction=0.25), tmp_path / "secagg")
    for record in secure["history"][1:]:
        (straggler,) = record["stragglers"]
        assert record["failed"] == [] and straggler not in record["aggregated"] and len(record["aggregated"]) == 3
        assert (record["round"], straggler) in trained  # it did train
    check_rounds_equal_fedavg(run_config, secure, trained, aggregates)
    monkeypatch.undo()
    _, plain = run(config(False, straggler_fraction=0.25), tmp_path / "plain")
    assert max_difference(secure, plain) <= run_tolerance(run_config, secure)


def test_more_dropouts_than_the_threshold_tolerates_stop_the_run(tmp_path: Path) -> None:
    # Refused when the file is loaded: 2 of 4 simulated dropouts per round exceed SecAgg+'s threshold.
    with pytest.raises(ConfigError, match=r"2 of 4 clients per round would drop out of SecAgg\+"):
        experiment_from_dict(config(True, dropout_fraction=0.5))
    # A run built in code (no loader) that loses them anyway stops with the protocol's own account.
    import dataclasses

    base = experiment_from_dict(config(True)).runs[0]
    lossy = dataclasses.replace(base, federated=dataclasses.replace(base.federated, dropout_fraction=0.5))
    with pytest.raises(RunFailedError, match=r"SecAgg\+ stopped at its 'collect_masked_vectors' stage with 2 of 4 "
                                             r"clients.*at most 1 may be lost"):
        run_federated(lossy, RunContext(out=RunDir(tmp_path / "secagg")))


@pytest.mark.parametrize("strategy,options", [("fedprox", {"proximal_mu": 0.1}), ("fedavgm", {})])
def test_fedavg_family_strategies_aggregate_the_unmasked_mean(tmp_path: Path, strategy: str, options: dict) -> None:
    # FedProx's mu travels in the legacy FitIns config; FedAvgM takes its server step on the unmasked mean.
    fed = {"strategy": strategy, "strategy_options": options}
    _, secure = run(config(True, **fed), tmp_path / "secagg")
    _, plain = run(config(False, **fed), tmp_path / "plain")
    assert [r["test_loss"] for r in secure["history"]] == pytest.approx([r["test_loss"] for r in plain["history"]],
                                                                       abs=1e-4)
    assert max_difference(secure, plain) <= 1e-4


def test_reconstruction_threshold_and_tolerance() -> None:
    assert [secagg.reconstruction_threshold(k) for k in (2, 3, 4, 5, 10)] == [2, 2, 3, 3, 6]
    step = 2 * secagg.CLIPPING_RANGE / secagg.QUANTIZATION_RANGE
    assert secagg.aggregate_tolerance(4, 100, 400) == pytest.approx(4 * step / 4)
    assert secagg.MAX_CLIENTS == 1023


# ---- the client mod leaves every other message alone ------------------------------------------------------
@pytest.mark.parametrize("message_type", ["train", "evaluate", "query"])
def test_client_mod_passes_other_messages_through_untouched(message_type: str) -> None:
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                      run_config={})
    with fp.task_identity(run_id=1):
        message = Message(RecordDict({"config": ConfigRecord({"x": 1})}), 5, message_type, group_id="1")
    answer = Message(RecordDict({"metrics": MetricRecord({"num-examples": 3})}), reply_to=message)
    seen = []

    def call_next(msg: Message, ctxt: Context) -> Message:
        seen.append((msg, ctxt))
        return answer

    assert secagg.secagg_client_mod(message, context, call_next) is answer
    assert seen == [(message, context)] and len(context.state) == 0


def test_plain_run_replies_are_fedsims_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A run without SecAgg+ never reaches the protocol: same replies, same records as before.
    called = []
    monkeypatch.setattr(secagg, "secaggplus_mod", lambda *args: called.append(args))
    _, summary = run(config(False, rounds=1), tmp_path / "plain")
    assert called == [] and summary["history"][-1]["aggregated"] == [0, 1, 2, 3]


# ---- slow: Flower's simulation (Ray) ------------------------------------------------------------------------
@pytest.mark.slow
def test_secagg_on_flower_simulation_equals_fedavg_with_a_dropped_client(tmp_path: Path) -> None:
    """SecAgg+ over Ray actors (each stage a round trip through Flower's SuperLink state), one client dropped per
    round, against plain FedAvg on the local engine (which equals plain FedAvg on Ray bit for bit)."""
    run_config, secure = run(config(True, engine="flower", dropout_fraction=0.25), tmp_path / "flower")
    _, plain = run(config(False, engine="local", dropout_fraction=0.25), tmp_path / "local")
    for a, b in zip(secure["history"][1:], plain["history"][1:], strict=True):
        assert a["aggregated"] == b["aggregated"] and a["dropouts"] == b["dropouts"] and len(a["dropouts"]) == 1
    assert max_difference(secure, plain) <= run_tolerance(run_config, secure)


# ---- slow: a deployed SuperLink with two SuperNodes (flwr run) ---------------------------------------------
@pytest.mark.slow
def test_secagg_on_a_deployed_superlink_equals_fedavg(tmp_path: Path) -> None:
    """``flwr run`` against ``fedsim cluster up --flower`` (TLS SuperLink, 2 SuperNodes, a ClientApp process per
    message): one SecAgg+ round of the deployment test's tiny MLP (no BatchNorm) equals the plain round run in
    this process, within the round's quantisation tolerance (the same starting model, the same client models)."""
    import json

    from fedsim.checkpoint import load_checkpoint
    from fedsim.config import load_experiment, run_with_seed
    from tests import test_cluster_flower as cluster

    root = tmp_path / "cluster"
    root.mkdir()
    (root / "deploy.toml").write_text(cluster.EXPERIMENT)
    state_dir = root / "state"
    started: list[Any] = []
    try:
        started = cluster.cluster_up(state_dir, "--supernodes", "2")
        out = root / "secagg"
        log = cluster.finish(cluster.flwr_run({"root": root, "state_dir": state_dir}, out,
                                              "federated.secure_aggregation=true;federated.rounds=1"), out)
    finally:
        cluster.cluster_down(state_dir, started or (cluster.ClusterState.load(state_dir)
                                                    or cluster.ClusterState("flower")).processes)
    folder = out / "deploy" / "deploy-seed3"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["config"]["federated"]["secure_aggregation"] is True, log[-2000:]
    assert summary["history"][1]["aggregated"] == [0, 1] and not summary["history"][1]["failed"]
    deployed = load_checkpoint(folder / "checkpoint.pt")["model"]

    torch.set_num_threads(1)
    plain_run = run_with_seed(load_experiment(root / "deploy.toml", ["federated.rounds=1"]).runs[0], 3)
    plain = run_federated(plain_run, RunContext(out=RunDir(root / "plain")))["model"].state_dict()
    sizes = [n_train(plain_run, p) for p in (0, 1)]
    tolerance = secagg.aggregate_tolerance(2, max(sizes), sum(sizes))
    diff = max(float((deployed[k].double() - plain[k].double()).abs().max()) for k in plain)
    assert 0 < diff <= tolerance + 1e-9, (diff, tolerance)

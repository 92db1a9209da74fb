"""Work per round proportional to the cohort, not the population: virtual nodes on fedsim's grid, no
discovery round, sampled client evaluation with a distribution in the summary."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import fedsim
from fedsim.cli import main
from fedsim.engines.federated.local.grid import LocalGrid, PartitionNodes, run_local
from fedsim.engines.federated.rounds import evaluation_cohort

QUIET = {"epochs": 1, "batch_size": 16, "progress": False, "checkpoint": False, "threads": 1}


def test_node_ids_are_a_seeded_bijection_with_partitions() -> None:
    nodes = PartitionNodes(10**6, seed=3)
    ids = nodes.node_ids()
    assert len(ids) == len(set(ids)) == 10**6 and min(ids) > 1
    for k in (0, 1, 999_999, 123_456):
        assert ids[k] == nodes.node_of(k) and nodes.partition_of(ids[k]) == k
    assert nodes.partition_of(12345) is None  # not a node of this grid
    assert PartitionNodes(10, seed=3).node_ids() == PartitionNodes(10, seed=3).node_ids() != \
        PartitionNodes(10, seed=4).node_ids()


def test_nodes_exist_only_while_sampled_or_stateful() -> None:
    """A million registered SuperNodes: only the addressed ones get a Context; one whose state stays
    empty is dropped after its call, one that keeps state stays."""
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if pid % 2:  # odd partitions keep a counter
            visits = int(context.state["c"]["visits"]) + 1 if "c" in context.state else 1
            context.state["c"] = ConfigRecord({"visits": visits})
        return Message(RecordDict({"metrics": MetricRecord({"pid": pid})}), reply_to=msg)

    server = ServerApp()
    seen: dict[str, Any] = {}

    @server.main()
    def main_(grid: Grid, context: Context) -> None:
        ids = list(grid.get_node_ids())
        seen["count"] = len(ids)
        for _ in range(2):
            picked = [ids[k] for k in (7, 8, 999_998)]
            replies = grid.send_and_receive([Message(RecordDict(), node, "train", group_id="1") for node in picked])
            seen.setdefault("pids", []).append(sorted(int(r.content["metrics"]["pid"]) for r in replies))
        seen["alive"] = sorted(grid.nodes[n].partition_id for n in grid.nodes)  # type: ignore[attr-defined]

    run_local(server, client, 10**6, seed=1)
    assert seen["count"] == 10**6
    assert seen["pids"] == [[7, 8, 999_998]] * 2
    assert seen["alive"] == [7]  # the stateful odd partition; 8 and 999,998 held nothing


def test_the_round_loop_asks_no_node_it_does_not_sample(tmp_path: Path) -> None:
    """No discovery round on fedsim's grid: the messages of a run are the cohort's, not the population's."""
    grids: list[LocalGrid] = []
    import fedsim.engines.federated.local.grid as local_grid

    original = local_grid.LocalGrid.__init__

    def spy(self: LocalGrid, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        grids.append(self)

    local_grid.LocalGrid.__init__ = spy  # type: ignore[method-assign]
    try:
        fedsim.run({"name": "cohort", "task": "tests.helpers.tiny_task:TinyTask", "mode": "federated",
                    "train": QUIET, "federated": {"engine": "local", "num_clients": 200, "clients_per_round": 4,
                                                  "rounds": 3, "evaluate_clients": 5}}, out=tmp_path, quiet=True)
    finally:
        local_grid.LocalGrid.__init__ = original  # type: ignore[method-assign]
    assert grids[0].stats["messages"] == 3 * 4 + 5  # three rounds of 4, one evaluation cohort of 5


def test_evaluation_cohorts_are_seeded_samples_or_everyone() -> None:
    assert evaluation_cohort(0, 11, 20, 1000) == list(range(20))
    assert evaluation_cohort(0, 11, 20, 1.0) == list(range(20))
    five = evaluation_cohort(0, 11, 10**6, 5)
    assert len(five) == 5 and five == sorted(five) and five == evaluation_cohort(0, 11, 10**6, 5)
    assert five != evaluation_cohort(1, 11, 10**6, 5)
    assert len(evaluation_cohort(0, 3, 1000, 0.1)) == 100


def test_sampled_client_evaluation_keeps_a_distribution(tmp_path: Path) -> None:
    summary = fedsim.run({"name": "sampled", "task": "tests.helpers.tiny_task:TinyTask", "mode": "federated",
                          "train": QUIET, "federated": {
                              "engine": "local", "num_clients": 30, "clients_per_round": 5, "rounds": 4,
                              "evaluate_clients": 8, "evaluate_clients_every": 2, "client_metrics_file": True}},
                         out=tmp_path, quiet=True)[0]
    metrics = summary["metrics"]
    assert metrics["clients_evaluated"] == 8
    assert metrics["client_accuracy_p10"] <= metrics["client_accuracy_p50"] <= metrics["client_accuracy_p90"]
    assert metrics["client_accuracy_worst10"] <= metrics["client_accuracy_mean"]
    rows = [json.loads(line) for line in
            gzip.decompress((tmp_path / "sampled" / "sampled" / "client_metrics.jsonl.gz").read_bytes()).splitlines()]
    assert len(rows) == 8 and {row["client"] for row in rows} == set(evaluation_cohort(0, 5, 30, 8))
    assert np.mean([row["accuracy"] for row in rows]) == pytest.approx(metrics["client_accuracy_mean"])
    by_round = {h["round"]: h for h in summary["history"]}
    assert by_round[2]["clients_evaluated"] == 8 and "clients_evaluated" not in by_round[3]


@pytest.mark.parametrize("value,reason", [(0, "at least one client"), (1.5, "in (0, 1]"), (-0.2, "in (0, 1]")])
def test_an_empty_or_bad_evaluation_cohort_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      value: float, reason: str) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(f'mode = "federated"\n[federated]\nevaluate_clients = {value}\n')
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: key 'federated.evaluate_clients' = {value!r}" in err and reason in err


def test_a_million_registered_clients_two_rounds_of_five(tmp_path: Path) -> None:
    """FedProx's Synthetic(0.5, 0.5) with 10^6 clients generated on demand: the run costs the cohort."""
    import time

    started = time.perf_counter()
    summary = fedsim.run({
        "name": "million", "task": "logreg", "mode": "federated", "train": {**QUIET, "lr": 0.01},
        "data": {"name": "fedprox_synthetic",
                 "options": {"alpha": 0.5, "beta": 0.5, "num_clients": 10**6, "central_clients": 50}},
        "federated": {"engine": "local", "partition": "natural", "clients_per_round": 5, "rounds": 2,
                      "evaluate_clients": 5, "client_metrics_file": True},
    }, out=tmp_path, quiet=True)[0]
    elapsed = time.perf_counter() - started
    assert summary["config"]["federated"]["num_clients"] == 10**6  # from the data
    rounds = summary["history"][1:]
    assert [len(h["clients"]) for h in rounds] == [5, 5] and max(max(h["clients"]) for h in rounds) > 1000
    assert summary["metrics"]["clients_evaluated"] == 5
    assert elapsed < 60  # seconds (a few on an idle 2-core machine), not minutes

"""Gossip (D-PSGD) engine: complete graph == FedAvg, consensus on a ring, both backends agree, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fedsim
from fedsim.checkpoint import load_checkpoint
from fedsim.data.partition import partition
from fedsim.engines.common import build_model, load_task_data
from fedsim.engines.gossip.decentralized import consensus_distance, mix
from fedsim.engines.gossip.topology import topology_matrix
from fedsim.errors import FedsimError
from fedsim.experiment import resolve
from fedsim.tasks import TaskContext, move_batch

TINY = "tests.helpers.tiny_task:TinyTask"
EXACT = {"dtype": "float64", "threads": 1, "optimizer": "sgd", "momentum": 0.0, "progress": False}


def gossip(name: str, train: dict, **decentralized: object) -> dict:
    return {"name": name, "task": TINY, "mode": "decentralized", "train": train, "decentralized": decentralized}


def node_states(out: Path, name: str) -> list[dict[str, torch.Tensor]]:
    """Every node's final model, from the run's checkpoint (a one-run experiment: out/name/name)."""
    checkpoint = load_checkpoint(out / name / name / "checkpoint.pt")
    return [node["model"] for node in checkpoint["engine_state"]["nodes"]]


def test_complete_graph_one_local_step_equals_fedavg(tmp_path: Path) -> None:
    # Prepare: 3 nodes (digits' 1437 training samples split 479 x 3), one full-batch step per round.
    nodes, batch, rounds, lr = 3, 479, 2, 0.5
    train = {**EXACT, "lr": lr, "batch_size": batch}
    config = gossip("complete", train, nodes=nodes, rounds=rounds, local_steps=1, topology="complete")
    run = resolve(config).runs[0]
    task, split = load_task_data(run)
    parts = partition(split.train.tensors[1].numpy(), nodes, "iid", seed=run.train.seed)
    assert {len(p) for p in parts} == {batch}  # equal partitions
    # FedAvg with all clients, by hand: each client one GD step from the global model, sample-weighted mean.
    global_model = build_model(task, split, run, torch.device("cpu"))
    for _ in range(rounds):
        clients = []
        for part in parts:
            client = copy.deepcopy(global_model)
            optimizer = torch.optim.SGD(client.parameters(), lr=lr)
            task.train_step(client, move_batch(split.train[torch.as_tensor(part)], client), {"model": optimizer},
                            context=TaskContext())
            clients.append((len(part), client.state_dict()))
        total = sum(n for n, _ in clients)
        global_model.load_state_dict({k: sum(n / total * s[k] for n, s in clients) for k in clients[0][1]})
    # Execute
    summary = fedsim.run(config, out=tmp_path, quiet=True)[0]
    # Assert: the nodes are identical and equal FedAvg's global model
    states = node_states(tmp_path, "complete")
    for state in states[1:]:  # identical up to rounding (the diagonal 1 - 2/3 is not the float 1/3)
        for key, value in state.items():
            assert (value - states[0][key]).abs().max() < 1e-14, key
    for key, value in global_model.state_dict().items():
        assert (states[0][key] - value).abs().max() < 1e-12, key
    assert summary["history"][-1]["consensus_distance"] < 1e-12
    assert summary["communication"]["bytes_per_round_per_node"] > 0


def test_gossip_contracts_to_the_average_on_a_ring() -> None:
    # Pure gossip (no training): the spread shrinks every round by at most |lambda_2| of W; the mean stays.
    weights = topology_matrix("ring", 8)
    states = {i: torch.randn(50, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(8)}
    mean = torch.stack(list(states.values())).mean(0)
    rate = float(np.sort(np.abs(np.linalg.eigvalsh(weights)))[-2])
    distances = [consensus_distance(list(states.values()))]
    for _ in range(10):
        states = {i: mix(weights, i, {j: states[j] for j in range(8) if weights[i, j]}) for i in range(8)}
        distances.append(consensus_distance(list(states.values())))
        spread = torch.stack(list(states.values())) - mean
        assert torch.allclose(torch.stack(list(states.values())).mean(0), mean, atol=1e-12)
    assert all(b < a for a, b in zip(distances, distances[1:], strict=False))
    assert distances[-1] < distances[0] * rate ** 10 * np.sqrt(8)  # the spectral bound (Frobenius -> mean)
    assert spread.abs().max() < 0.5


def test_consensus_distance_shrinks_over_rounds_on_a_ring(tmp_path: Path) -> None:
    # Non-iid nodes drift apart while they train; with a decaying step size gossip wins and the
    # nodes contract towards their average (D-PSGD: distance ~ lr / spectral gap).
    train = {"lr": 0.2, "batch_size": 16, "schedule": "step", "step_size": 1, "gamma": 0.5, "progress": False,
             "threads": 1, "checkpoint": False}
    summary = fedsim.run(gossip("ring", train, nodes=8, rounds=10, local_steps=4, topology="ring",
                                partition="dirichlet", alpha=0.3), out=tmp_path, quiet=True)[0]
    distances = [h["consensus_distance"] for h in summary["history"]]
    peak = int(np.argmax(distances))
    assert peak < len(distances) - 2
    assert all(b < a for a, b in zip(distances[peak:], distances[peak + 1:], strict=False)), distances
    assert distances[-1] < 0.5 * distances[peak], distances
    last = summary["history"][-1]
    assert {"test_accuracy", "avg_model_test_accuracy", "consensus_distance", "bytes_per_node"} <= set(last)
    lines = (tmp_path / "ring" / "ring" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 10


@pytest.mark.slow
def test_inprocess_and_torch_distributed_backends_agree(tmp_path: Path) -> None:
    train = {**EXACT, "lr": 0.1, "batch_size": 16}
    settings = {"nodes": 4, "rounds": 3, "local_steps": 2, "topology": "ring", "partition": "dirichlet",
                "alpha": 0.5, "timeout_s": 240}
    local = fedsim.run(gossip("local", train, **settings), out=tmp_path, quiet=True)[0]
    distributed = fedsim.run(gossip("dist", train, backend="torch_distributed", **settings), out=tmp_path,
                             quiet=True)[0]
    for a, b in zip(node_states(tmp_path, "local"), node_states(tmp_path, "dist"), strict=True):
        for key in a:
            assert (a[key] - b[key]).abs().max() < 1e-5, key
    assert abs(local["metrics"]["consensus_distance"] - distributed["metrics"]["consensus_distance"]) < 1e-8
    assert local["metrics"]["avg_model_accuracy"] == distributed["metrics"]["avg_model_accuracy"]
    assert node_states(tmp_path, "local")[0]["out.weight"].abs().sum() > 0


def test_topology_errors_name_the_file_key_and_value(tmp_path: Path) -> None:
    train = {"progress": False}
    with pytest.raises(FedsimError, match=r"decentralized.topology' = 'torus'.*7 is prime"):
        fedsim.run(gossip("t", train, nodes=7, topology="torus"), out=tmp_path, quiet=True)
    with pytest.raises(FedsimError, match="disconnected graph"):
        fedsim.run(gossip("r", train, nodes=6, topology="random_regular", degree=1), out=tmp_path, quiet=True)


def test_resume_matches_uninterrupted(tmp_path: Path) -> None:
    train = {"lr": 0.1, "batch_size": 16, "momentum": 0.9, "progress": False, "threads": 1}
    settings = {"nodes": 4, "local_steps": 3, "topology": "ring", "partition": "dirichlet", "alpha": 0.5}
    fedsim.run(gossip("full", train, rounds=4, **settings), out=tmp_path, quiet=True)
    fedsim.run(gossip("cut", train, rounds=2, **settings), out=tmp_path, quiet=True)
    resumed = fedsim.run(gossip("cut", train, rounds=4, **settings), out=tmp_path, resume=True, quiet=True)[0]
    for a, b in zip(node_states(tmp_path, "full"), node_states(tmp_path, "cut"), strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert [h["round"] for h in resumed["history"]] == [1, 2, 3, 4]


@pytest.mark.slow
def test_topologies_experiment_writes_its_table_and_plots(tmp_path: Path, repo_root: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # The real experiment file, shrunk to one round and the in-process rows (the Ray and torchrun
    # rows have their own tests); the report must print the traffic table and draw both panels.
    overrides = ["train.epochs=1", "federated.rounds=1", "decentralized.rounds=1"]
    only = ["central", "fedavg_dir", "ring_iid", "complete_dir"]
    summaries = fedsim.run(f"{repo_root}/experiments/topologies.toml", overrides, out=tmp_path, only=only)
    assert [s["name"] for s in summaries] == only
    root = tmp_path / "topologies"
    assert (root / "accuracy_vs_round_iid.png").stat().st_size > 0
    assert (root / "accuracy_vs_round_dirichlet.png").stat().st_size > 0
    table = {row["run"]: row for row in json.loads((root / "topologies_table.json").read_text())}
    assert table["central"]["mb_per_node"] == 0
    # a ring node exchanges with 2 neighbours, a complete-graph node with 7
    ring, complete = table["ring_iid"]["mb_per_round_per_node"], table["complete_dir"]["mb_per_round_per_node"]
    assert complete == pytest.approx(ring * 7 / 2)
    assert table["fedavg_dir"]["rounds"] == 1 and table["fedavg_dir"]["mb_per_node"] > 0
    assert "MB/round/node" in capsys.readouterr().out

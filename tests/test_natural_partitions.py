"""Partitions the data fix: ``partition = "natural"`` (the data's own clients) sets the number of
clients, each client trains on exactly its own samples and is scored on its own test samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedsim
from fedsim.cli import main
from fedsim.data import DatasetSplit, NaturalClients, load_dataset

WRITERS = 7


def digits_by_writer(test_fraction: float, split_seed: int, normalise: bool = True, data_dir: str = "data",
                     **options: Any) -> DatasetSplit:
    """Digits whose samples are dealt to WRITERS 'writers' by a fixed, skewed rule (a natural partition)."""
    split = load_dataset("digits", test_fraction=test_fraction, split_seed=split_seed, normalise=normalise)
    train_y, test_y = (split.train.tensors[1].numpy(), split.test.tensors[1].numpy())
    writer = lambda y, n: (y * 3 + np.arange(n)) % WRITERS  # noqa: E731 - label-dependent: skewed writers
    names = tuple(f"writer{w}" for w in range(WRITERS))
    clients = NaturalClients.from_ids(writer(train_y, len(train_y)), writer(test_y, len(test_y)), names)
    return DatasetSplit(split.train, split.test, split.info, clients=clients)


LOADER = "tests.test_natural_partitions:digits_by_writer"


def natural_run(**federated: Any) -> dict[str, Any]:
    return {"name": "natural", "task": "bn_cnn", "mode": "federated", "data": {"name": LOADER},
            "train": {"epochs": 1, "batch_size": 32, "progress": False, "checkpoint": False, "threads": 1},
            "federated": {"engine": "local", "partition": "natural", "clients_per_round": 3, "rounds": 2,
                          **federated}}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "natural.toml"
    path.write_text(text)
    return path


def test_the_data_set_the_number_of_clients_and_each_trains_on_its_own_samples(tmp_path: Path) -> None:
    from fedsim.config import experiment_from_dict
    from fedsim.engines.federated.flower_app import client_data

    summary = fedsim.run(natural_run(), out=tmp_path, quiet=True)[0]
    assert summary["config"]["federated"]["num_clients"] == WRITERS
    assert summary["metrics"]["accuracy"] > 0.3
    run = experiment_from_dict(natural_run(num_clients=WRITERS)).runs[0]
    data = client_data(run)
    split = data.split
    assert split.clients is not None
    for k in range(WRITERS):
        shard = data.shard(k)
        assert shard.train is split.train and shard.held is split.test  # natural clients keep their test samples
        assert shard.train_idx.tolist() == split.clients.train_indices(k).tolist()
        assert shard.held_idx.tolist() == split.clients.test_indices(k).tolist()
    every = sorted(i for k in range(WRITERS) for i in data.shard(k).train_idx.tolist())
    assert every == list(range(len(split.train)))  # every training sample belongs to exactly one client


def test_a_conflicting_client_count_names_both_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, f'task = "bn_cnn"\nmode = "federated"\ndata = {{ name = "{LOADER}" }}\n'
                           '[federated]\npartition = "natural"\nnum_clients = 20\nclients_per_round = 2\n')
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{path}: key 'federated.num_clients' = 20: the data come with {WRITERS} clients" in err
    assert not (tmp_path / "out").exists()


def test_a_cohort_larger_than_the_natural_population_is_refused(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, f'task = "bn_cnn"\nmode = "federated"\ndata = {{ name = "{LOADER}" }}\n'
                           '[federated]\npartition = "natural"\nclients_per_round = 9\n')
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "key 'federated.clients_per_round' = 9" in err and f"num_clients = {WRITERS}" in err


def test_natural_partitions_need_data_with_clients(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, 'task = "bn_cnn"\nmode = "federated"\n[federated]\npartition = "natural"\n')
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "key 'federated.partition' = 'natural'" in err and "'digits' has none" in err


# ---- Flower Datasets partitioners through the federated engine ---------------------------------------------
def flwr_run(partitioner: str, options: dict[str, Any], **federated: Any) -> dict[str, Any]:
    return {"name": "flwr", "task": "bn_cnn", "mode": "federated",
            "train": {"epochs": 1, "batch_size": 32, "progress": False, "checkpoint": False, "threads": 1},
            "federated": {"engine": "local", "partition": "flwr", "partitioner": partitioner,
                          "partitioner_options": options, "client_test_fraction": 0.0, "clients_per_round": 2,
                          "rounds": 2, **federated}}


@pytest.mark.filterwarnings("ignore:Specifying null_placement:FutureWarning")
def test_clients_train_on_exactly_the_rows_of_a_flower_datasets_partition(tmp_path: Path) -> None:
    """fedsim's ClientApp trains client k on exactly partitioner.load_partition(k)'s rows."""
    import flwr_datasets.partitioner as fp
    from datasets import Dataset

    from fedsim.config import experiment_from_dict
    from fedsim.engines.federated.flower_app import client_data

    options = {"alpha": 0.5, "partition_by": "label", "min_partition_size": 5}
    config = flwr_run("DirichletPartitioner", options, num_clients=6)
    summary = fedsim.run(config, out=tmp_path, quiet=True)[0]
    assert summary["metrics"]["accuracy"] > 0.3
    data = client_data(experiment_from_dict(config).runs[0])
    labels = data.split.train.tensors[1].numpy()
    flower = fp.DirichletPartitioner(num_partitions=6, seed=0, **options)  # seed = train.seed
    flower.dataset = Dataset.from_dict({"label": labels, "row": np.arange(len(labels))})
    for k in range(6):
        rows = flower.load_partition(k)["row"]
        assert sorted(data.shard(k).train_idx.tolist()) == sorted(rows) and len(rows) > 0


def test_natural_id_partitioner_takes_the_client_count_from_the_data(tmp_path: Path) -> None:
    """NaturalIdPartitioner, like partition = "natural", fixes num_clients: left out, it comes from the data."""
    config = flwr_run("NaturalIdPartitioner", {"partition_by": "label"})
    config["federated"]["clients_per_round"] = 3
    summary = fedsim.run(config, out=tmp_path, quiet=True)[0]
    assert summary["config"]["federated"]["num_clients"] == 10  # one client per digit class


def digits_with_an_empty_writer(test_fraction: float, split_seed: int, normalise: bool = True,
                                data_dir: str = "data", **options: Any) -> DatasetSplit:
    """As digits_by_writer, plus an eighth writer who wrote nothing for training."""
    split = digits_by_writer(test_fraction, split_seed, normalise, data_dir)
    clients = split.clients
    assert clients is not None
    names = (*clients.names, "silent")
    offsets = np.append(clients.train_offsets, clients.train_offsets[-1])
    test_offsets = np.append(clients.test_offsets, clients.test_offsets[-1])
    empty = NaturalClients(names, clients.train_order, offsets, clients.test_order, test_offsets)
    return DatasetSplit(split.train, split.test, split.info, clients=empty)


def test_a_natural_client_without_training_samples_is_refused(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, 'task = "bn_cnn"\nmode = "federated"\n'
                           'data = { name = "tests.test_natural_partitions:digits_with_an_empty_writer" }\n'
                           '[federated]\npartition = "natural"\nclients_per_round = 2\n')
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{path}: key 'federated.num_clients' = {WRITERS + 1}" in err and f"client {WRITERS} would get no" in err

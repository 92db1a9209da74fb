"""The real-data experiments (FEMNIST, Shakespeare, CIFAR-10 Dirichlet) end to end on generated
stand-ins in the real on-disk formats, cut short with --set: the comparison table comes out."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.cli import main
from fedsim.data.leaf import write_leaf_standin
from fedsim.data.torchvision_files import write_cifar10_standin

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--set", "seeds=[0]", "--set", "train.epochs=1", "--set", "federated.rounds=2",
         "--set", "train.progress=false", "--set", "train.checkpoint=false", "--set", "train.threads=1"]


def run(experiment: str, data_dir: Path, out: Path, *extra: str) -> int:
    return main(["run", str(ROOT / "experiments" / experiment), "--set", f"data.data_dir={data_dir}",
                 "--out", str(out), *SHORT, *extra])


def comparison_lines(printed: str) -> list[str]:
    return [line for line in printed.splitlines() if line.strip().startswith(("central", "fedavg", "fedprox"))]


@pytest.mark.parametrize("kind,experiment", [("femnist", "femnist.toml"), ("shakespeare", "shakespeare.toml")])
def test_leaf_experiment_on_a_standin(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str,
                                      experiment: str) -> None:
    write_leaf_standin(tmp_path / "data" / "leaf" / kind / "data", kind, users=6, files=2, seed=1)
    code = run(experiment, tmp_path / "data", tmp_path / "out", "--set", "federated.clients_per_round=3",
               "--set", "federated.local_steps=2")
    printed = capsys.readouterr().out
    assert code == 0
    assert "(mean ± std over seeds; all columns in comparison.md)" in printed
    rows = comparison_lines(printed)
    assert rows and all(len(line) <= 120 for line in printed.splitlines() if not line.startswith("wrote "))
    assert (tmp_path / "out" / kind / "comparison.md").is_file()
    # One client per stand-in user: num_clients came from the data.
    assert '"num_clients": 6' in (tmp_path / "out" / kind / "fedavg-seed0" / "summary.json").read_text()


def test_cifar10_dirichlet_experiment_on_a_standin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_cifar10_standin(tmp_path / "data", per_batch=24, test=40)
    code = run("cifar10_dirichlet.toml", tmp_path / "data", tmp_path / "out", "--set", "federated.num_clients=4",
               "--set", "federated.clients_per_round=2", "--set", "train.max_steps=2",
               "--only", "central", "--only", "fedavg-dir0.5", "--only", "resnet18gn-dir0.5")
    printed = capsys.readouterr().out
    assert code == 0
    assert {line.split()[0] for line in comparison_lines(printed)} >= {"central", "fedavg-dir0.5"}
    assert (tmp_path / "out" / "cifar10_dirichlet" / "resnet18gn-dir0.5-seed0" / "summary.json").is_file()


def test_partitions_shows_a_natural_partition(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``fedsim partitions`` on LEAF writers: clients, size distribution and label skew."""
    import numpy as np

    from fedsim.data.leaf import load_leaf_split
    from fedsim.reports.partitions import size_summary

    folder = write_leaf_standin(tmp_path / "data" / "leaf" / "femnist" / "data", "femnist", users=8, seed=1)
    code = main(["partitions", str(ROOT / "experiments" / "femnist.toml"), "--set", f"data.data_dir={tmp_path / 'data'}",
                 "--set", "federated.clients_per_round=3", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 0
    clients = load_leaf_split(0.2, 0, data_dir=str(tmp_path / "data"), path=str(folder)).clients
    sizes = np.array([len(clients.train_indices(k)) for k in range(clients.num_clients)])
    row = next(line for line in printed.splitlines() if line.startswith("│ 8 "))
    assert [cell.strip() for cell in row.strip("│ ").split("│")][:8] == [
        "8", str(sizes.sum()), *[str(v) for v in size_summary(sizes)]]
    assert sizes.min() > 0 and "natural, 8 clients" in printed and "label skew" in printed
    assert (tmp_path / "out" / "femnist" / "partitions-fedavg.png").is_file()

"""Experiment files: validation errors name file, key and value; overrides; exit code 2 from the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.config import RunConfig, experiment_from_dict, load_experiment, parse_override
from fedsim.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_defaults_and_runs_merge(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "e"\ntask = "bn_cnn"\n[train]\nepochs = 3\nlr = 1\n'
                           '[[runs]]\nname = "a"\n[[runs]]\nname = "b"\n[runs.train]\nepochs = 5\n')
    exp = load_experiment(path)
    assert [r.name for r in exp.runs] == ["a", "b"]
    assert [r.train.epochs for r in exp.runs] == [3, 5]
    assert exp.runs[0].train.lr == 1.0 and isinstance(exp.runs[0].train.lr, float)
    assert exp.runs[1].source == str(path)


def test_set_overrides_every_run(tmp_path: Path) -> None:
    path = write(tmp_path, '[[runs]]\nname = "a"\n[[runs]]\nname = "b"\n')
    exp = load_experiment(path, ["train.epochs=7", "seeds=[1, 2]", "federated.strategy=fedprox"])
    assert {r.train.epochs for r in exp.runs} == {7}
    assert {r.federated.strategy for r in exp.runs} == {"fedprox"}
    assert exp.seeds == (1, 2)


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("bogus = 1\n", "bogus", "1"),
        ("[train]\nepochs = 'three'\n", "train.epochs", "'three'"),
        ("[train]\noptimizer = 'lbfgs'\n", "train.optimizer", "'lbfgs'"),
        ("[[runs]]\nname = 'a'\n[runs.federated]\nrounds = 2.5\n", "runs[0].federated.rounds", "2.5"),
    ],
)
def test_errors_name_file_key_value(tmp_path: Path, text: str, key: str, value: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    assert str(path) in message and f"'{key}'" in message and value in message


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_experiment(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_experiment(write(tmp_path, "a = [\n"))


def test_cli_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'task = "bn_cnn"\nlearning_rate = 0.1\n')
    proc = subprocess.run([sys.executable, "-m", "fedsim", "run", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "learning_rate" in proc.stderr and str(path) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_configs_are_frozen() -> None:
    run = RunConfig()
    with pytest.raises(AttributeError):
        run.task = "x"  # type: ignore[misc]


def test_parse_override_values() -> None:
    assert parse_override("train.lr=0.5") == (["train", "lr"], 0.5)
    assert parse_override("federated.strategy=fedavg") == (["federated", "strategy"], "fedavg")
    assert parse_override("pipeline.split=['a','b']") == (["pipeline", "split"], ["a", "b"])


def test_duplicate_run_names_rejected() -> None:
    with pytest.raises(ConfigError, match="unique"):
        experiment_from_dict({"runs": [{"name": "a"}, {"name": "a"}]})

"""Validation before anything runs: every bad value is one line naming file, key and value, exit 2.

The issue's cases as a new user tries them (``fedsim run`` in-process, one as a real process), a few
more rules, renamed keys still read with a warning, and every shipped experiment still passing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.cli import main
from fedsim.config import (
    FederatedConfig,
    RunConfig,
    experiment_from_dict,
    from_dict,
    load_experiment,
    run_violations,
)
from fedsim.errors import ConfigError
from fedsim.validation import validate_experiment

FED = 'task = "bn_cnn"\nmode = "federated"\n[train]\nprogress = false\n[federated]\nrounds = 1\n'

BAD = {
    # The list.
    "clients_per_round > num_clients": (FED + "num_clients = 5\nclients_per_round = 10\n",
                                        "federated.clients_per_round", "10"),
    "negative num_clients": (FED + "num_clients = -3\n", "federated.num_clients", "-3"),
    "negative dirichlet alpha": (FED + 'partition = "dirichlet"\nalpha = -1.0\n', "federated.alpha", "-1.0"),
    "NaN learning rate": ('task = "bn_cnn"\n[train]\nlr = nan\n', "train.lr", "nan"),
    "more clients than samples": (FED + "num_clients = 5000\n", "federated.num_clients", "5000"),
    # More rules.
    "fraction above 1": (FED + "fraction_fit = 1.5\n", "federated.fraction_fit", "1.5"),
    "test fraction of 1": ('task = "bn_cnn"\n[data]\ntest_fraction = 1.0\n', "data.test_fraction", "1.0"),
    "batch size 0": ('task = "bn_cnn"\n[train]\nbatch_size = 0\n', "train.batch_size", "0"),
    "infinite server learning rate": (FED + 'strategy = "fedavgm"\nstrategy_options = { server_learning_rate = inf }\n',
                                      "federated.strategy_options.server_learning_rate", "inf"),
    "negative proximal mu": (FED + 'strategy = "fedprox"\nstrategy_options = { proximal_mu = -0.1 }\n',
                             "federated.strategy_options.proximal_mu", "-0.1"),
    "every client fails": (FED + "clients_per_round = 2\ndropout_fraction = 0.4\nstraggler_fraction = 0.4\n",
                           "federated.dropout_fraction", "0.4"),
    "no local training": (FED + "local_epochs = 0\n", "federated.local_epochs", "0"),
    "key of a run table": ('task = "bn_cnn"\n[[runs]]\nname = "a"\n[[runs]]\nname = "b"\n[runs.decentralized]\nalpha = 0.0\n',
                           "runs[1].decentralized.alpha", "0.0"),
    "repeated seeds": ('task = "bn_cnn"\nseeds = [0, 1, 0]\n', "seeds[2]", "0"),
    "unknown partition": (FED + 'partition = "pathological"\n', "federated.partition", "'pathological'"),
    "unknown task option": ('task = "bn_cnn"\ntask_options = { dropuot = 0.1 }\n', "task_options.dropuot", "0.1"),
    "more gossip nodes than samples": ('task = "bn_cnn"\nmode = "decentralized"\n[decentralized]\nnodes = 2000\n',
                                      "decentralized.nodes", "2000"),
    "torus on a prime": ('task = "bn_cnn"\nmode = "decentralized"\n[decentralized]\nnodes = 7\ntopology = "torus"\n',
                         "decentralized.topology", "'torus'"),
    "interleaved without virtual stages": ('task = "bn_cnn"\nmode = "pipeline"\n[pipeline]\nschedule = "interleaved_1f1b"\n',
                                           "pipeline.virtual_stages", "1"),
}


def run_cli(tmp_path: Path, text: str, *extra: str) -> tuple[int, Path, Path]:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    out = tmp_path / "out"
    return main(["run", str(path), "--out", str(out), *extra]), path, out


def assert_one_line_error(stderr: str, path: Path | str, key: str, value: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert str(path) in lines[0] and f"key '{key}' = {value}:" in lines[0], lines[0]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_naming_file_key_and_value(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     case: str) -> None:
    text, key, value = BAD[case]
    code, path, out = run_cli(tmp_path, text)
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, path, key, value)
    assert not out.exists()  # nothing started


def test_too_many_clients_says_how_many_samples_and_clients(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run_cli(tmp_path, FED + "num_clients = 5000\n")
    assert code == 2
    err = capsys.readouterr().err
    assert "5000 clients but the training split has 1437 samples: client 1437" in err


def test_set_overrides_are_checked_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, path, out = run_cli(tmp_path, FED, "--set", "federated.num_clients=3", "--set",
                              "federated.clients_per_round=4")
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, path, "federated.clients_per_round", "4")
    assert not out.exists()


def test_a_bad_later_run_stops_the_experiment_before_the_first_run(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    text = ('task = "bn_cnn"\n[train]\nprogress = false\nepochs = 1\n[[runs]]\nname = "central"\n'
            '[[runs]]\nname = "fed"\nmode = "federated"\nfederated = { num_clients = 3000, rounds = 1 }\n')
    code, path, out = run_cli(tmp_path, text)
    assert code == 2
    err = capsys.readouterr().err
    assert_one_line_error(err, path, "federated.num_clients", "3000")
    assert "(run 'fed')" in err
    assert not out.exists()


def test_real_process_exits_2_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(FED + "num_clients = 5000\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fedsim", "run", str(path), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr, path, "federated.num_clients", "5000")
    assert not out.exists()


# ---- renamed keys ---------------------------------------------------------------------------------------
def test_renamed_keys_are_read_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "exp.toml"
    path.write_text('[federated]\nnum_cpus = 2.0\nnum_gpus = 0.5\nworkers = 2\n[parameter_server]\nnum_cpus = 3\n'
                    '[[runs]]\nname = "a"\n')
    run = load_experiment(path).runs[0]
    assert (run.federated.cpus_per_client, run.federated.gpus_per_client, run.federated.worker_processes) == (2.0, 0.5, 2)
    assert run.parameter_server.ray_num_cpus == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("fedsim: warning: ") and str(path) in line for line in err)
    assert "'federated.num_cpus' is deprecated; use 'federated.cpus_per_client'" in err[0]
    # ... and from --set, and inside a run's own table
    run = load_experiment(path, ["federated.num_cpus=4"]).runs[0]
    assert run.federated.cpus_per_client == 4.0
    assert "--set: key 'federated.num_cpus' is deprecated" in capsys.readouterr().err
    run = experiment_from_dict({"runs": [{"name": "a", "federated": {"workers": 3}}]}, "x.toml").runs[0]
    assert run.federated.worker_processes == 3
    assert "key 'runs[0].federated.workers' is deprecated" in capsys.readouterr().err


def test_old_and_new_name_together_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"key 'federated.num_cpus' = 1.0: renamed to 'federated.cpus_per_client'"):
        experiment_from_dict({"federated": {"num_cpus": 1.0, "cpus_per_client": 2.0}}, "x.toml")


def test_old_summaries_load_silently(capsys: pytest.CaptureFixture[str]) -> None:
    """summary.json files written before the renames (read back by `fedsim compare`)."""
    old = {"mode": "federated", "federated": {"num_cpus": 2.0, "workers": 1}, "parameter_server": {"num_cpus": 4}}
    run = from_dict(RunConfig, old, "summary.json")
    assert run.federated.cpus_per_client == 2.0 and run.parameter_server.ray_num_cpus == 4
    assert capsys.readouterr().err == ""


# ---- defaults and shipped experiments ------------------------------------------------------------------
def test_defaults_pass_and_the_default_engine_is_local() -> None:
    assert list(run_violations(RunConfig())) == []
    assert FederatedConfig().engine == "local"


def test_every_experiment_file_loads_and_validates(repo_root: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from fedsim.data.leaf import write_leaf_standin
    from fedsim.data.torchvision_files import write_cifar10_standin

    # The real-data experiments validate against stand-ins of their files (the real data are not shipped).
    write_leaf_standin(tmp_path / "leaf" / "femnist" / "data", "femnist", users=12)
    write_leaf_standin(tmp_path / "leaf" / "shakespeare" / "data", "shakespeare", users=12)
    write_cifar10_standin(tmp_path, per_batch=200)
    needs_files = {"femnist", "shakespeare", "cifar10_dirichlet"}
    files = sorted((Path(repo_root) / "experiments").glob("*.toml"))
    assert needs_files < {path.stem for path in files}
    for path in files:
        overrides = [f"data.data_dir={tmp_path}"] if path.stem in needs_files else []
        if path.stem == "cifar10_dirichlet":  # 100 clients under Dir(0.1) need CIFAR's 50,000 samples
            overrides.append("federated.num_clients=20")
        validate_experiment(load_experiment(path, overrides))
    assert "warning" not in capsys.readouterr().err  # no deprecated key in a shipped experiment

"""Failures that must not pass as success: a NaN loss, a round in which every client failed, a NaN model.

Each stops the run with ``fedsim: error: ...`` and exit code 1; what was computed before (metrics,
checkpoint) stays on disk and no ``summary.json`` is written. Simulated stragglers and dropouts are
faults the user asked for: recorded, never fatal. The faults here are keyed by the epoch the task
is told (a client's epoch is offset by the rounds before), never by timing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedsim.checkpoint import load_checkpoint
from fedsim.cli import main
from fedsim.config import load_experiment
from fedsim.engines.common import RunContext
from fedsim.engines.federated.engine import run_federated
from fedsim.engines.federated.rounds import (
    NO_REPLY,
    check_global_model,
    check_round_had_replies,
    short_reason,
)
from fedsim.errors import RunFailedError
from fedsim.results import RunDir
from fedsim.tasks import Batch, ExtraLoss, Optimizers, TaskContext
from tests.helpers.tiny_task import TinyTask

HERE = "tests.test_failures"


class ExplodingTask(TinyTask):
    """A finite loss in the first epoch, NaN from the second on (a diverging run, deterministically)."""

    def loss(self, model: nn.Module, batch: Batch, context: TaskContext | None = None) -> torch.Tensor:
        loss = super().loss(model, batch)
        return loss * float("nan") if context is not None and context.epoch >= 1 else loss


class RaisingTask(TinyTask):
    """Trains in the first round (local epoch index 0) and raises from the second round on."""

    def loss(self, model: nn.Module, batch: Batch, context: TaskContext | None = None) -> torch.Tensor:
        if context is not None and context.epoch >= 1:
            raise RuntimeError(f"the client's disk is full (epoch index {context.epoch})")
        return super().loss(model, batch)


class PoisonTask(TinyTask):
    """Reports a finite loss but leaves infinite weights from the second round on (a NaN global model)."""

    def train_step(self, model: nn.Module, batch: Batch, optimizers: Optimizers, extra_loss: ExtraLoss | None = None,
                   *, context: TaskContext) -> dict[str, float]:
        metrics = super().train_step(model, batch, optimizers, extra_loss, context=context)
        if context.epoch >= 1:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.fill_(float("inf"))
        return metrics


def experiment(tmp_path: Path, task: str, mode: str, **federated: Any) -> Path:
    fed = {"engine": "local", "num_clients": 4, "clients_per_round": 3, "rounds": 3, "local_epochs": 1, **federated}
    fed_toml = ", ".join(f"{k} = {json.dumps(v)}" for k, v in fed.items())
    path = tmp_path / "exp.toml"
    path.write_text(f'''name = "failures"
task = "{HERE}:{task}"
mode = "{mode}"
task_options = {{ hidden = 8 }}
train = {{ epochs = 3, lr = 0.2, batch_size = 32, threads = 1, progress = false }}
federated = {{ {fed_toml} }}

[[runs]]
name = "run"
''')
    return path


def cli(path: Path, out: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> tuple[int, str]:
    args = ["run", str(path), "--out", str(out)]
    for override in overrides:
        args += ["--set", override]
    code = main(args)
    return code, capsys.readouterr().err


def test_nan_loss_stops_a_central_run_keeping_the_good_epochs(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "out" / "failures" / "run"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text('{"metrics": {"accuracy": 0.97}}')  # an earlier run's, now stale
    code, err = cli(experiment(tmp_path, "ExplodingTask", "central"), tmp_path / "out", capsys)
    assert code == 1, err
    assert "fedsim: error: the training loss became nan at step" in err and "(epoch 2)" in err
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    assert records[0]["train_loss"] == pytest.approx(records[0]["train_loss"])  # finite, not NaN
    assert load_checkpoint(folder / "checkpoint.pt")["epoch"] == 1
    assert not (folder / "summary.json").exists()


def check_stopped_in_round_2(code: int, err: str, folder: Path) -> None:
    assert code == 1, err
    line = next(line for line in err.splitlines() if line.startswith("fedsim: error:"))
    assert "federated round 2: no client update to aggregate: 3 of 3 sampled clients failed" in line
    assert "RuntimeError: the client's disk is full (epoch index 1)" in line
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1]
    assert len(records[1]["aggregated"]) == 3 and records[1]["failed"] == []
    assert load_checkpoint(folder / "checkpoint.pt")["round"] == 1
    assert not (folder / "summary.json").exists()


def test_round_in_which_every_client_raises_stops_a_local_run(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, err = cli(experiment(tmp_path, "RaisingTask", "federated"), tmp_path / "out", capsys)
    check_stopped_in_round_2(code, err, tmp_path / "out" / "failures" / "run")


@pytest.mark.slow
def test_round_in_which_every_client_raises_stops_a_flower_simulation(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, err = cli(experiment(tmp_path, "RaisingTask", "federated"), tmp_path / "out", capsys,
                    "federated.engine=flower")
    check_stopped_in_round_2(code, err, tmp_path / "out" / "failures" / "run")


def test_nan_global_model_stops_a_federated_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # one local step per round: the poisoned step is the client's last, its reported loss stays finite
    code, err = cli(experiment(tmp_path, "PoisonTask", "federated", local_steps=1), tmp_path / "out", capsys)
    folder = tmp_path / "out" / "failures" / "run"
    assert code == 1, err
    assert "fedsim: error: federated round 2: the global model's test loss is nan after aggregating 3" in err
    assert [json.loads(line)["round"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert not (folder / "summary.json").exists()


@pytest.mark.parametrize("fault", ["straggler_fraction", "dropout_fraction"])
def test_rounds_of_simulated_faults_only_do_not_stop_the_run(tmp_path: Path, fault: str) -> None:
    """Every sampled client a straggler (or a simulated dropout): recorded, the model carries over.

    Loading an experiment file rejects fractions that leave no reply in any round; a config built in
    code (or ``flwr run`` on fewer SuperNodes than the experiment's clients) can still get there.
    """
    run = load_experiment(experiment(tmp_path, "TinyTask", "federated", rounds=2)).runs[0]
    run = dataclasses.replace(run, federated=dataclasses.replace(run.federated, **{fault: 1.0}))
    summary = run_federated(run, RunContext(out=RunDir(tmp_path / "out")))
    assert (tmp_path / "out" / "summary.json").exists()
    kept = "stragglers" if fault == "straggler_fraction" else "dropouts"
    for record in summary["history"][1:]:
        assert record["aggregated"] == [] and len(record[kept]) == 3
    accuracies = {record["test_accuracy"] for record in summary["history"]}
    assert len(accuracies) == 1  # nothing aggregated: the initial model throughout


def test_the_rule_of_a_round_with_nothing_to_aggregate() -> None:
    sampled = [1, 4, 7]
    dropped = "<class 'fedsim.engines.federated.flower_app.SimulatedDropout'>:<'client 1 dropped out (simulated)'>"
    # only the faults the user asked for: not fatal
    check_round_had_replies(3, sampled, {1: dropped, 4: dropped}, dropouts=[1, 4], stragglers=[7])
    check_round_had_replies(3, sampled, {}, dropouts=[], stragglers=sampled)
    # one real failure among them: fatal, with the counts and the first real error
    with pytest.raises(RunFailedError) as caught:
        check_round_had_replies(3, sampled, {1: dropped, 4: "<class 'ValueError'>:<'empty partition'>", 7: NO_REPLY},
                                dropouts=[1], stragglers=[])
    message = str(caught.value)
    assert message.startswith("federated round 3: no client update to aggregate: 2 of 3 sampled clients failed "
                              "(1 with an error reply, 1 did not reply, 1 simulated dropout(s))")
    assert message.endswith("first error (client 4): ValueError: empty partition")
    assert caught.value.exit_code == 1


def test_short_reason_and_the_global_model_check() -> None:
    assert short_reason("<class 'a.b.Boom'>:<'bad\nthings'>") == "Boom: bad"
    ray = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m\n"
           "  File \"task.py\", line 5, in loss\n    raise ValueError(\"x\")\nValueError: empty partition\n\n"
           "The above exception was the direct cause of the following exception:\n\nray::ClientAppActor.run()\n"
           "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. Message: x'>")
    assert short_reason(ray) == "ValueError: empty partition"
    assert short_reason("Traceback...\n  line 3") == "Traceback..."
    assert len(short_reason("x" * 1000)) == 300
    check_global_model(2, {"accuracy": 0.1, "loss": 2.3}, 3)
    for value in (float("nan"), float("inf")):
        with pytest.raises(RunFailedError, match=f"round 2: the global model's test loss is {value}"):
            check_global_model(2, {"accuracy": 0.1, "loss": value}, 3)

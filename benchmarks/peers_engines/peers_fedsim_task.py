"""fedsim_run: the peers workload's model as a fedsim task (fedsim's own ClientApp and strategies).

``DigitsCNNTask`` is ``peers_workload.DigitsCNN`` on fedsim's digits data with cross-entropy and test
accuracy. The parent (``benchmarks/peers.py``) makes the workload from this task's own data split,
partition, client sampling, batch orders and seeded initial weights, so that ``fedsim run`` on it
computes the FedAvg every other engine replays. With ``--vectorise`` (the ``fedsim_vec`` engine) the run
trains each round's clients at once (``federated.vectorise``), which the task allows by defining
``output_loss`` and ``vectorisable``.

Usage (fedsim's venv): python peers_fedsim_task.py WORKLOAD.npz OUT.json [--vectorise]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: federated_engines
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_workload as pw  # noqa: E402

from fedsim.data import DataInfo  # noqa: E402
from fedsim.tasks import Task  # noqa: E402
from fedsim.tasks.part_a import classification_metrics  # noqa: E402

TASK_REF = "peers_fedsim_task:DigitsCNNTask"


class DigitsCNNTask(Task):
    name = "peers_digits_cnn"
    description = "the peers benchmark's DigitsCNN (25,730 parameters) on digits"

    def build_model(self, info: DataInfo) -> nn.Module:
        return pw.DigitsCNN()

    vectorisable = True  # one architecture, a plain loss: clients may train at once (federated.vectorise)

    def output_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(output, target)

    def evaluate(self, model: nn.Module, dataset: Any, batch_size: int = 512) -> dict[str, float]:
        return classification_metrics(model, dataset, batch_size)


def run_config(clients: int, per_round: int, rounds: int, seed: int, vectorise: bool = False) -> Any:
    """fedsim's run of the workload: federated_engines' run (local engine, FedAvg, IID, 1 epoch, batch 32,
    1 thread) with this task and the workload's learning rate, evaluating one client at the end."""
    import argparse
    import dataclasses

    from federated_engines import run_config as engines_run_config

    args = argparse.Namespace(task=TASK_REF, clients=clients, per_round=per_round, rounds=rounds, lr=pw.LR,
                              seed=seed)
    run = engines_run_config(args, "local")
    # The other engines score only the global model on the test set: fedsim's final evaluation on the
    # clients' held-out data (default: up to 1000 clients) is cut to the smallest cohort it allows.
    return dataclasses.replace(run, federated=dataclasses.replace(run.federated, evaluate_clients=1, vectorise=vectorise))


def main(workload: str, out: str, vectorise: bool = False) -> None:
    import numpy as np

    torch.set_num_threads(1)
    from fedsim.engines.common import RunContext
    from fedsim.engines.federated.engine import run_federated
    from fedsim.results import RunDir

    clients, per_round, rounds, seed = (int(v) for v in np.load(workload)["meta"])
    rec = pw.Recorder()

    class TimedRunDir(RunDir):
        """Each round's record is written right after the round ends: its accuracy and time."""

        def log(self, record: dict[str, Any]) -> None:
            if record.get("round", 0) >= 1:
                if rec.first_call_epoch is None:  # round 1 started when its first client was called
                    rec.first_call_epoch = time.time() - float(record["round_time_s"])
                rec.accuracy.append(float(record["test_accuracy"]))  # the server-side test evaluation
                rec.round_times.append(float(record["round_time_s"]))
            super().log(record)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run_federated(run_config(clients, per_round, rounds, seed, vectorise), RunContext(out=TimedRunDir(tmp)))
    pw.write_result(out, rec)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], vectorise="--vectorise" in sys.argv[3:])

"""fedsim_run: the peers workload's model as a fedsim task (fedsim's own ClientApp and strategies).

``DigitsCNNTask`` is ``peers_workload.DigitsCNN`` on fedsim's digits data with cross-entropy and test
accuracy. The parent (``benchmarks/peers.py``) makes the workload from this task's own data split,
partition, client sampling, batch orders and seeded initial weights, so that ``fedsim run`` on it
computes the FedAvg every other engine replays.

Usage (fedsim's venv): python peers_fedsim_task.py WORKLOAD.npz OUT.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_workload as pw  # noqa: E402

from fedsim.data import DataInfo  # noqa: E402
from fedsim.tasks import Task, eval_loader, move_batch  # noqa: E402

TASK_REF = "peers_fedsim_task:DigitsCNNTask"


class DigitsCNNTask(Task):
    name = "peers_digits_cnn"
    description = "the peers benchmark's DigitsCNN (25,730 parameters) on digits"

    def build_model(self, info: DataInfo) -> nn.Module:
        return pw.DigitsCNN()

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Any, batch_size: int = 512) -> dict[str, float]:
        correct, total = 0, 0
        for batch in eval_loader(dataset, batch_size):
            x, y = move_batch(batch, model)
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
        return {"accuracy": correct / total}


def run_config(clients: int, per_round: int, rounds: int, seed: int) -> Any:
    """fedsim's run of the workload: local engine, FedAvg, IID, 1 epoch, batch 32, SGD lr 0.1, 1 thread."""
    from fedsim.config import RunConfig, from_dict

    return from_dict(RunConfig, {
        "name": "peers", "task": TASK_REF, "mode": "federated",
        "train": {"threads": 1, "progress": False, "checkpoint": False, "lr": pw.LR, "batch_size": pw.BATCH,
                  "seed": seed},
        "federated": {"engine": "local", "num_clients": clients, "clients_per_round": per_round, "rounds": rounds,
                      "local_epochs": pw.LOCAL_EPOCHS, "strategy": "fedavg", "partition": "iid"},
    })


def main(workload: str, out: str) -> None:
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
        run_federated(run_config(clients, per_round, rounds, seed), RunContext(out=TimedRunDir(tmp)))
    pw.write_result(out, rec)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

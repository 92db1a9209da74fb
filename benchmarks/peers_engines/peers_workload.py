"""Torch-only workload shared by every peer engine (no fedsim, no sklearn: the peers' venvs lack them).

The parent (``benchmarks/peers.py``, fedsim's venv) writes one ``.npz`` with the digits split, each
client's training indices, the per-round sampling schedule, each sampled client's batch order and
the initial weights of ``DigitsCNN``. Every engine loads it with :class:`Workload`, so all of them
compute the same FedAvg up to float summation order. Engines report through :func:`write_result`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn

LR, BATCH, LOCAL_EPOCHS = 0.1, 32, 1


class DigitsCNN(nn.Module):
    """8x8 digits CNN without BatchNorm: conv 1->16, conv 16->32, 2x2 pool, fc 512->40->10 (25,730 parameters).

    Takes flat 64-feature rows, so every engine can hand it the same tensors.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 40)
        self.fc2 = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8)
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class Workload:
    """The ``.npz`` the parent wrote: data, partition, schedule, batch orders, initial weights."""

    def __init__(self, path: str) -> None:
        z = np.load(path)
        self.z = z
        self.clients, self.per_round, self.rounds, self.seed = (int(v) for v in z["meta"])
        self.x_train, self.y_train = torch.from_numpy(z["x_train"]), torch.from_numpy(z["y_train"])
        self.x_test, self.y_test = torch.from_numpy(z["x_test"]), torch.from_numpy(z["y_test"])
        self.sizes = z["sizes"]  # each client's number of training examples
        self._init_keys = [k for k in z.files if k.startswith("init/")]

    def sampled(self, server_round: int) -> list[int]:
        return [int(c) for c in self.z[f"sampled_{server_round}"]]

    def order(self, server_round: int, cid: int) -> torch.Tensor:
        """Client ``cid``'s training indices (into x_train) in this round's batch order."""
        return torch.from_numpy(self.z[f"order_{server_round}_{cid}"])

    def part(self, cid: int) -> torch.Tensor:
        return torch.from_numpy(self.z[f"part_{cid}"])

    def init_state(self) -> dict[str, torch.Tensor]:
        return {k[len("init/"):]: torch.from_numpy(self.z[k]) for k in self._init_keys}

    def model(self) -> DigitsCNN:
        model = DigitsCNN()
        model.load_state_dict(self.init_state())
        return model


_CACHE: dict[str, Workload] = {}


def load(path: str) -> Workload:
    """One :class:`Workload` per path and process (Flower's ClientApp is called once per client)."""
    if path not in _CACHE:
        _CACHE[path] = Workload(path)
    return _CACHE[path]


def train_client(model: nn.Module, w: Workload, server_round: int, cid: int) -> int:
    """The reference local training: 1 epoch of SGD (lr 0.1, batch 32) in the scheduled order."""
    order = w.order(server_round, cid)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    for start in range(0, len(order), BATCH):
        batch = order[start:start + BATCH]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(w.x_train[batch]), w.y_train[batch]).backward()
        optimizer.step()
    return len(order)


@torch.no_grad()
def accuracy(model: nn.Module, w: Workload) -> float:
    """Server-side test accuracy, the same code for every engine."""
    model.eval()
    return (model(w.x_test).argmax(1) == w.y_test).float().mean().item()


class Recorder:
    """Per-round accuracy and time, and the wall-clock time of the first client call."""

    def __init__(self) -> None:
        self.accuracy: list[float] = []
        self.round_times: list[float] = []
        self.first_call_epoch: float | None = None
        self._round_start: float | None = None

    def client_called(self, epoch: float | None = None) -> None:
        if self.first_call_epoch is None:
            self.first_call_epoch = time.time() if epoch is None else epoch

    def round_start(self) -> None:
        self._round_start = time.perf_counter()

    def round_end(self, acc: float) -> None:
        assert self._round_start is not None
        self.round_times.append(time.perf_counter() - self._round_start)
        self.accuracy.append(acc)
        self._round_start = time.perf_counter()


def write_result(path: str, rec: Recorder, model: nn.Module | None = None, **extra: Any) -> None:
    """Write the run's record to ``path`` (JSON) and the final global weights next to it (``.npz``).

    ``model``'s state_dict keys may carry an engine's wrapper prefix (``net.``); they are stripped.
    """
    if model is not None:
        state = {k.split("net.", 1)[-1] if k.startswith("net.") else k: v.detach().cpu().numpy()
                 for k, v in model.state_dict().items()}
        np.savez(os.path.splitext(path)[0] + ".npz", **state)
    data = {"accuracy": rec.accuracy, "round_times": rec.round_times, "first_call_epoch": rec.first_call_epoch,
            "end_epoch": time.time(), "pid": os.getpid(), **extra}
    with open(path, "w") as fh:
        json.dump(data, fh)

"""FLGo 'direct' task config: one Dataset per client plus the server's test set, from the workload.

``flgo.gen_direct_task_from_file`` copies this file into the task folder as config.py, so it finds
the shared module and the workload through PEERS_ENGINES_DIR and PEERS_WORKLOAD.
"""

import os
import sys

import torch
import torch.utils.data as tud

sys.path.insert(0, os.environ["PEERS_ENGINES_DIR"])
import peers_workload as pw  # noqa: E402

_w = pw.load(os.environ["PEERS_WORKLOAD"])
train_data = [tud.TensorDataset(_w.x_train[_w.part(c)], _w.y_train[_w.part(c)]) for c in range(_w.clients)]
test_data = tud.TensorDataset(_w.x_test, _w.y_test)
val_data = None


def data_to_device(batch_data, device):  # type: ignore[no-untyped-def]
    return [t.to(device) for t in batch_data]


def compute_loss(model, batch_data, device):  # type: ignore[no-untyped-def]  # FLGo calls (model, data, device)
    x, y = data_to_device(batch_data, device)
    return {"loss": torch.nn.functional.cross_entropy(model(x), y)}


@torch.no_grad()
def eval(model, data_loader, device):  # type: ignore[no-untyped-def]
    correct = total = 0
    for x, y in data_loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return {"accuracy": correct / total}


def get_model():  # type: ignore[no-untyped-def]  # the toolkit's default; flgo_engine passes its own
    return _w.model()

"""BlazeFL 2.0.3 (Python 3.11): FedAvg on the workload. Usage: python blazefl_engine.py WORKLOAD.npz OUT.json

BlazeFL has no run loop: this is the driver of its README (sample -> downlink -> local_process ->
uplink -> load) with the serial ``FedAvgBaseClientTrainer``. Knobs: ``sample_clients`` replays the
schedule (default: sorted random sample); ``get_dataloader`` serves the round's batch order;
``TQDM_DISABLE=1``. BlazeFL 3.0 needs Python 3.14 (and renames ``if_stop`` to ``is_stopped``).
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_workload as pw  # noqa: E402


def main(workload: str, out: str) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    from blazefl.contrib.fedavg import FedAvgBaseClientTrainer, FedAvgBaseServerHandler, FedAvgPartitionType
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    w = pw.load(workload)
    rec = pw.Recorder()
    current = [1]

    class Models:  # ModelSelector protocol
        def select_model(self, name: str) -> torch.nn.Module:
            return w.model()

    class Data:  # PartitionedDataset protocol: this round's batch order
        def get_dataloader(self, type_, cid, batch_size, generator):  # type: ignore[no-untyped-def]
            if type_ == FedAvgPartitionType.TEST:
                return DataLoader(TensorDataset(w.x_test, w.y_test), batch_size=512)
            rec.client_called()
            order = w.order(current[0], cid)
            return DataLoader(TensorDataset(w.x_train[order], w.y_train[order]), batch_size=batch_size,
                              shuffle=False)

    class Server(FedAvgBaseServerHandler):
        def sample_clients(self) -> list[int]:
            return w.sampled(self.round + 1)

    server = Server(Models(), "cnn", Data(), global_round=w.rounds, num_clients=w.clients,
                    sample_ratio=w.per_round / w.clients, device="cpu", batch_size=512, seed=0)
    trainer = FedAvgBaseClientTrainer(Models(), "cnn", Data(), device="cpu", num_clients=w.clients,
                                      epochs=pw.LOCAL_EPOCHS, batch_size=pw.BATCH, lr=pw.LR, seed=0)
    rec.round_start()
    while not server.if_stop():  # 3.0: server.is_stopped()
        current[0] = server.round + 1
        cids = server.sample_clients()
        trainer.local_process(server.downlink_package(), cids)
        for pack in trainer.uplink_package():
            server.load(pack)
        rec.round_end(pw.accuracy(server.model, w))
    pw.write_result(out, rec, server.model)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

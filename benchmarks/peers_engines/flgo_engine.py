"""FLGo 0.4.4: FedAvg on the workload (own venv). Usage: python flgo_engine.py WORKLOAD.npz OUT.json

Knobs: a 'direct' task built from flgo_task_config.py in a temporary folder (FLGo imports it as a
package named by its path relative to the cwd, so the child chdirs there); ``Server.sample`` replays
the schedule; ``Client.train`` sets the round's batch order (the direct toolkit's loader does not
shuffle); ``train_holdout=0`` (default 0.1 drops data), ``aggregate='other'`` (n_k / sum n = FedAvg),
``num_epochs=1``, ``batch_size=32``; a Logger that only computes the test accuracy; a clean sys.argv
(``flgo.init`` parses it).
"""

import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers_workload as pw  # noqa: E402


def main(workload: str, out: str) -> None:
    warnings.filterwarnings("ignore")  # pynvml's FutureWarning on import
    workload, out = os.path.abspath(workload), os.path.abspath(out)
    os.environ["PEERS_WORKLOAD"], os.environ["PEERS_ENGINES_DIR"] = workload, str(HERE)
    import flgo
    import flgo.algorithm.fedbase as fedbase
    from flgo.experiment.logger import BasicLogger
    from flgo.utils.fmodule import FModule

    w = pw.load(workload)
    rec = pw.Recorder()
    work = tempfile.mkdtemp(prefix="peers-flgo-")
    try:
        os.chdir(work)
        sys.path.insert(0, work)
        task = "peers_task"
        flgo.gen_direct_task_from_file(task, str(HERE / "flgo_task_config.py"), target_path=work, overwrite=True)

        class Net(FModule):  # FLGo builds models with Net() when aggregating
            def __init__(self) -> None:
                super().__init__()
                self.net = w.model()

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net(x)

        class ModelSpec:  # what flgo.init(model=...) expects
            __name__ = "cnn"

            @staticmethod
            def init_global_module(obj):  # type: ignore[no-untyped-def]
                if "Server" in obj.__class__.__name__:
                    obj.model = Net().to(obj.device)

        current = [1]

        class PeersServer(fedbase.BasicServer):
            def sample(self):  # type: ignore[no-untyped-def]
                current[0] = self.current_round
                return w.sampled(self.current_round)

        class PeersClient(fedbase.BasicClient):
            def train(self, model):  # type: ignore[no-untyped-def]
                rec.client_called()
                order = w.order(current[0], self.id)
                self.train_data = torch.utils.data.TensorDataset(w.x_train[order], w.y_train[order])
                return super().train(model)

        class fedavg:  # noqa: N801 - an FLGo "algorithm" is anything with Server and Client
            __name__ = "fedavg"
            Server, Client = PeersServer, PeersClient

        class Report(BasicLogger):
            def initialize(self):  # type: ignore[no-untyped-def]
                self.started = False

            def log_once(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                if not self.started:  # server.run() logs the initial model first
                    self.started = True
                    rec.round_start()
                    return
                rec.round_end(pw.accuracy(self.coordinator.model.net, w))

        option = {"num_rounds": w.rounds, "proportion": w.per_round / w.clients, "num_epochs": pw.LOCAL_EPOCHS,
                  "num_steps": -1, "batch_size": pw.BATCH, "learning_rate": pw.LR, "optimizer": "SGD",
                  "momentum": 0.0, "weight_decay": 0.0, "aggregate": "other", "train_holdout": 0.0,
                  "test_holdout": 0.0, "seed": 0, "dataseed": 0, "gpu": [], "num_parallels": 1,
                  "torch_num_threads": 1, "no_tqdm": True, "log_level": "WARNING", "eval_interval": 1,
                  "learning_rate_decay": 1.0, "lr_scheduler": "-1"}
        sys.argv = sys.argv[:1]  # flgo.init parses sys.argv
        runner = flgo.init(task, fedavg, option=option, model=ModelSpec, Logger=Report)
        runner.run()
    finally:
        os.chdir("/")
        shutil.rmtree(work, ignore_errors=True)
    pw.write_result(out, rec, runner.model)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

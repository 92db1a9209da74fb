"""pfl 0.6: FedAvg on the workload (own venv). Usage: python pfl_engine.py WORKLOAD.npz OUT.json

Knobs that make pfl compute the bare loop's FedAvg (see benchmarks/peers.py's docstring):
the user sampler replays the schedule with user id (round, cid), so the dataset hands out that
round's batch order (pfl's Dataset slices in stored order); torch tensors (numpy labels would be cast
to float32); ``WeightByDatapoints`` (the default is a uniform mean); central SGD lr 1.0 (w + mean of
deltas); no per-user before/after evaluation; test accuracy in a callback.
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_workload as pw  # noqa: E402


def main(workload: str, out: str) -> None:
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    torch.set_num_threads(1)
    np.random.seed(0)
    w = pw.load(workload)
    rec = pw.Recorder()

    class Net(torch.nn.Module):  # pfl wants .loss(*data) and .metrics(*data) on the module
        def __init__(self) -> None:
            super().__init__()
            self.net = w.model()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:
            self.eval() if eval else self.train()
            return torch.nn.functional.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict:
            self.eval()
            logits = self(x)
            return {"loss": Weighted(torch.nn.functional.cross_entropy(logits, y, reduction="sum").item(), len(y)),
                    "accuracy": Weighted((logits.argmax(1) == y).sum().item(), len(y))}

    schedule = iter([(r, c) for r in range(1, w.rounds + 1) for c in w.sampled(r)])

    def make_dataset(uid: tuple[int, int]) -> Dataset:
        rec.client_called()
        order = w.order(*uid)
        return Dataset((w.x_train[order], w.y_train[order]), user_id=uid)

    train_fed = FederatedDataset(make_dataset, user_sampler=lambda: next(schedule))

    class NoUserEvalFedAvg(FederatedAveraging):
        """FedAvg without pfl's per-user evaluation before and after training."""

        def simulate_one_user(self, model, user_dataset, central_context):  # type: ignore[no-untyped-def]
            self._initial_model_state = model.get_parameters(self._initial_model_state)
            stats, metrics = self.train_one_user(self._initial_model_state, model, user_dataset, central_context)
            model.set_parameters(self._initial_model_state)
            return stats, metrics

    class Report(TrainingProcessCallback):
        def on_train_begin(self, *, model):  # type: ignore[no-untyped-def]
            rec.round_start()
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):  # type: ignore[no-untyped-def]
            rec.round_end(pw.accuracy(model.pytorch_model.net, w))
            return False, Metrics()

    net = Net()
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    backend = SimulatedBackend(training_data=train_fed, val_data=None, postprocessors=[WeightByDatapoints()])
    NoUserEvalFedAvg().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=w.rounds, evaluation_frequency=1,
                                           train_cohort_size=w.per_round, val_cohort_size=0),
        backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_batch_size=pw.BATCH, local_num_epochs=pw.LOCAL_EPOCHS,
                                              local_learning_rate=pw.LR),
        model_eval_params=NNEvalHyperParams(local_batch_size=512), callbacks=[Report()],
        send_metrics_to_platform=False)
    pw.write_result(out, rec, net)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

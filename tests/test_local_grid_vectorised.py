"""Vectorised clients (torch.func) give the same updates as sequential training (tolerance 1e-5)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fedsim.config import RunConfig, TrainConfig, from_dict
from fedsim.data import load_dataset
from fedsim.engines.federated.local.vectorised import has_batch_coupling, train_clients
from fedsim.errors import UnsupportedError
from fedsim.tasks import TaskContext, make_task
from fedsim.train import TrainState, fit, make_loader, seed_everything
from tests.helpers.tiny_task import TinyTask


class VectorisableTiny(TinyTask):
    vectorisable = True


def sequential(task, model, start, indices, train, dataset, epochs, seeds):
    """The shared loop, one client after the other (what the ClientApp does)."""
    out = []
    for idx, seed in zip(indices, seeds, strict=True):
        model.load_state_dict(start)
        state = TrainState(model, task.build_optimizers(model, train))
        history = fit(task, state, dataclasses.replace(train, epochs=epochs),
                      lambda e, idx=idx, seed=seed: make_loader(dataset, train.batch_size, seed, e, True, indices=idx),
                      context=TaskContext(), show_progress=False)
        out.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, history[-1]["train_loss"]))
    return out


@pytest.mark.parametrize("task_name", ["tiny", "bn_cnn"])
def test_vectorised_clients_match_sequential_training(task_name: str) -> None:
    torch.set_num_threads(1)
    task = VectorisableTiny() if task_name == "tiny" else make_task("bn_cnn")
    split = task.prepare_data(load_dataset("digits"))
    seed_everything(0)
    model = task.build_model(split.info)
    assert has_batch_coupling(model) == (task_name == "bn_cnn")  # padding vs grouping by batch size
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train = TrainConfig(lr=0.05, momentum=0.5, weight_decay=1e-3, batch_size=16, progress=False)
    # Unequal clients: 13..61 samples, so batch counts and last-batch sizes differ.
    indices = [list(range(k, 1200, 7))[: 13 + 12 * k] for k in range(5)]
    seeds = [100 + k for k in range(5)]
    epochs = 2
    client_epochs = [[list(make_loader(split.train, 16, seed, e, True, indices=idx)) for e in range(epochs)]
                     for idx, seed in zip(indices, seeds, strict=True)]
    vectorised = train_clients(task, model, start, client_epochs, train)
    reference = sequential(task, model, start, indices, train, split.train, epochs, seeds)
    for result, (state, loss) in zip(vectorised, reference, strict=True):
        assert result.state.keys() == state.keys()
        worst = max(float((result.state[k].double() - state[k].double()).abs().max()) for k in state)
        assert worst < 1e-5, f"vectorised vs sequential: {worst:.3g}"
        assert result.epoch_losses[-1] == pytest.approx(loss, abs=1e-5)
        moved = max(float((result.state[k].double() - start[k].double()).abs().max()) for k in state)
        assert moved > 1e-3  # they trained
    assert [r.samples for r in vectorised] == [epochs * len(i) for i in indices]


def test_vectorised_refuses_what_it_cannot_reproduce() -> None:
    task = make_task("bn_cnn")
    split = task.prepare_data(load_dataset("digits"))
    model = task.build_model(split.info)
    with pytest.raises(UnsupportedError, match="SGD"):
        train_clients(task, model, model.state_dict(), [[[]]], TrainConfig(optimizer="adam"))
    with pytest.raises(UnsupportedError, match="BatchNorm"):
        train_clients(task, model, model.state_dict(), [[[]]], TrainConfig(), pad=True)
    with pytest.raises(UnsupportedError, match="vectorised"):
        train_clients(TinyTask(), model, model.state_dict(), [[[]]], TrainConfig())


@pytest.mark.slow
def test_vectorised_fedsim_clients_through_the_local_grid(tmp_path: Path) -> None:
    from fedsim.engines.federated.flower_app import FederatedJob, clientapp, make_server_app
    from fedsim.engines.federated.local.grid import run_local
    from fedsim.results import RunDir

    run = from_dict(RunConfig, {"name": "vec", "task": "bn_cnn", "mode": "federated",
                                "train": {"threads": 1, "progress": False, "checkpoint": False, "momentum": 0.9},
                                "federated": {"engine": "local", "num_clients": 8, "clients_per_round": 4,
                                              "rounds": 2, "local_epochs": 2}})
    finals, grids = {}, {}
    for vectorise in (False, True):
        job = FederatedJob(run, RunDir(tmp_path / str(vectorise)))
        run_local(make_server_app(job), clientapp, 8, seed=0, vectorise=vectorise, client_threads=1,
                  grid_hook=lambda grid, v=vectorise: grids.__setitem__(v, grid))
        assert job.error is None, job.error
        finals[vectorise] = job.result["model"].state_dict()
    assert grids[True].executor.batches == 2  # both rounds' training went through the vectorised path
    worst = max(float((finals[True][k].double() - finals[False][k].double()).abs().max()) for k in finals[True])
    assert worst < 1e-5, f"vectorised vs sequential clients through the grid: {worst:.3g}"

"""The task contract: engines tell a task where it runs through a TaskContext (never by setting
attributes), forward and loss are separable, and a user task that overrides only ``loss`` still runs
where it can and is refused with a message where it cannot."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import fedsim
from fedsim.config import TrainConfig
from fedsim.engines.common import load_task_data, prepare
from fedsim.engines.federated.local.vectorised import train_clients
from fedsim.errors import UnsupportedError
from fedsim.tasks import Task, TaskContext, make_task
from fedsim.train import fit, make_loader
from tests.helpers.recording_mae import read_masks
from tests.helpers.tiny_task import LossOnlyTask

LOSS_ONLY = "tests.helpers.tiny_task:LossOnlyTask"
RECORDING_MAE = "tests.helpers.recording_mae:RecordingMAETask"
QUIET = {"progress": False, "checkpoint": False, "threads": 1}
SMALL_MAE = {"embed_dim": 16, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
             "decoder_num_heads": 2, "probe_epochs": 1, "finetune_epochs": 0, "mask_seed": 3}


# ---- the context ---------------------------------------------------------------------------------------
def test_tasks_hold_no_engine_state() -> None:
    """Nothing an engine used to set on a task (epoch, out_dir) exists on it any more."""
    task = make_task("mae")
    assert not hasattr(task, "epoch") and not hasattr(task, "out_dir")


def test_the_loop_hands_each_epoch_its_context() -> None:
    seen: list[TaskContext] = []

    class Spy(Task):
        def train_step(self, model, batch, optimizers, extra_loss=None, *, context: TaskContext):  # type: ignore[no-untyped-def]
            seen.append(context)
            return {"loss": 0.0}

    model = torch.nn.Linear(2, 1)
    from fedsim.train import TrainState

    state = TrainState(model, {"model": torch.optim.SGD(model.parameters(), lr=0.1)})
    base = TaskContext(run_dir=Path("/somewhere"), rank=3, world_size=4)
    batches = [(torch.zeros(2, 2), torch.zeros(2))]
    fit(Spy(), state, TrainConfig(epochs=3, progress=False), lambda epoch: batches, context=base, epoch_offset=10)
    assert [c.epoch for c in seen] == [10, 11, 12]
    assert {(c.run_dir, c.rank, c.world_size) for c in seen} == {(Path("/somewhere"), 3, 4)}


def test_fit_requires_a_context() -> None:
    """An engine cannot forget to tell the task where it is: ``context`` has no default."""
    with pytest.raises(TypeError, match="context"):
        fit(make_task("bn_cnn"), None, TrainConfig(), lambda epoch: [])  # type: ignore[arg-type, call-arg]


# ---- forward and loss are separable ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["exam_net", "linear_ae", "bn_cnn", "dual_head_vit", "mae"])
def test_builtin_losses_are_forward_then_output_loss(name: str) -> None:
    run = fedsim.config.experiment_from_dict({"task": name, "train": {"dtype": "float64"}}).runs[0]
    prepared = prepare(run)
    task, model = prepared.task, prepared.state.model
    batch = tuple(t[:6] for t in prepared.split.train.tensors)
    batch = (batch[0].double() if batch[0].is_floating_point() else batch[0], batch[1])
    context = TaskContext(epoch=2)
    torch.manual_seed(0)
    composed = task.output_loss(model(*task.model_inputs(model, batch, context)), batch[1])
    torch.manual_seed(0)
    assert task.has_separable_loss()
    assert torch.equal(composed, task.loss(model, batch, context=context))


def test_a_loss_only_task_is_refused_where_the_loss_must_be_split() -> None:
    task = LossOnlyTask()
    assert not task.has_separable_loss()
    for capability in ("pipeline", "vectorise"):
        with pytest.raises(UnsupportedError, match="overrides Task.loss only.*output_loss"):
            task.require(capability)
    run = fedsim.config.experiment_from_dict({"task": LOSS_ONLY}).runs[0]
    _, split = load_task_data(run)
    model = task.build_model(split.info)
    with pytest.raises(UnsupportedError, match="overrides Task.loss only"):
        train_clients(task, model, model.state_dict(), [[[]]], TrainConfig())


def test_the_pipeline_mode_refuses_a_loss_only_task_before_starting(tmp_path: Path) -> None:
    """Refused when the pipeline plans its split, before any process starts."""
    with pytest.raises(UnsupportedError, match="overrides Task.loss only"):
        fedsim.run({"task": LOSS_ONLY, "mode": "pipeline", "train": QUIET}, out=tmp_path, quiet=True)


@pytest.mark.parametrize("mode", ["central", "federated"])
def test_a_loss_only_task_trains_central_and_federated(tmp_path: Path, mode: str) -> None:
    config = {"task": LOSS_ONLY, "mode": mode, "train": {**QUIET, "epochs": 2},
              "federated": {"engine": "local", "num_clients": 4, "rounds": 2, "clients_per_round": 2}}
    summary = fedsim.run(config, out=tmp_path, quiet=True)[0]
    assert summary["metrics"]["accuracy"] > 0.5  # digits, 10 classes: it learned
    # Its legacy loss(model, batch) is called with context= and the wrapper drops it.
    task = LossOnlyTask()
    model = task.build_model(load_task_data(fedsim.config.experiment_from_dict({"task": LOSS_ONLY}).runs[0])[1].info)
    batch = (torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.long))
    assert torch.equal(task.loss(model, batch, context=TaskContext(epoch=5)), task.loss(model, batch))


# ---- engines hand the run folder to the task's figures -------------------------------------------------------
def test_a_federated_gan_run_writes_its_sample_grid(tmp_path: Path) -> None:
    config = {"name": "fedgan", "task": "gan", "mode": "federated", "train": {**QUIET, "batch_size": 64},
              "federated": {"engine": "local", "num_clients": 2, "rounds": 1}}
    summary = fedsim.run(config, out=tmp_path, quiet=True)[0]
    assert summary["metrics"]["fake_judged_real"] >= 0.0
    grid = tmp_path / "fedgan" / "fedgan" / "samples.png"
    assert grid.is_file() and grid.stat().st_size > 1000


def test_a_federated_mae_run_writes_its_reconstructions(tmp_path: Path) -> None:
    config = {"name": "fedmae", "task": "mae", "mode": "federated", "train": {**QUIET, "batch_size": 64},
              "task_options": {**SMALL_MAE, "plot_images": 4},
              "federated": {"engine": "local", "num_clients": 2, "rounds": 1}}
    summary = fedsim.run(config, out=tmp_path, quiet=True)[0]
    assert "probe_accuracy" in summary["metrics"]
    picture = tmp_path / "fedmae" / "fedmae" / "reconstructions.png"
    assert picture.is_file() and picture.stat().st_size > 1000


# ---- MAE masks under every engine ------------------------------------------------------------------------------
def _mae_run(mode: str, record_dir: Path, **sections: object) -> dict:
    record_dir.mkdir(parents=True, exist_ok=True)
    return {"name": mode, "task": RECORDING_MAE, "mode": mode,
            "task_options": {**SMALL_MAE, "record_dir": str(record_dir)},
            "train": {**QUIET, "epochs": 2, "batch_size": 64, "shuffle": True}, **sections}


def _assert_new_masks_each_epoch(masks: dict[tuple[int, int], list[int]]) -> None:
    samples = {s for s, _ in masks}
    assert {e for _, e in masks} == {0, 1}
    assert all((s, 0) in masks and (s, 1) in masks for s in samples)
    changed = sum(masks[(s, 0)] != masks[(s, 1)] for s in samples)
    # 16 patches, 12 masked: two draws agree with probability 1/1820 per sample.
    assert changed >= 0.99 * len(samples)


def test_central_masks_change_every_epoch(tmp_path: Path) -> None:
    fedsim.run(_mae_run("central", tmp_path / "central"), out=tmp_path / "out", quiet=True)
    masks = read_masks(tmp_path / "central")
    assert len({s for s, _ in masks}) == 1437  # every training sample, each epoch
    _assert_new_masks_each_epoch(masks)


@pytest.mark.slow
def test_parameter_server_masks_change_every_epoch_and_equal_central(tmp_path: Path) -> None:
    """The bug this guards against: parameter-server workers never advanced the epoch, so MAE masks
    repeated every epoch. Now each batch's context carries its epoch, and a worker draws exactly
    the central run's mask for the same (seed, sample, epoch)."""
    fedsim.run(_mae_run("central", tmp_path / "central"), out=tmp_path / "out", quiet=True)
    ps = _mae_run("parameter_server", tmp_path / "ps",
                  parameter_server={"variant": "sync", "workers": 2, "steps": 0, "ray_num_cpus": 2})
    ps["train"] = {**ps["train"], "batch_size": 32}  # 2 workers x 32 = the central batch of 64
    fedsim.run(ps, out=tmp_path / "out", quiet=True)
    central, server = read_masks(tmp_path / "central"), read_masks(tmp_path / "ps")
    _assert_new_masks_each_epoch(server)
    assert set(server) == set(central)
    assert all(server[key] == central[key] for key in central)


def test_user_tasks_written_before_contexts_keep_their_signatures() -> None:
    """``final_metrics(model, split)`` and ``train_step(model, batch, optimizers)`` overrides without a
    context parameter are called with ``context=`` by engines; the base class adapts them."""

    class Old(LossOnlyTask):
        def final_metrics(self, model, split):  # type: ignore[no-untyped-def, override]
            return {"old": 1.0}

        def train_step(self, model, batch, optimizers, extra_loss=None):  # type: ignore[no-untyped-def, override]
            return {"loss": 2.0}

    task = Old()
    assert task.final_metrics(None, None, context=TaskContext()) == {"old": 1.0}
    assert task.train_step(None, None, None, context=TaskContext()) == {"loss": 2.0}
    model = torch.nn.Linear(1, 1)
    from fedsim.train import TrainState

    state = TrainState(copy.deepcopy(model), {"model": torch.optim.SGD(model.parameters(), lr=0.1)})
    history = fit(task, state, TrainConfig(epochs=1, progress=False), lambda epoch: make_loader(
        torch.utils.data.TensorDataset(torch.zeros(4, 1), torch.zeros(4)), 2, 0, epoch), context=TaskContext())
    assert history[0]["train_loss"] == 2.0


def test_a_static_legacy_loss_is_adapted_too() -> None:
    class Static(LossOnlyTask):
        @staticmethod
        def loss(model, batch):  # type: ignore[no-untyped-def, override]
            return torch.tensor(3.0)

    assert Static().loss(None, None, context=TaskContext()) == 3.0
    assert Static.loss(None, None) == 3.0

"""The benchmark-model tasks (``femnist_cnn``, ``shakespeare_lstm``, ``cifar_cnn``, ``resnet18_gn``):
published parameter counts, shapes, a few training steps centrally and federated on stand-in data,
and the capabilities each claims (pipeline split plans, vectorised clients == sequential ones)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fedsim
from fedsim.config import RunConfig, TrainConfig, experiment_from_dict, from_dict
from fedsim.data import DataInfo, load_dataset
from fedsim.engines.common import build_model, load_task_data
from fedsim.engines.federated.local.vectorised import has_batch_coupling, train_clients
from fedsim.engines.parallel.pipeline import probe_boundaries
from fedsim.engines.parallel.pipeline_split import make_pieces, plan_split
from fedsim.errors import ConfigError, FedsimError, UnsupportedError
from fedsim.models.benchmark import CharLSTM, count_parameters
from fedsim.tasks import TASKS, TaskContext, make_task
from fedsim.tasks.benchmark import load_cifar10_standin, load_femnist_standin, load_shakespeare_standin
from fedsim.train import TrainState, fit, make_loader, seed_everything

BENCHMARK = ("femnist_cnn", "shakespeare_lstm", "cifar_cnn", "resnet18_gn")
FEMNIST_INFO = DataInfo("femnist", (1, 28, 28), 62)
SHAKESPEARE_INFO = DataInfo("shakespeare", (80,), 80)
CIFAR_INFO = DataInfo("cifar10", (3, 32, 32), 10)
INFO = {"femnist_cnn": FEMNIST_INFO, "shakespeare_lstm": SHAKESPEARE_INFO, "cifar_cnn": CIFAR_INFO,
        "resnet18_gn": CIFAR_INFO}
# Stand-in data for the runs: the synthetic data set shaped like the real one, or the task's default.
RUN_DATA: dict[str, dict[str, Any]] = {
    "femnist_cnn": {"name": "synthetic", "options": {"shape": [1, 28, 28], "num_classes": 62, "n_samples": 400}},
    "shakespeare_lstm": {"options": {"n_samples": 200}},  # default: fedsim.tasks.benchmark:load_shakespeare_standin
    "cifar_cnn": {"name": "synthetic", "options": {"shape": [3, 32, 32], "num_classes": 10, "n_samples": 200}},
    "resnet18_gn": {"options": {"n_samples": 60}, "test_fraction": 0.25},  # default: load_cifar10_standin
}
QUIET = {"progress": False, "checkpoint": False, "threads": 1}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def batch_for(name: str, n: int, generator: torch.Generator, side: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A generated batch of the task's input shape (tokens for the LSTM)."""
    info = INFO[name]
    if name == "shakespeare_lstm":
        x = torch.randint(0, 80, (n, 80), generator=generator)
    else:
        c, s, _ = info.input_shape
        s = side or s
        x = torch.randn(n, c, s, s, generator=generator)
    return x, torch.randint(0, info.num_classes, (n,), generator=generator)


# ---- the published architectures ------------------------------------------------------------------
def test_the_tasks_are_registered_with_honest_capabilities() -> None:
    for name in BENCHMARK:
        task = make_task(name)
        assert name in TASKS and task.name == name and task.primary_metric == "accuracy"
        assert task.supports_data_parallel and task.pipeline_split_points and task.has_separable_loss()
    assert [make_task(n).vectorisable for n in BENCHMARK] == [True, False, True, True]


@pytest.mark.parametrize(("name", "options", "info", "total", "children"), [
    # LEAF FEMNIST CNN: 832 + 51,264 + 6,424,576 + 127,038.
    ("femnist_cnn", {}, FEMNIST_INFO, 6_603_710, {"conv1": 832, "conv2": 51_264, "fc": 6_424_576, "head": 127_038}),
    # McMahan et al.'s MNIST CNN: the same with FC 512 and 10 classes.
    ("femnist_cnn", {"hidden": 512}, DataInfo("mnist", (1, 28, 28), 10), 1_663_370,
     {"conv1": 832, "conv2": 51_264, "fc": 1_606_144, "head": 5_130}),
    # LEAF Shakespeare LSTM, torch's two biases per gate.
    ("shakespeare_lstm", {}, SHAKESPEARE_INFO, 819_920,
     {"embed": 640, "lstm1": 272_384, "lstm2": 526_336, "head": 20_560}),
    # PyTorch tutorial CIFAR-10 CNN.
    ("cifar_cnn", {}, CIFAR_INFO, 62_006, {"conv1": 456, "conv2": 2_416, "fc1": 48_120, "fc2": 10_164, "head": 850}),
    # CIFAR ResNet-18 (GroupNorm has BatchNorm's affine parameters).
    ("resnet18_gn", {}, CIFAR_INFO, 11_173_962,
     {"stem": 1_856, "layer1": 147_968, "layer2": 525_568, "layer3": 2_099_712, "layer4": 8_393_728, "pool": 0,
      "head": 5_130}),
])
def test_parameter_counts_match_the_published_architectures(name: str, options: dict, info: DataInfo, total: int,
                                                             children: dict[str, int]) -> None:
    model = make_task(name, options).build_model(info)
    assert count_parameters(model) == total
    assert {n: count_parameters(c) for n, c in model.named_children()} == children


def test_the_groupnorm_resnet_has_no_batch_coupling_and_groups_do_not_change_the_count() -> None:
    model = make_task("resnet18_gn").build_model(CIFAR_INFO)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 20 and {m.num_groups for m in norms} == {2}  # 17 convs + 3 shortcut norms
    assert not has_batch_coupling(model) and not list(model.buffers())
    assert count_parameters(make_task("resnet18_gn", {"groups": 32}).build_model(CIFAR_INFO)) == 11_173_962
    with pytest.raises(ConfigError, match="groups"):
        make_task("resnet18_gn", {"groups": 3})


def test_stacked_lstm_layers_compute_torchs_two_layer_lstm() -> None:
    """lstm1 -> lstm2 (separate children, so the pipeline can cut between them) is nn.LSTM(num_layers=2)."""
    model = CharLSTM()
    reference = nn.LSTM(8, 256, num_layers=2, batch_first=True)
    assert count_parameters(reference) == 272_384 + 526_336
    with torch.no_grad():
        for layer in (0, 1):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(reference, f"{kind}_l{layer}").copy_(getattr(getattr(model, f"lstm{layer + 1}"), f"{kind}_l0"))
    tokens = torch.randint(0, 80, (3, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.head(reference(model.embed(tokens))[0])
        assert torch.allclose(model(tokens), expected, atol=1e-6)


# ---- shapes and a few steps -------------------------------------------------------------------------
@pytest.mark.parametrize("name", BENCHMARK)
def test_output_shapes_and_a_few_sgd_steps_lower_the_loss(name: str) -> None:
    task = make_task(name)
    seed_everything(0)
    model = task.build_model(INFO[name])
    x, y = batch_for(name, 8 if name != "resnet18_gn" else 4, torch.Generator().manual_seed(1))
    assert model(x).shape == (len(x), INFO[name].num_classes)
    train = TrainConfig(lr=0.05 if name != "resnet18_gn" else 0.001)  # 0.01 overshoots on 4 samples
    optimizers = task.build_optimizers(model, train)
    losses = [task.train_step(model, (x, y), optimizers, context=TaskContext())["loss"] for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses


# ---- the default data: offline stand-ins of the real shapes ---------------------------------------
def test_default_datasets_are_offline_standins_of_the_right_shape() -> None:
    for name, loader, shape, classes in (("femnist_cnn", load_femnist_standin, (1, 28, 28), 62),
                                         ("cifar_cnn", load_cifar10_standin, (3, 32, 32), 10),
                                         ("resnet18_gn", load_cifar10_standin, (3, 32, 32), 10),
                                         ("shakespeare_lstm", load_shakespeare_standin, (80,), 80)):
        task = make_task(name)
        assert task.default_dataset.endswith(f":{loader.__name__}")
        split = load_dataset(task.default_dataset, test_fraction=0.2, split_seed=0, n_samples=400)
        x, y = split.train.tensors
        assert split.info.input_shape == shape and tuple(x.shape[1:]) == shape and split.info.num_classes == classes
        assert split.info.name.endswith("_standin")
        assert len(split.train) + len(split.test) == 400 and int(y.max()) < classes
        assert x.dtype == (torch.int64 if name == "shakespeare_lstm" else torch.float32)


def test_the_shakespeare_standin_is_deterministic_learnable_and_split_without_overlap() -> None:
    a = load_shakespeare_standin(0.25, split_seed=3, n_samples=400)
    b = load_shakespeare_standin(0.25, split_seed=3, n_samples=400)
    assert all(torch.equal(s, t) for s, t in zip(a.train.tensors + a.test.tensors, b.train.tensors + b.test.tensors,
                                                   strict=True))
    assert (len(a.train), len(a.test)) == (300, 100)
    x, y = a.train.tensors
    assert torch.equal(x[1:, -1], y[:-1]) and torch.equal(x[1:, :-1], x[:-1, 1:])  # windows of one stream
    # The next symbol mostly follows from the last one: the most frequent successor wins often.
    pairs = torch.stack([x[:, -1], y], 1)
    best = sum(int(torch.bincount(pairs[pairs[:, 0] == s, 1]).max()) for s in pairs[:, 0].unique())
    assert best / len(y) > 0.4
    big = load_shakespeare_standin(0.2, 0, n_samples=4000)
    assert len(torch.cat([big.train.tensors[1], big.test.tensors[1]]).unique()) == 80  # every symbol occurs
    with pytest.raises(FedsimError, match="integer token windows"):
        make_task("shakespeare_lstm").prepare_data(load_dataset("digits"))


# ---- central and federated runs -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["central", "federated"])
@pytest.mark.parametrize("name", BENCHMARK)
def test_each_task_trains_central_and_federated_on_standin_data(tmp_path: Path, name: str, mode: str) -> None:
    config = {"name": name, "task": name, "mode": mode, "data": RUN_DATA[name],
              "federated": {"engine": "local", "num_clients": 4, "clients_per_round": 2, "rounds": 2},
              "train": {"epochs": 1, "batch_size": 8, "max_steps": 1 if name == "resnet18_gn" else 2, **QUIET}}
    (summary,) = fedsim.run(config, out=tmp_path, quiet=True)
    metrics = summary["metrics"]
    assert summary["primary_metric"] == "accuracy" and 0.0 <= metrics["accuracy"] <= 1.0
    assert math.isfinite(metrics["loss"])
    if mode == "federated":
        assert [h["round"] for h in summary["history"]] == [0, 1, 2]
        assert metrics["failed_client_rounds"] == 0 and metrics["samples_total"] > 0
    # The model moved away from the seeded initial weights every engine starts from.
    run = experiment_from_dict(config).runs[0]
    task, split = load_task_data(run)
    start = build_model(task, split, run, torch.device("cpu")).state_dict()
    final = summary["model"].state_dict()
    assert final.keys() == start.keys()
    assert max(float((final[k] - start[k]).abs().max()) for k in start) > 1e-4


# ---- capabilities: pipeline split plans -------------------------------------------------------------------
def pipeline_run(name: str, stages: int) -> RunConfig:
    return from_dict(RunConfig, {"task": name, "mode": "pipeline", "pipeline": {"stages": stages},
                                 "data": RUN_DATA[name], "train": {"progress": False}})


@pytest.mark.parametrize("name", BENCHMARK)
def test_every_split_point_cuts_into_pieces_that_pass_plain_tensors(name: str) -> None:
    task = make_task(name)
    points = task.pipeline_split_points
    run = pipeline_run(name, len(points) + 1)
    task, split = load_task_data(run)
    model = build_model(task, split, run, torch.device("cpu"))
    plan = plan_split(model, task, run)
    assert plan.split_points == points and sum(plan.params) == count_parameters(model)
    x, _ = batch_for(name, 4, torch.Generator().manual_seed(2))
    boundaries = probe_boundaries(model, plan, (x,))
    # One plain tensor per cut, contiguous (point-to-point sends between ranks need that).
    assert all(len(b) == 1 and isinstance(b[0], torch.Tensor) and b[0].is_contiguous() for b in boundaries)
    assert boundaries[0][0].dtype == x.dtype and boundaries[-1][0].shape == (4, split.info.num_classes)
    state = x
    for piece in make_pieces(model, plan):
        state = piece(state)
    assert torch.equal(state, model(x))
    # Two stages: a balanced cut exists.
    two = plan_split(model, task, pipeline_run(name, 2))
    assert two.pieces == 2 and min(two.params) > 0


def test_balanced_two_stage_cuts() -> None:
    """Hand-computed from the per-child counts: the cut minimising the larger piece."""
    expected = {"femnist_cnn": (("head",), (6_476_672, 127_038)),
                "shakespeare_lstm": (("lstm2",), (273_024, 546_896)),
                "cifar_cnn": (("fc2",), (50_992, 11_014)),
                "resnet18_gn": (("layer4",), (2_775_104, 8_398_858))}
    for name, (cut, params) in expected.items():
        run = pipeline_run(name, 2)
        task, split = load_task_data(run)
        plan = plan_split(build_model(task, split, run, torch.device("cpu")), task, run)
        assert (plan.split_points, plan.params) == (cut, params), name


# ---- capabilities: vectorised clients ----------------------------------------------------------------------
def sequential(task, model, start, indices, train, dataset, seeds):  # type: ignore[no-untyped-def]
    """The shared loop, one client after the other (what the ClientApp does)."""
    out = []
    for idx, seed in zip(indices, seeds, strict=True):
        model.load_state_dict(start)
        state = TrainState(model, task.build_optimizers(model, train))
        history = fit(task, state, train,
                      lambda e, idx=idx, seed=seed: make_loader(dataset, train.batch_size, seed, e, True, indices=idx),
                      context=TaskContext(), show_progress=False)
        out.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, history[-1]["train_loss"]))
    return out


@pytest.mark.parametrize("name", ["femnist_cnn", "cifar_cnn", "resnet18_gn"])
def test_vectorised_clients_match_sequential_training(name: str) -> None:
    """Unequal clients (5 and 7 samples, batch 4: padded last batches), momentum, float64."""
    task = make_task(name)
    assert task.vectorisable
    side = 16 if name == "resnet18_gn" else None  # ResNet pools globally: the same network, 4x fewer pixels
    x, y = batch_for(name, 12, torch.Generator().manual_seed(3), side=side)
    dataset = TensorDataset(x.double(), y)
    seed_everything(0)
    model = task.build_model(INFO[name]).double()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train = TrainConfig(lr=0.05, momentum=0.5, batch_size=4, epochs=1, progress=False)
    indices, seeds = [list(range(0, 5)), list(range(5, 12))], [11, 12]
    client_epochs = [[list(make_loader(dataset, 4, seed, 0, True, indices=idx))]
                     for idx, seed in zip(indices, seeds, strict=True)]
    vectorised = train_clients(task, model, start, client_epochs, train)
    reference = sequential(task, model, start, indices, train, dataset, seeds)
    for result, (state, loss) in zip(vectorised, reference, strict=True):
        assert result.state.keys() == state.keys()
        worst = max(float((result.state[k] - state[k]).abs().max()) for k in state)
        assert worst < 1e-9, f"vectorised vs sequential: {worst:.3g}"
        assert result.epoch_losses[-1] == pytest.approx(loss, rel=1e-9)
        assert max(float((result.state[k] - start[k]).abs().max()) for k in state) > 1e-4  # they trained
    assert [r.samples for r in vectorised] == [5, 7]


def test_the_lstm_is_refused_by_the_vectorised_engine() -> None:
    task = make_task("shakespeare_lstm")
    model = task.build_model(SHAKESPEARE_INFO)
    with pytest.raises(UnsupportedError, match="cannot train vectorised clients"):
        train_clients(task, model, model.state_dict(), [[[]]], TrainConfig())


def test_options_are_checked_when_the_task_is_made() -> None:
    with pytest.raises(ConfigError, match="channels"):
        make_task("femnist_cnn", {"channels": [32]})
    with pytest.raises(ConfigError, match="hidden"):
        make_task("cifar_cnn", {"hidden": [120, 0]})
    with pytest.raises(ConfigError, match="layers"):
        make_task("shakespeare_lstm", {"layers": 0})
    assert make_task("shakespeare_lstm", {"layers": 3}).pipeline_split_points == ("lstm1", "lstm2", "lstm3", "head")
    with pytest.raises(FedsimError, match="square images"):
        make_task("cifar_cnn").build_model(DataInfo("vectors", (64,), 10))
    small = dataclasses.replace(CIFAR_INFO, input_shape=(3, 8, 8))
    with pytest.raises(FedsimError, match="at least 14x14"):
        make_task("cifar_cnn").build_model(small)


# ---- a real pipeline (torchrun, 2 ranks) --------------------------------------------------------------------
@pytest.mark.slow
def test_the_lstm_trains_pipelined_on_two_ranks(tmp_path: Path) -> None:
    """Int64 tokens into the first stage, [N, T, 256] between the LSTM layers, the loss on the last."""
    config = {"name": "pipe", "task": "shakespeare_lstm", "mode": "pipeline", "data": RUN_DATA["shakespeare_lstm"],
              "pipeline": {"stages": 2, "microbatches": 2, "schedule": "gpipe"},
              "train": {"epochs": 1, "batch_size": 8, "max_steps": 2, "device": "cpu", **QUIET}}
    (summary,) = fedsim.run(config, out=tmp_path, quiet=True)
    assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0 and math.isfinite(summary["metrics"]["loss"])

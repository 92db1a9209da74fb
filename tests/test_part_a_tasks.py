"""Part-A tasks: data views, losses, capabilities, and the properties that need training.

Training goes through the real central engine (``fedsim.run``) or, for the GAN's five ring seeds,
through the one training loop (:func:`fedsim.train.fit`) fed with tensor-sliced batches.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

import fedsim
from fedsim.config import TrainConfig, experiment_from_dict, load_experiment
from fedsim.data import load_dataset
from fedsim.engines.common import load_task_data, prepare
from fedsim.errors import ConfigError, UnsupportedError
from fedsim.models.part_a import GAN, DualHeadViT
from fedsim.tasks import TASKS, TaskContext, make_task
from fedsim.tasks.part_a import ATTRIBUTES, DualHeadViTTask, GANTask, long_tail_profile
from fedsim.train import epoch_permutation, fit

PART_A = ("exam_net", "linear_ae", "bn_cnn", "gan", "dual_head_vit")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _run(tmp_path: Path, task: str, train: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """One central run through ``fedsim.run``; returns its summary (with the in-memory model)."""
    config = {"name": "t", "task": task, "mode": "central",
              "train": {"progress": False, "checkpoint": False, "threads": 1, **train}, **extra}
    (summary,) = fedsim.run(config, out=tmp_path, quiet=True)
    return summary


# ---- registry and capabilities -----------------------------------------------------------------
def test_every_part_a_task_is_registered_and_builds(digits) -> None:
    for name in PART_A:
        task = make_task(name)
        assert task.name == name and name in TASKS
        split = task.prepare_data(digits)
        model = task.build_model(split.info)
        x, y = split.train.tensors
        assert len(split.train.tensors) == 2 and x.shape[0] == y.shape[0]
        if name != "gan":
            loss = task.loss(model, (x[:8], y[:8]))
            assert loss.dim() == 0 and torch.isfinite(loss)
        metrics = task.evaluate(model.eval(), split.test)
        assert metrics and all(math.isfinite(v) for v in metrics.values())
        assert task.primary_metric in metrics


def test_stack_tasks_cut_at_existing_children_in_forward_order(digits) -> None:
    for name, minimum in (("exam_net", 1), ("linear_ae", 1), ("bn_cnn", 4), ("dual_head_vit", 4)):
        task = make_task(name)
        split = task.prepare_data(digits)
        model = task.build_model(split.info).eval()
        children = [n for n, _ in model.named_children()]
        points = task.pipeline_split_points
        assert len(points) >= minimum and set(points) <= set(children)
        assert [children.index(p) for p in points] == sorted(children.index(p) for p in points)
        assert children.index(points[0]) > 0
        x = split.test.tensors[0][:4]
        h = x
        for child in model.children():
            h = child(h)
        torch.testing.assert_close(model(x), h)
    assert make_task("exam_net").pipeline_split_points == ("output",)
    with pytest.raises(UnsupportedError, match="two players"):
        make_task("gan").require("pipeline")
    with pytest.raises(UnsupportedError, match="data-parallel"):
        make_task("gan").require("data_parallel")
    with pytest.raises(UnsupportedError, match="train_step"):
        make_task("gan").loss(GAN(2), (torch.zeros(1, 2), torch.zeros(1)))


def test_unknown_task_option_names_the_key() -> None:
    with pytest.raises(ConfigError, match="task_options.dropuot"):
        make_task("bn_cnn", {"dropuot": 0.1}, "exp.toml")
    with pytest.raises(ConfigError, match="attributes"):
        make_task("dual_head_vit", {"attributes": ["even", "prime", "ge5", "shiny"]})
    assert make_task("bn_cnn").options.dropout == 0.0
    assert make_task("dual_head_vit").options.dropout == 0.0


# ---- exam_net ---------------------------------------------------------------------------------------
def test_exam_net_data_is_digits_pooled_to_2x2_autoencoded(digits) -> None:
    task = make_task("exam_net")
    split = task.prepare_data(digits)
    x, target = split.train.tensors
    assert x.shape == (len(digits.train), 4) and split.info.input_shape == (4,)
    torch.testing.assert_close(target, x)
    # Top-left input = mean of the top-left 4x4 block of the (normalised) image.
    torch.testing.assert_close(x[:, 0], digits.train.tensors[0][:, 0, :4, :4].mean(dim=(1, 2)))


def test_exam_net_task_step_reproduces_the_exam_numbers() -> None:
    task = make_task("exam_net")
    model = task.build_model(task.prepare_data(load_dataset("digits")).info).double()
    optimizers = task.build_optimizers(model, TrainConfig(optimizer="sgd", lr=0.5))
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    metrics = task.train_step(model, (x, x.clone()), optimizers, context=TaskContext())
    assert metrics["loss"] == 3.0  # batch of one: the batch mean is the exam's sum of squared errors
    assert model.hidden.weight.tolist() == [[0.25, 1.0, 0.25, 0.25]] * 2
    assert model.output.weight.tolist() == [[0.625, 0.625], [-0.125, -0.125], [0.625, 0.625], [0.625, 0.625]]


# ---- linear_ae --------------------------------------------------------------------------------------
def test_linear_autoencoder_recovers_the_pca_subspace(tmp_path) -> None:
    train = {"epochs": 80, "batch_size": 64, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "schedule": "cosine"}
    summary = _run(tmp_path, "linear_ae", train)
    run = experiment_from_dict({"task": "linear_ae"}).runs[0]
    _, split = load_task_data(run)
    x = split.train.tensors[0].double().numpy()
    assert np.abs(x.mean(axis=0)).max() < 1e-5  # centred
    pca = PCA(n_components=8).fit(x)
    decoder = summary["model"].decoder.weight.detach().double().numpy()  # [64, 8]
    angles = np.degrees(subspace_angles(decoder, pca.components_.T))
    print("principal angles (deg):", np.round(np.sort(angles)[::-1], 3))
    assert angles.max() < 5.0
    # Its reconstruction error is PCA's: the variance left outside the top-8 components.
    residual = pca.inverse_transform(pca.transform(x)) - x
    assert summary["metrics"]["train_loss"] == pytest.approx(float((residual**2).sum(axis=1).mean()), rel=0.02)


# ---- bn_cnn -----------------------------------------------------------------------------------------
def test_bn_cnn_reaches_95_percent_on_digits(tmp_path) -> None:
    summary = _run(tmp_path, "bn_cnn", {"epochs": 5, "batch_size": 32, "optimizer": "adam", "lr": 0.003})
    print("bn_cnn test accuracy:", summary["metrics"]["accuracy"])
    assert summary["metrics"]["accuracy"] >= 0.95


def test_bn_cnn_trains_vectorised_like_one_client_at_a_time(digits) -> None:
    # vectorisable = True: BatchNorm in training mode under vmap(functional_call) with per-client
    # buffers gives the same parameters and running statistics as sequential steps.
    from fedsim.engines.federated.local.vectorised import train_clients

    task = make_task("bn_cnn")
    assert task.vectorisable
    torch.manual_seed(0)
    model = task.build_model(digits.info)
    x, y = digits.train.tensors
    clients = [[[(x[k * 48 + i * 16: k * 48 + (i + 1) * 16], y[k * 48 + i * 16: k * 48 + (i + 1) * 16])
                 for i in range(3)]] for k in range(2)]
    start = copy.deepcopy(model.state_dict())
    train = TrainConfig(optimizer="sgd", lr=0.05)
    results = train_clients(task, model, start, clients, train)
    for k in range(2):
        sequential = copy.deepcopy(model)
        sequential.load_state_dict(start)
        sequential.train()
        optimizers = task.build_optimizers(sequential, train)
        for batch in clients[k][0]:
            task.train_step(sequential, batch, optimizers, context=TaskContext())
        for name, value in sequential.state_dict().items():
            torch.testing.assert_close(results[k].state[name].to(value.dtype), value, atol=1e-5, rtol=0)


# ---- gan ----------------------------------------------------------------------------------------------
def test_gan_step_alternates_discriminator_then_generator() -> None:
    # Prepare: a task, a model and plain SGD for both players; a copy stepped by hand.
    task = GANTask()
    torch.manual_seed(0)
    model = GAN(2, latent_dim=3, hidden=8).double()
    by_hand = copy.deepcopy(model)
    optimizers = task.build_optimizers(model, TrainConfig(optimizer="sgd", lr=0.1))
    real = torch.randn(6, 2, dtype=torch.float64)
    torch.manual_seed(1)
    task.train_step(model, (real, torch.zeros(6)), optimizers, context=TaskContext())
    # Execute by hand: D on (real, detached G(z1)); then G on -log D(G(z2)) with the *updated* D.
    torch.manual_seed(1)
    z1 = by_hand.noise(6)
    d_loss = by_hand.discriminator_loss(real, by_hand.generator(z1).detach())
    d_grads = torch.autograd.grad(d_loss, list(by_hand.discriminator.parameters()))
    with torch.no_grad():
        for p, g in zip(by_hand.discriminator.parameters(), d_grads, strict=True):
            p -= 0.1 * g
    z2 = by_hand.noise(6)
    g_loss = by_hand.generator_loss(by_hand.generator(z2))
    g_grads = torch.autograd.grad(g_loss, list(by_hand.generator.parameters()))
    with torch.no_grad():
        for p, g in zip(by_hand.generator.parameters(), g_grads, strict=True):
            p -= 0.1 * g
    # Assert: same parameters; the discriminator is trainable again afterwards.
    for (name, a), b in zip(model.state_dict().items(), by_hand.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=name)
    assert all(p.requires_grad for p in model.parameters())


def _fit_with_tensor_batches(config: dict[str, Any]) -> Any:
    """The shared loop over tensor-sliced batches in the (seed, epoch) order (no per-sample loader)."""
    run = experiment_from_dict(config).runs[0]
    prepared = prepare(run)
    x, y = prepared.split.train.tensors

    def batches(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(epoch_permutation(len(x), run.train.seed, epoch))
        return [(x[i], y[i]) for i in order.split(run.train.batch_size)]

    fit(prepared.task, prepared.state, run.train, batches, context=TaskContext(), show_progress=False)
    return prepared


def test_gan_covers_the_ring_of_eight_gaussians() -> None:
    # 5 seeds x 1,600 steps (25 epochs of 64 batches of 250); sigma = 0.05, radius 2.
    counts = []
    for seed in range(5):
        prepared = _fit_with_tensor_batches({
            "task": "gan",
            "data": {"name": "fedsim.tasks.part_a:load_ring_split", "options": {"n_samples": 20000}},
            "train": {"epochs": 25, "batch_size": 250, "optimizer": "adam", "lr": 0.001, "seed": seed,
                      "progress": False, "checkpoint": False},
        })
        metrics = prepared.task.evaluate(prepared.state.model.eval(), prepared.split.test)
        counts.append(int(metrics["modes_covered"]))
    print("modes covered per seed (0..4):", counts)
    assert sum(c >= 6 for c in counts) >= 3, counts


def test_gan_on_digits_writes_a_png_grid(tmp_path) -> None:
    summary = _run(tmp_path, "gan", {"epochs": 3, "batch_size": 64, "optimizer": "adam", "lr": 0.001})
    png = tmp_path / "t" / "t" / "samples.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] > 50 and image.shape[1] > 50
    metrics = summary["metrics"]
    assert {"d_loss", "g_loss", "real_judged_real", "fake_judged_real"} <= set(metrics)
    assert 0.0 <= metrics["fake_judged_real"] <= 1.0


# ---- dual_head_vit -------------------------------------------------------------------------------------
def test_long_tailed_digits_with_attribute_targets(digits) -> None:
    task = DualHeadViTTask()
    split = task.prepare_data(digits)
    x, target = split.train.tensors
    assert target.shape == (len(x), 1 + 4) and target.dtype == torch.float32
    y = target[:, 0].long()
    counts = torch.bincount(y, minlength=10)
    assert counts[0] / counts[9] == pytest.approx(20, rel=0.1)
    assert torch.all(counts[:-1] >= counts[1:])  # class 0 is the head, class 9 the tail
    torch.testing.assert_close(counts.double() / counts[0], torch.as_tensor(long_tail_profile(10, 20.0)),
                               atol=0.02, rtol=0)
    for j, name in enumerate(task.options.attributes):
        expected = torch.tensor([float(int(c) in ATTRIBUTES[name]) for c in y])
        torch.testing.assert_close(target[:, 1 + j], expected)
    test_counts = torch.bincount(split.test.tensors[1][:, 0].long(), minlength=10)
    assert int(test_counts.max() - test_counts.min()) <= 2  # the test split stays (stratified) balanced
    # Weights: inverse frequency (class 9 gets 20x the weight of class 0), mean sample weight 1.
    w = task.class_weights(10)
    assert float(w[9] / w[0]) == pytest.approx(20.0)
    profile = torch.as_tensor(long_tail_profile(10, 20.0), dtype=torch.float32)
    assert float((profile * w).sum() / profile.sum()) == pytest.approx(1.0)
    assert torch.all(task.pos_weights(10) > 0)


def test_dual_head_vit_loss_and_metrics_by_hand(digits) -> None:
    task = DualHeadViTTask()
    split = task.prepare_data(digits)
    torch.manual_seed(0)
    model = task.build_model(split.info)
    assert isinstance(model, DualHeadViT)
    x, target = split.train.tensors[0][:16], split.train.tensors[1][:16]
    class_logits, label_logits = model.split(model(x))
    y, labels = target[:, 0].long(), target[:, 1:]
    w, pw = task.class_weights(10), task.pos_weights(10)
    ce = -(w[y] * torch.log_softmax(class_logits, 1).gather(1, y[:, None]).squeeze(1)).mean()
    p = torch.sigmoid(label_logits)
    bce = -(pw * labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).mean()
    torch.testing.assert_close(task.loss(model, (x, target)), ce + bce, atol=1e-5, rtol=1e-5)
    metrics = task.evaluate(model.eval(), split.test)
    assert {"balanced_accuracy", "macro_f1", "label_macro_f1", "label_map", "rare3_recall"} <= set(metrics)


def test_weighting_raises_recall_of_the_three_rarest_classes(tmp_path) -> None:
    # Short cosine-decayed training: weighting matters most before the model interpolates the few
    # rare samples (trained to zero loss, both runs fit them and the gap shrinks).
    train = {"epochs": 20, "batch_size": 32, "optimizer": "adam", "lr": 0.001, "schedule": "cosine", "seed": 0}
    weighted = _run(tmp_path / "w", "dual_head_vit", train)["metrics"]
    plain = _run(tmp_path / "p", "dual_head_vit", train,
                 task_options={"class_weighting": False, "pos_weighting": False})["metrics"]
    print("rare3_recall weighted / unweighted:", weighted["rare3_recall"], plain["rare3_recall"])
    print("balanced_accuracy weighted / unweighted:", weighted["balanced_accuracy"], plain["balanced_accuracy"])
    assert weighted["rare3_recall"] > plain["rare3_recall"]


# ---- the experiment file -----------------------------------------------------------------------------
def test_part_a_experiment_covers_every_task_centrally_and_is_deterministic(tmp_path) -> None:
    experiment = load_experiment(ROOT / "experiments" / "part_a.toml")
    assert {r.task for r in experiment.runs} == set(PART_A)
    assert all(r.mode == "central" for r in experiment.runs)
    assert all((r.data.name or "digits") == "digits" for r in experiment.runs)
    smoke = ["train.epochs=1", "train.max_steps=3", "train.progress=false", "train.threads=1"]
    first = fedsim.run(ROOT / "experiments" / "part_a.toml", overrides=smoke, out=tmp_path / "a", quiet=True)
    second = fedsim.run(ROOT / "experiments" / "part_a.toml", overrides=smoke, out=tmp_path / "b", quiet=True)
    assert [s["metrics"] for s in first] == [s["metrics"] for s in second]
    assert (tmp_path / "a" / "part_a" / "gan" / "samples.png").exists()

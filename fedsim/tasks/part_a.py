"""The five Part-A tasks: ``exam_net``, ``linear_ae``, ``bn_cnn``, ``gan``, ``dual_head_vit``.

Each task adapts the loaded dataset to its own view (``prepare_data``), builds its model from
:mod:`fedsim.models.part_a`, and defines the batch-mean loss and the metrics every engine reports.
The GAN owns its train step (two players, alternating) and so cannot run data-parallel or
pipelined; every other task is a stack of layers with named pipeline cut points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

from fedsim.config import TrainConfig
from fedsim.data import DataInfo, DatasetSplit
from fedsim.errors import ConfigError, FedsimError, UnsupportedError
from fedsim.models.part_a import (
    GAN,
    BNConvNet,
    DualHeadViT,
    ExamNet,
    LinearAutoencoder,
    ring_mode_coverage,
    sample_ring,
)
from fedsim.results import save_figure
from fedsim.tasks import (
    Batch,
    ExtraLoss,
    Optimizers,
    Task,
    TaskContext,
    eval_loader,
    make_optimizer,
    move_batch,
)

__all__ = [
    "ExamNetTask",
    "LinearAETask",
    "BNConvNetTask",
    "GANTask",
    "DualHeadViTTask",
    "load_ring_split",
    "long_tail_profile",
    "ATTRIBUTES",
]


def _tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The two tensors of a ``TensorDataset`` (the convention every loader follows)."""
    if not isinstance(dataset, TensorDataset) or len(dataset.tensors) != 2:
        raise FedsimError(f"expected a TensorDataset(x, y), got {type(dataset).__name__}")
    x, y = dataset.tensors
    return x, y


def _flat_features(info: DataInfo) -> int:
    return int(np.prod(info.input_shape))


# ---------------------------------------------------------------------------------------------
# Autoencoders: ExamNet and the linear autoencoder
# ---------------------------------------------------------------------------------------------


class _ReconstructionTask(Task):
    """Target = input. Loss = per-sample sum of squared errors, averaged over the batch."""

    primary_metric: ClassVar[str] = "recon_mse"
    vectorisable: ClassVar[bool] = True

    def output_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Sum over features matches the exam's "sum of squared errors"; mean over the batch is the
        # convention that makes DDP / microbatch gradient averaging equal a large-batch step.
        return ((output - target) ** 2).sum(dim=1).mean()

    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int = 512) -> dict[str, float]:
        sse, count, features = 0.0, 0, 1
        with torch.no_grad():
            for batch in eval_loader(dataset, batch_size):
                x, target = move_batch(batch, model)
                sse += float(((model(x) - target) ** 2).sum())
                count += x.shape[0]
                features = x.shape[1]
        return {"loss": sse / max(count, 1), "recon_mse": sse / max(count * features, 1)}


def _autoencoding(split: DatasetSplit, x_train: torch.Tensor, x_test: torch.Tensor, name: str) -> DatasetSplit:
    info = DataInfo(name, (x_train.shape[1],), 0)
    return DatasetSplit(TensorDataset(x_train, x_train.clone()), TensorDataset(x_test, x_test.clone()), info)


@dataclass(frozen=True)
class ExamNetOptions:
    """Options of the ``exam_net`` task."""

    hidden: int = 2
    """Hidden units (2 in the exam)."""
    init_value: float = 1.0
    """Every weight starts at this constant (1 in the exam)."""
    random_init: bool = False
    """Ignore ``init_value`` and use PyTorch's random init (breaks the two hidden units' symmetry)."""
    activation_scale: float = 0.25
    """Slope of the linear hidden activation g(x) = scale * x (1/4 in the exam)."""
    pool: int = 2
    """Digits are average-pooled to ``pool x pool`` pixels, giving ``pool^2`` inputs (4 in the exam)."""


class ExamNetTask(_ReconstructionTask):
    """The exam's 4-2-4 linear network as an autoencoder of digits pooled to 2x2 (4 features)."""

    name: ClassVar[str] = "exam_net"
    description: ClassVar[str] = "exam's 4-2-4 net (g(x)=x/4, no bias) autoencoding digits pooled to 2x2"
    Options: ClassVar[type] = ExamNetOptions
    pipeline_split_points: ClassVar[tuple[str, ...]] = ("output",)

    def prepare_data(self, split: DatasetSplit) -> DatasetSplit:
        pool = self.options.pool
        xs = []
        for dataset in (split.train, split.test):
            x, _ = _tensors(dataset)
            if x.dim() != 4:
                raise FedsimError(f"exam_net needs images [N, C, H, W]; dataset '{split.info.name}' gives {tuple(x.shape)}")
            # Average pooling to pool x pool (8x8 digits -> 2x2 = four 4x4 blocks), then flatten.
            xs.append(F.adaptive_avg_pool2d(x.float(), pool).flatten(1))
        return _autoencoding(split, xs[0], xs[1], f"{split.info.name}_pool{pool}x{pool}")

    def build_model(self, info: DataInfo) -> nn.Module:
        o = self.options
        d = _flat_features(info)
        return ExamNet(d, o.hidden, d, init_value=None if o.random_init else o.init_value,
                       activation_scale=o.activation_scale)


@dataclass(frozen=True)
class LinearAEOptions:
    """Options of the ``linear_ae`` task."""

    k: int = 8
    """Code size (the number of principal components it recovers)."""
    bias: bool = False
    """Biases in encoder/decoder (the data are centred, so none are needed)."""


class LinearAETask(_ReconstructionTask):
    """A linear autoencoder on flattened, centred digits; its optimum spans the top-k PCA subspace."""

    name: ClassVar[str] = "linear_ae"
    description: ClassVar[str] = "linear autoencoder (64 -> k -> 64) on centred digits; recovers the PCA subspace"
    Options: ClassVar[type] = LinearAEOptions
    pipeline_split_points: ClassVar[tuple[str, ...]] = ("decoder",)

    def prepare_data(self, split: DatasetSplit) -> DatasetSplit:
        x_train = _tensors(split.train)[0].float().flatten(1)
        x_test = _tensors(split.test)[0].float().flatten(1)
        mean = x_train.mean(dim=0, keepdim=True)  # per-feature mean of the train split only
        return _autoencoding(split, x_train - mean, x_test - mean, f"{split.info.name}_centred")

    def build_model(self, info: DataInfo) -> nn.Module:
        return LinearAutoencoder(_flat_features(info), self.options.k, bias=self.options.bias)


# ---------------------------------------------------------------------------------------------
# Classifier: BNConvNet
# ---------------------------------------------------------------------------------------------


def classification_metrics(model: nn.Module, dataset: Dataset, batch_size: int) -> dict[str, float]:
    """Accuracy and mean cross-entropy of a classifier with integer targets."""
    correct, total, loss = 0, 0, 0.0
    with torch.no_grad():
        for batch in eval_loader(dataset, batch_size):
            x, y = move_batch(batch, model)
            logits = model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            total += y.shape[0]
    return {"accuracy": correct / max(total, 1), "loss": loss / max(total, 1)}


@dataclass(frozen=True)
class BNConvNetOptions:
    """Options of the ``bn_cnn`` task."""

    widths: tuple[int, ...] = (16, 32, 32, 32)
    """Channels of the four conv blocks (about 25k parameters on digits)."""
    dropout: float = 0.0
    """Dropout before the head; 0 keeps runs exactly comparable across engines."""


class BNConvNetTask(Task):
    """A small conv net (conv without bias -> BatchNorm -> ReLU) classifying digits."""

    name: ClassVar[str] = "bn_cnn"
    description: ClassVar[str] = "4-block conv net with BatchNorm (~25k params) classifying digits"
    Options: ClassVar[type] = BNConvNetOptions
    pipeline_split_points: ClassVar[tuple[str, ...]] = ("block2", "block3", "block4", "head")
    # BatchNorm in training mode under torch.func.vmap(functional_call(...)) with batched
    # buffers works (tested in tests/test_part_a_tasks.py): each client keeps its own statistics.
    vectorisable: ClassVar[bool] = True

    def build_model(self, info: DataInfo) -> nn.Module:
        if len(info.input_shape) != 3 or info.input_shape[1] != info.input_shape[2]:
            raise FedsimError(f"bn_cnn needs square images [C, H, W]; dataset '{info.name}' gives {info.input_shape}")
        if len(self.options.widths) != 4:
            raise ConfigError("<task_options>", "task_options.widths", list(self.options.widths), "expected 4 widths")
        c, side, _ = info.input_shape
        return BNConvNet(c, side, info.num_classes, tuple(self.options.widths), dropout=self.options.dropout)

    def output_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int = 512) -> dict[str, float]:
        return classification_metrics(model, dataset, batch_size)


# ---------------------------------------------------------------------------------------------
# GAN
# ---------------------------------------------------------------------------------------------


def load_ring_split(
    test_fraction: float,
    split_seed: int,
    normalise: bool = True,
    n_samples: int = 20000,
    modes: int = 8,
    radius: float = 2.0,
    sigma: float = 0.05,
    **_: object,
) -> DatasetSplit:
    """A ring of ``modes`` 2-D Gaussians as a dataset (``data.name = "fedsim.tasks.part_a:load_ring_split"``).

    ``y`` is the mode index. ``normalise`` is ignored: the points are already centred and of unit
    scale, and standardising them would change ``sigma``, which the coverage metric relies on.
    """
    generator = torch.Generator().manual_seed(split_seed)
    x, mode = sample_ring(n_samples, modes, radius, sigma, generator)
    n_test = int(round(n_samples * test_fraction))
    info = DataInfo("ring", (2,), modes)
    return DatasetSplit(TensorDataset(x[n_test:], mode[n_test:]), TensorDataset(x[:n_test], mode[:n_test]), info)


@dataclass(frozen=True)
class GANOptions:
    """Options of the ``gan`` task."""

    latent_dim: int = 8
    """Size of the generator's noise input."""
    hidden: int = 128
    """Width of both MLPs."""
    g_layers: int = 2
    """Hidden layers of the generator."""
    d_layers: int = 2
    """Hidden layers of the discriminator's feature extractor."""
    beta1: float = 0.5
    """Adam's beta1 for both players when ``train.optimizer = "adam"`` (0.5 is the usual GAN choice)."""
    eval_samples: int = 2000
    """Generated samples scored at each evaluation (drawn from a fixed-seed noise generator)."""
    ring_modes: int = 8
    """Ring geometry for the coverage metric on 2-D data (match the ring loader's options)."""
    ring_radius: float = 2.0
    """Ring radius for the coverage metric."""
    ring_sigma: float = 0.05
    """Mode standard deviation for the coverage metric (a mode is covered when >= 2% of samples lie within 3 sigma)."""
    grid_samples: int = 64
    """Samples in the PNG grid written at the end of a run on image data."""


class GANTask(Task):
    """An MLP GAN: the discriminator is a logistic regression on learned features (real vs fake).

    ``train_step`` alternates the players: a discriminator step with the generator frozen, then a
    generator step (non-saturating BCE) with the discriminator frozen. Images are flattened and
    scaled to [-1, 1] to match the generator's tanh output; 2-D data (the ring) stay as they are.
    """

    name: ClassVar[str] = "gan"
    description: ClassVar[str] = "MLP GAN (alternating players, non-saturating loss); PNG grid on digits"
    Options: ClassVar[type] = GANOptions
    primary_metric: ClassVar[str] = "fake_judged_real"
    lower_is_better: ClassVar[frozenset[str]] = Task.lower_is_better | {"d_loss"}
    supports_data_parallel: ClassVar[bool] = False
    data_parallel_reason: ClassVar[str] = (
        "the GAN's two players step alternately through the generator and discriminator sub-modules, "
        "bypassing the DDP wrapper's forward, so gradients would not be all-reduced"
    )
    pipeline_reason: ClassVar[str] = "two players trained alternately, not one stack of layers"

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.image_shape: tuple[int, ...] | None = None

    def prepare_data(self, split: DatasetSplit) -> DatasetSplit:
        x_train, y_train = _tensors(split.train)
        x_test, y_test = _tensors(split.test)
        if x_train.dim() == 2:
            return split
        x_train, x_test = x_train.float().flatten(1), x_test.float().flatten(1)
        low, high = float(x_train.min()), float(x_train.max())
        scale = (high - low) / 2 or 1.0
        x_train, x_test = (x_train - low) / scale - 1, ((x_test - low) / scale - 1).clamp(-1, 1)
        info = DataInfo(split.info.name, split.info.input_shape, split.info.num_classes)
        return DatasetSplit(TensorDataset(x_train, y_train), TensorDataset(x_test, y_test), info)

    def build_model(self, info: DataInfo) -> nn.Module:
        o = self.options
        image = len(info.input_shape) == 3
        self.image_shape = tuple(info.input_shape) if image else None
        return GAN(_flat_features(info), o.latent_dim, o.hidden, o.g_layers, o.d_layers,
                   out_activation="tanh" if image else "none")

    def build_optimizers(self, model: nn.Module, train: TrainConfig) -> Optimizers:
        assert isinstance(model, GAN)
        optimizers = {
            "generator": make_optimizer(model.generator.parameters(), train),
            "discriminator": make_optimizer(model.discriminator.parameters(), train),
        }
        if train.optimizer == "adam":
            for optimizer in optimizers.values():
                for group in optimizer.param_groups:
                    group["betas"] = (self.options.beta1, group["betas"][1])
        return optimizers

    def loss(self, model: nn.Module, batch: Batch, context: TaskContext | None = None) -> torch.Tensor:
        raise UnsupportedError(
            "task 'gan' has no single loss: its two players train alternately in GANTask.train_step "
            "(engines that differentiate one loss, e.g. the parameter server, cannot run it)"
        )

    def train_step(
        self, model: nn.Module, batch: Batch, optimizers: Optimizers, extra_loss: ExtraLoss | None = None, *,
        context: TaskContext,
    ) -> dict[str, float]:
        assert isinstance(model, GAN)
        real = batch[0]
        n = real.shape[0]
        # 1) Discriminator step. The generator is frozen by detaching its samples: no graph
        #    reaches its parameters.
        d_opt, g_opt = optimizers["discriminator"], optimizers["generator"]
        d_opt.zero_grad(set_to_none=True)
        fake = model.generator(model.noise(n)).detach()
        d_loss = model.discriminator_loss(real, fake)
        (d_loss + extra_loss(model) if extra_loss is not None else d_loss).backward()
        d_opt.step()
        # 2) Generator step with the discriminator frozen (requires_grad off, so the backward pass
        #    through it accumulates no gradient in its parameters), non-saturating BCE.
        model.discriminator.requires_grad_(False)
        try:
            g_opt.zero_grad(set_to_none=True)
            g_loss = model.generator_loss(model.generator(model.noise(n)))
            (g_loss + extra_loss(model) if extra_loss is not None else g_loss).backward()
            g_opt.step()
        finally:
            model.discriminator.requires_grad_(True)
        # Gradients the extra term left on the discriminator belong to no step; drop them.
        d_opt.zero_grad(set_to_none=True)
        return {"d_loss": float(d_loss.detach()), "g_loss": float(g_loss.detach())}

    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int = 512) -> dict[str, float]:
        assert isinstance(model, GAN)
        o = self.options
        # A private noise generator: evaluation must not advance the training RNG (a resumed run
        # and an uninterrupted one would otherwise diverge).
        noise = model.noise(o.eval_samples, torch.Generator().manual_seed(0))
        with torch.no_grad():
            fake = model.generator(noise)
            fake_logits = model.discriminator(fake)
            real_logits = torch.cat([model.discriminator(move_batch(b, model)[0]) for b in eval_loader(dataset, batch_size)])
            d_loss = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits)) + \
                F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
            g_loss = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
        metrics = {
            "d_loss": float(d_loss),
            "g_loss": float(g_loss),
            "real_judged_real": float((real_logits > 0).double().mean()),
            "fake_judged_real": float((fake_logits > 0).double().mean()),
        }
        if model.data_dim == 2:
            covered, _ = ring_mode_coverage(fake, o.ring_modes, o.ring_radius, o.ring_sigma)
            metrics["modes_covered"] = float(covered)
        return metrics

    def final_metrics(self, model: nn.Module, split: DatasetSplit, *, context: TaskContext) -> dict[str, float]:
        if context.run_dir is not None:
            self.write_samples(model, Path(context.run_dir) / "samples.png")
        return {}

    def write_samples(self, model: nn.Module, path: Path, n: int | None = None, seed: int = 0) -> Path | None:
        """A PNG grid of generated images (or a scatter plot of 2-D samples). Returns the path."""
        assert isinstance(model, GAN)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = n or self.options.grid_samples
        was_training = model.training
        model.eval()
        samples = model.sample(n, torch.Generator().manual_seed(seed)).float().cpu()
        model.train(was_training)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.image_shape is not None:
            c, h, w = self.image_shape
            cols = int(math.ceil(math.sqrt(n)))
            rows = int(math.ceil(n / cols))
            grid = torch.full((rows * (h + 1), cols * (w + 1)), -1.0)
            for i, image in enumerate(samples.reshape(n, c, h, w).mean(dim=1)):
                r, q = divmod(i, cols)
                grid[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = image
            fig, ax = plt.subplots(figsize=(cols * 0.6, rows * 0.6))
            ax.imshow(grid.numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax.axis("off")
        elif model.data_dim == 2:
            fig, ax = plt.subplots(figsize=(4, 4))
            ax.scatter(samples[:, 0], samples[:, 1], s=2)
            ax.set_aspect("equal")
        else:
            return None
        return save_figure(fig, path, dpi=100, bbox_inches="tight")


# ---------------------------------------------------------------------------------------------
# Dual-head ViT on long-tailed digits
# ---------------------------------------------------------------------------------------------

ATTRIBUTES: dict[str, frozenset[int]] = {
    "even": frozenset({0, 2, 4, 6, 8}),
    "prime": frozenset({2, 3, 5, 7}),
    "ge5": frozenset({5, 6, 7, 8, 9}),
    "closed_loop": frozenset({0, 4, 6, 8, 9}),  # a printed 4 closes its triangle
    "odd": frozenset({1, 3, 5, 7, 9}),
    "curved": frozenset({0, 2, 3, 5, 6, 8, 9}),
}
"""Binary attributes of a digit class: label ``a`` of a sample is ``class in ATTRIBUTES[a]``."""


def long_tail_profile(num_classes: int, imbalance_ratio: float) -> np.ndarray:
    """Relative class frequencies ``ratio^(-c/(C-1))``: class 0 is the head, class C-1 is ``ratio`` times rarer."""
    if num_classes < 2:
        return np.ones(num_classes)
    return imbalance_ratio ** (-np.arange(num_classes) / (num_classes - 1))


@dataclass(frozen=True)
class DualHeadViTOptions:
    """Options of the ``dual_head_vit`` task."""

    patch: int = 2
    """Patch side in pixels (8x8 digits -> 16 patches)."""
    dim: int = 32
    """Token width."""
    depth: int = 4
    """Transformer encoder layers (each a possible pipeline cut)."""
    heads: int = 4
    """Attention heads."""
    mlp_ratio: int = 2
    """Feed-forward width / token width."""
    dropout: float = 0.0
    """Dropout in embeddings and encoder layers."""
    attributes: tuple[str, ...] = ("even", "prime", "ge5", "closed_loop")
    """Binary attributes predicted by the sigmoid head (names from ``ATTRIBUTES``; at least 4)."""
    imbalance_ratio: float = 20.0
    """Train-split long tail: the most frequent class has this many times the samples of the rarest (1 = as loaded)."""
    class_weighting: bool = True
    """Cross-entropy weighted by inverse class frequency."""
    pos_weighting: bool = True
    """BCE ``pos_weight`` = negatives / positives of each label."""
    label_loss_weight: float = 1.0
    """Weight of the label head's BCE in the total loss."""


class DualHeadViTTask(Task):
    """A small ViT with a class head and an attribute head, trained on long-tailed digits.

    The train split keeps, of class ``c``, the first ``n_max * ratio^(-c/9)`` samples (class 9 is
    the rarest); the test split stays balanced so recall of rare classes is measured fairly. The
    target is one float tensor ``[N, 1 + m]``: class index, then the m attribute bits.
    Class weights and ``pos_weight`` follow from the long-tail profile and the attribute table, so
    every process (rank, client) computes the same ones without seeing the whole dataset.
    """

    name: ClassVar[str] = "dual_head_vit"
    description: ClassVar[str] = "ViT with class (softmax) + attribute (sigmoid) heads on long-tailed digits"
    Options: ClassVar[type] = DualHeadViTOptions
    primary_metric: ClassVar[str] = "balanced_accuracy"
    pipeline_split_points: ClassVar[tuple[str, ...]] = ("tokens", "block0", "block1", "block2", "block3", "head")

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        unknown = [a for a in self.options.attributes if a not in ATTRIBUTES]
        if unknown:
            raise ConfigError("<task_options>", "task_options.attributes", unknown[0],
                              f"unknown attribute; known: {', '.join(ATTRIBUTES)}")
        if len(self.options.attributes) < 4:
            raise ConfigError("<task_options>", "task_options.attributes", list(self.options.attributes),
                              "at least 4 attributes")
        if self.options.imbalance_ratio < 1:
            raise ConfigError("<task_options>", "task_options.imbalance_ratio", self.options.imbalance_ratio,
                              "must be >= 1")
        self._weights: dict[tuple[str, int], torch.Tensor] = {}
        # Every encoder layer is a cut point, so the tuple follows the ``depth`` option.
        self.pipeline_split_points = ("tokens", *(f"block{i}" for i in range(self.options.depth)), "head")

    # ---- data ---------------------------------------------------------------------------
    def attribute_table(self, num_classes: int) -> torch.Tensor:
        """``[C, m]`` 0/1: attribute bits of each class."""
        return torch.tensor([[float(c in ATTRIBUTES[a]) for a in self.options.attributes] for c in range(num_classes)])

    def _with_attributes(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> TensorDataset:
        target = torch.cat([y.float()[:, None], self.attribute_table(num_classes)[y]], dim=1)  # [N, 1+m]
        return TensorDataset(x, target)

    def prepare_data(self, split: DatasetSplit) -> DatasetSplit:
        x_train, y_train = _tensors(split.train)
        x_test, y_test = _tensors(split.test)
        num_classes = split.info.num_classes
        if num_classes < 2 or y_train.is_floating_point():
            raise FedsimError(f"dual_head_vit needs integer class labels; dataset '{split.info.name}' has none")
        profile = long_tail_profile(num_classes, self.options.imbalance_ratio)
        counts = torch.bincount(y_train, minlength=num_classes)
        n_max = int(counts.min())
        keep = []
        for c in range(num_classes):
            # The split is already shuffled (seeded), so "the first n of class c" is a seeded draw.
            index = torch.nonzero(y_train == c).flatten()
            keep.append(index[: max(1, round(n_max * profile[c]))])
        kept = torch.sort(torch.cat(keep)).values
        train = self._with_attributes(x_train[kept], y_train[kept], num_classes)
        test = self._with_attributes(x_test, y_test, num_classes)
        return DatasetSplit(train, test, DataInfo(f"{split.info.name}_lt{self.options.imbalance_ratio:g}",
                                                  split.info.input_shape, num_classes))

    # ---- model ----------------------------------------------------------------------------
    def build_model(self, info: DataInfo) -> nn.Module:
        o = self.options
        c, h, w = info.input_shape
        if h != w:
            raise FedsimError(f"dual_head_vit needs square images; dataset '{info.name}' gives {info.input_shape}")
        return DualHeadViT(h, c, o.patch, o.dim, o.depth, o.heads, o.mlp_ratio, info.num_classes,
                           len(o.attributes), o.dropout)

    def class_weights(self, num_classes: int) -> torch.Tensor:
        """Inverse expected class frequency, scaled so the average weight per training sample is 1."""
        profile = torch.as_tensor(long_tail_profile(num_classes, self.options.imbalance_ratio), dtype=torch.float64)
        return (profile.sum() / num_classes / profile).float()

    def pos_weights(self, num_classes: int) -> torch.Tensor:
        """Per-label negatives / positives under the long-tail profile."""
        profile = torch.as_tensor(long_tail_profile(num_classes, self.options.imbalance_ratio), dtype=torch.float32)
        positives = (profile[:, None] * self.attribute_table(num_classes)).sum(dim=0)
        return (profile.sum() - positives) / positives.clamp_min(1e-12)

    def _cached(self, kind: str, num_classes: int) -> torch.Tensor:
        key = (kind, num_classes)
        if key not in self._weights:
            self._weights[key] = self.class_weights(num_classes) if kind == "class" else self.pos_weights(num_classes)
        return self._weights[key]

    def output_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # output: [N, C + m] (class logits, then attribute logits); target: [N, 1 + m].
        n_classes = output.shape[1] - (target.shape[1] - 1)
        class_logits, label_logits = output[:, :n_classes], output[:, n_classes:]
        y, labels = target[:, 0].long(), target[:, 1:].to(label_logits.dtype)
        o = self.options
        weight = self._cached("class", n_classes).to(class_logits) if o.class_weighting else None
        pos_weight = self._cached("pos", n_classes).to(label_logits) if o.pos_weighting else None
        # Weighted CE with reduction="mean" divides by the batch's summed weights, which would make
        # the loss depend on the batch's class mix; dividing by N keeps it a plain batch mean.
        ce = F.cross_entropy(class_logits, y, weight=weight, reduction="sum") / y.shape[0]
        bce = F.binary_cross_entropy_with_logits(label_logits, labels, pos_weight=pos_weight)
        return ce + o.label_loss_weight * bce

    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int = 512) -> dict[str, float]:
        assert isinstance(model, DualHeadViT)
        ys, preds, label_true, label_prob, loss, total = [], [], [], [], 0.0, 0
        with torch.no_grad():
            for batch in eval_loader(dataset, batch_size):
                x, target = move_batch(batch, model)
                output = model(x)
                class_logits, label_logits = model.split(output)
                loss += float(self.output_loss(output, target)) * x.shape[0]
                total += x.shape[0]
                ys.append(target[:, 0].long().cpu())
                preds.append(class_logits.argmax(dim=1).cpu())
                label_true.append(target[:, 1:].cpu())
                label_prob.append(torch.sigmoid(label_logits).float().cpu())
        # Here, not at the top: importing scikit-learn (SciPy, pandas) takes ~1 s that every other task would pay.
        from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, recall_score

        y, pred = torch.cat(ys).numpy(), torch.cat(preds).numpy()
        truth, prob = torch.cat(label_true).numpy().astype(int), torch.cat(label_prob).numpy()
        classes = np.arange(model.n_classes)
        recall = recall_score(y, pred, labels=classes, average=None, zero_division=0)
        return {
            "accuracy": float((y == pred).mean()),
            "loss": loss / max(total, 1),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, labels=classes, average="macro", zero_division=0)),
            "label_macro_f1": float(f1_score(truth, (prob > 0.5).astype(int), average="macro", zero_division=0)),
            "label_map": float(average_precision_score(truth, prob, average="macro")),
            # Classes C-3 .. C-1 are the three rarest in the training split (see long_tail_profile).
            "rare3_recall": float(recall[-3:].mean()),
        }


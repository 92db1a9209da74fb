"""The standard federated-learning benchmark models as tasks: ``femnist_cnn``, ``shakespeare_lstm``,
``cifar_cnn``, ``resnet18_gn`` (models in :mod:`fedsim.models.benchmark`).

All four are classifiers (cross-entropy on integer targets; accuracy and mean loss from
:func:`fedsim.tasks.part_a.classification_metrics`) and stacks of layers, so they run central, DDP,
federated, parameter-server, gossip and pipelined. The three convolutional ones are also
vectorisable (K clients at once with ``torch.func``); the LSTM is not (see
:class:`ShakespeareLSTMTask`).

Default data sets. The real data (LEAF's FEMNIST and Shakespeare, CIFAR-10) are files that fedsim
does not download, and a task's default must run on a fresh machine, offline. So each task's
default is a generated *stand-in* of the right shape, defined here (like the GAN's ring), and
says so in its name: ``femnist_standin`` ([1, 28, 28], 62 classes), ``cifar10_standin`` ([3, 32,
32], 10 classes) — both :mod:`fedsim.data.synthetic` Gaussian blobs — and ``shakespeare_standin``
(int64 windows of 80 symbols from a sparse Markov chain over 80 symbols, target = the next
symbol). Name the real data for real numbers: ``data.name = "cifar10"`` (torchvision files under
``data.data_dir``) for the CIFAR models; LEAF's FEMNIST ([1, 28, 28], 62 classes) or ``"mnist"`` /
``"fashion_mnist"`` (10 classes) for the FEMNIST CNN; LEAF's Shakespeare (int64 [N, 80], 80 classes)
for the LSTM. The stand-ins only show that a task runs; their accuracies mean nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

from fedsim.data import DataInfo, DatasetSplit, load_dataset
from fedsim.errors import ConfigError, FedsimError
from fedsim.models.benchmark import (
    CharLSTM,
    CharLSTMConfig,
    CifarCNN,
    CifarCNNConfig,
    FemnistCNN,
    FemnistCNNConfig,
    ResNetGN,
    ResNetGNConfig,
)
from fedsim.tasks import Task
from fedsim.tasks.part_a import classification_metrics

__all__ = [
    "FemnistCNNTask",
    "ShakespeareLSTMTask",
    "CifarCNNTask",
    "ResNet18GNTask",
    "load_femnist_standin",
    "load_cifar10_standin",
    "load_shakespeare_standin",
]

_OPTIONS = "<task_options>"


# ---------------------------------------------------------------------------------------------
# Stand-in data (offline defaults)
# ---------------------------------------------------------------------------------------------


def _renamed(split: DatasetSplit, name: str) -> DatasetSplit:
    return dataclasses.replace(split, info=dataclasses.replace(split.info, name=name))


def load_femnist_standin(
    test_fraction: float,
    split_seed: int,
    normalise: bool = True,
    n_samples: int = 3100,
    num_classes: int = 62,
    noise: float = 1.0,
    **_: object,
) -> DatasetSplit:
    """Generated images shaped like FEMNIST ([1, 28, 28], 62 classes; *not* handwriting): the
    ``synthetic`` data set's class-conditional Gaussian blobs (``data.options``: ``n_samples``,
    ``num_classes``, ``noise``). The stratified split needs ``n_samples * test_fraction >= num_classes``."""
    split = load_dataset("synthetic", test_fraction=test_fraction, split_seed=split_seed, normalise=normalise,
                         n_samples=n_samples, shape=(1, 28, 28), num_classes=num_classes, noise=noise)
    return _renamed(split, "femnist_standin")


def load_cifar10_standin(
    test_fraction: float,
    split_seed: int,
    normalise: bool = True,
    n_samples: int = 2000,
    num_classes: int = 10,
    noise: float = 1.0,
    **_: object,
) -> DatasetSplit:
    """Generated images shaped like CIFAR-10 ([3, 32, 32], 10 classes; *not* CIFAR): the ``synthetic``
    data set's class-conditional Gaussian blobs (``data.options``: ``n_samples``, ``num_classes``, ``noise``)."""
    split = load_dataset("synthetic", test_fraction=test_fraction, split_seed=split_seed, normalise=normalise,
                         n_samples=n_samples, shape=(3, 32, 32), num_classes=num_classes, noise=noise)
    return _renamed(split, "cifar10_standin")


def load_shakespeare_standin(
    test_fraction: float,
    split_seed: int,
    normalise: bool = True,
    n_samples: int = 2000,
    seq_len: int = 80,
    vocab_size: int = 80,
    branching: int = 3,
    jump: float = 0.1,
    **_: object,
) -> DatasetSplit:
    """Generated next-symbol data shaped like LEAF's Shakespeare (*not* text): ``x`` int64 ``[N, seq_len]``
    windows of a symbol stream, ``y`` the symbol that follows each window.

    The stream is a seeded Markov chain over ``vocab_size`` symbols: each symbol is followed by one of
    its own ``branching`` successors (probabilities halving: 4/7, 2/7, 1/7 for 3) or, with
    probability ``jump``, by any symbol (so every symbol occurs). The best possible accuracy is
    about ``(1 - jump) * 4/7`` (0.51), reached by reading the window's last symbol. Train and test
    windows come from separate stretches of the stream (they never overlap). ``normalise`` is
    ignored (tokens are not standardised). Deterministic in ``split_seed``.
    """
    if n_samples < 2 or seq_len < 1 or vocab_size < 2 or not 1 <= branching <= vocab_size or not 0 <= jump <= 1:
        raise FedsimError(f"shakespeare_standin: bad options n_samples={n_samples}, seq_len={seq_len}, "
                          f"vocab_size={vocab_size}, branching={branching}, jump={jump}")
    rng = np.random.default_rng(split_seed)
    n_test = min(max(int(round(n_samples * test_fraction)), 1), n_samples - 1)
    n_train = n_samples - n_test
    successors = np.stack([rng.choice(vocab_size, branching, replace=False) for _ in range(vocab_size)])
    weights = 0.5 ** np.arange(branching)
    length = n_samples + 2 * seq_len + 1  # train windows, a gap of seq_len, test windows
    picks = rng.choice(branching, size=length, p=weights / weights.sum())
    jumps = rng.random(length) < jump
    random_symbols = rng.integers(vocab_size, size=length)
    stream = np.empty(length, dtype=np.int64)
    stream[0] = random_symbols[0]
    for t in range(1, length):
        stream[t] = random_symbols[t] if jumps[t] else successors[stream[t - 1], picks[t]]
    windows = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)
    train, test = windows[:n_train], windows[n_train + seq_len:n_train + seq_len + n_test]

    def dataset(w: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.as_tensor(w[:, :seq_len].copy()), torch.as_tensor(w[:, seq_len].copy()))

    return DatasetSplit(dataset(train), dataset(test), DataInfo("shakespeare_standin", (seq_len,), vocab_size))


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


def _positive(name: str, value: Any) -> None:
    values = value if isinstance(value, tuple) else (value,)
    if any(not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(_OPTIONS, f"task_options.{name}", value, "expected positive integers")


def _pair(name: str, value: tuple[int, ...]) -> tuple[int, int]:
    if len(value) != 2:
        raise ConfigError(_OPTIONS, f"task_options.{name}", list(value), "expected 2 values")
    _positive(name, value)
    return int(value[0]), int(value[1])


def _square_image(task: str, info: DataInfo) -> tuple[int, int]:
    """``(channels, side)`` of square images ``[C, H, W]``, or a clear error."""
    shape = info.input_shape
    if len(shape) != 3 or shape[1] != shape[2]:
        raise FedsimError(f"{task} needs square images [C, H, W]; dataset '{info.name}' gives {shape}")
    if info.num_classes < 2:
        raise FedsimError(f"{task} is a classifier; dataset '{info.name}' has {info.num_classes} classes")
    return shape[0], shape[1]


class _Classifier(Task):
    """Cross-entropy on integer class targets; accuracy and mean cross-entropy on a data set."""

    primary_metric: ClassVar[str] = "accuracy"
    supports_data_parallel: ClassVar[bool] = True

    def output_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int = 512) -> dict[str, float]:
        return classification_metrics(model, dataset, batch_size)


@dataclass(frozen=True)
class FemnistCNNOptions:
    """Options of the ``femnist_cnn`` task."""

    hidden: int = 2048
    """Units of the dense layer: 2048 in LEAF's FEMNIST CNN, 512 in McMahan et al.'s MNIST CNN."""
    channels: tuple[int, ...] = (32, 64)
    """Output channels of the two 5x5 "same" convs."""


class FemnistCNNTask(_Classifier):
    """LEAF's FEMNIST CNN: 6,603,710 parameters on [1, 28, 28] with 62 classes (1,663,370 for
    McMahan et al.'s MNIST CNN: ``hidden = 512``, 10 classes)."""

    name: ClassVar[str] = "femnist_cnn"
    description: ClassVar[str] = "LEAF FEMNIST CNN (2 conv 5x5 32/64 + pool, FC 2048; 6.6M params at 28x28, 62 classes)"
    default_dataset: ClassVar[str] = "fedsim.tasks.benchmark:load_femnist_standin"
    Options: ClassVar[type] = FemnistCNNOptions
    pipeline_split_points: ClassVar[tuple[str, ...]] = ("conv2", "fc", "head")
    vectorisable: ClassVar[bool] = True  # no batch coupling: tested against sequential clients

    def __init__(self, options: FemnistCNNOptions | None = None) -> None:
        super().__init__(options)
        _positive("hidden", self.options.hidden)
        _pair("channels", self.options.channels)

    def build_model(self, info: DataInfo) -> nn.Module:
        c, side = _square_image(self.name, info)
        if side < 4:
            raise FedsimError(f"femnist_cnn pools twice by 2: images must be at least 4x4, dataset '{info.name}' "
                              f"gives {info.input_shape}")
        o = self.options
        return FemnistCNN(FemnistCNNConfig(in_channels=c, side=side, num_classes=info.num_classes,
                                           channels=_pair("channels", o.channels), hidden=o.hidden))


@dataclass(frozen=True)
class ShakespeareLSTMOptions:
    """Options of the ``shakespeare_lstm`` task."""

    vocab_size: int = 80
    """Symbols the embedding knows (LEAF's Shakespeare alphabet: 80); every token must be below it."""
    embed_dim: int = 8
    """Embedding width (8 in LEAF)."""
    hidden: int = 256
    """Units of each LSTM layer (256 in LEAF)."""
    layers: int = 2
    """Stacked LSTM layers (2 in LEAF); the pipeline may cut before each one and before the head."""


class ShakespeareLSTMTask(_Classifier):
    """LEAF's Shakespeare next-character LSTM: 819,920 parameters (80 symbols and classes).

    Not vectorisable: ``torch.func.vmap`` has no batching rule for the LSTM kernel. Over clients it
    falls back to a per-client loop (with a warning, so no faster than training them one by one),
    and the padded path for unequal clients (a per-sample ``vmap`` inside it) fails with "Batching
    rule not implemented for aten::lstm.input" (torch 2.13). Federated runs train clients one by one.
    """

    name: ClassVar[str] = "shakespeare_lstm"
    description: ClassVar[str] = "LEAF Shakespeare char LSTM (embed 8, 2x LSTM 256, 80 classes; 819,920 params)"
    default_dataset: ClassVar[str] = "fedsim.tasks.benchmark:load_shakespeare_standin"
    Options: ClassVar[type] = ShakespeareLSTMOptions
    vectorisable: ClassVar[bool] = False

    def __init__(self, options: ShakespeareLSTMOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        for key in ("embed_dim", "hidden", "layers"):
            _positive(key, getattr(o, key))
        if not isinstance(o.vocab_size, int) or o.vocab_size < 2:
            raise ConfigError(_OPTIONS, "task_options.vocab_size", o.vocab_size, "expected an integer >= 2")
        self.pipeline_split_points = (*(f"lstm{i + 1}" for i in range(o.layers)), "head")

    def prepare_data(self, split: DatasetSplit) -> DatasetSplit:
        """Checks the inputs are integer windows ``[N, T]`` (dtype and shape only: the tokens are not
        scanned, since LEAF data are memory-mapped and a scan would read them all)."""
        for part in (split.train, split.test):
            x = part.tensors[0]  # type: ignore[attr-defined]
            if x.dim() != 2 or x.is_floating_point():
                raise FedsimError(f"shakespeare_lstm needs integer token windows [N, T]; dataset '{split.info.name}' "
                                  f"gives {x.dtype} {tuple(x.shape)}")
        return split

    def build_model(self, info: DataInfo) -> nn.Module:
        if info.num_classes < 2:
            raise FedsimError(f"shakespeare_lstm is a classifier; dataset '{info.name}' has {info.num_classes} classes")
        o = self.options
        return CharLSTM(CharLSTMConfig(vocab_size=o.vocab_size, embed_dim=o.embed_dim, hidden=o.hidden,
                                       layers=o.layers, num_classes=info.num_classes))


@dataclass(frozen=True)
class CifarCNNOptions:
    """Options of the ``cifar_cnn`` task."""

    channels: tuple[int, ...] = (6, 16)
    """Output channels of the two 5x5 convs (no padding)."""
    hidden: tuple[int, ...] = (120, 84)
    """Units of the two dense layers."""


class CifarCNNTask(_Classifier):
    """The PyTorch tutorial's CIFAR-10 CNN (Flower's quickstart model): 62,006 parameters on
    [3, 32, 32] with 10 classes."""

    name: ClassVar[str] = "cifar_cnn"
    description: ClassVar[str] = "PyTorch-tutorial CIFAR-10 CNN (conv 6/16, FC 120/84; 62,006 params)"
    default_dataset: ClassVar[str] = "fedsim.tasks.benchmark:load_cifar10_standin"
    Options: ClassVar[type] = CifarCNNOptions
    pipeline_split_points: ClassVar[tuple[str, ...]] = ("conv2", "fc1", "fc2", "head")
    vectorisable: ClassVar[bool] = True  # no batch coupling: tested against sequential clients

    def __init__(self, options: CifarCNNOptions | None = None) -> None:
        super().__init__(options)
        _pair("channels", self.options.channels)
        _pair("hidden", self.options.hidden)

    def build_model(self, info: DataInfo) -> nn.Module:
        c, side = _square_image(self.name, info)
        if ((side - 4) // 2 - 4) // 2 < 1:
            raise FedsimError(f"cifar_cnn needs images of at least 14x14; dataset '{info.name}' gives {info.input_shape}")
        o = self.options
        return CifarCNN(CifarCNNConfig(in_channels=c, side=side, num_classes=info.num_classes,
                                       channels=_pair("channels", o.channels), hidden=_pair("hidden", o.hidden)))


@dataclass(frozen=True)
class ResNet18GNOptions:
    """Options of the ``resnet18_gn`` task."""

    groups: int = 2
    """GroupNorm groups in every normalisation layer: 2, as in Reddi et al. 2021's federated ResNet-18
    (32 is Wu & He's default). Must divide ``width``; does not change the parameter count."""
    width: int = 64
    """Channels of the first stage; the four stages have width x (1, 2, 4, 8) (64 is ResNet-18)."""


class ResNet18GNTask(_Classifier):
    """ResNet-18 with GroupNorm and a CIFAR stem: 11,173,962 parameters with 10 classes.

    GroupNorm normalises each sample on its own, so unlike BatchNorm nothing couples the samples of
    a batch: no running statistics to average across clients (the problem with BatchNorm under
    non-IID FedAvg, Hsieh et al. 2020), exact DDP without SyncBatchNorm, and vectorised clients
    with padded batches.
    """

    name: ClassVar[str] = "resnet18_gn"
    description: ClassVar[str] = "ResNet-18 with GroupNorm (2 groups), CIFAR stem; 11,173,962 params"
    default_dataset: ClassVar[str] = "fedsim.tasks.benchmark:load_cifar10_standin"
    Options: ClassVar[type] = ResNet18GNOptions
    pipeline_split_points: ClassVar[tuple[str, ...]] = ("layer1", "layer2", "layer3", "layer4", "pool")
    vectorisable: ClassVar[bool] = True  # GroupNorm has no batch coupling: tested against sequential clients

    def __init__(self, options: ResNet18GNOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        _positive("groups", o.groups)
        _positive("width", o.width)
        if o.width % o.groups:
            raise ConfigError(_OPTIONS, "task_options.groups", o.groups, f"must divide width = {o.width}")

    def build_model(self, info: DataInfo) -> nn.Module:
        c, _ = _square_image(self.name, info)
        w = self.options.width
        return ResNetGN(ResNetGNConfig(in_channels=c, num_classes=info.num_classes,
                                       widths=(w, 2 * w, 4 * w, 8 * w), groups=self.options.groups))

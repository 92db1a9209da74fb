"""The standard federated-learning benchmark models, as plain single-device modules.

* :class:`FemnistCNN` — LEAF's FEMNIST CNN (Caldas et al. 2018), which is McMahan et al.'s (2017)
  MNIST CNN with a wider dense layer: two 5x5 "same" convs (32, 64 channels), each followed by
  ReLU and 2x2 max-pooling, a dense layer (2048 in LEAF, 512 in McMahan et al.) and the classifier.
  On 28x28 inputs: 6,603,710 parameters with 62 classes and 2048 hidden units; 1,663,370 with 10
  classes and 512 hidden units (the FedAvg paper's MNIST CNN).
* :class:`CharLSTM` — LEAF's Shakespeare next-character model: an 8-d embedding of 80 symbols,
  two LSTM layers of 256 units, a dense layer to 80 classes on the last time step: 819,920
  parameters in torch's two-bias form (``bias_ih`` and ``bias_hh``; 817,872 with one bias per gate
  as in LEAF's TensorFlow code).
* :class:`CifarCNN` — the PyTorch "Training a classifier" tutorial CNN for CIFAR-10 (also Flower's
  quickstart model): conv 5x5 6 -> pool -> conv 5x5 16 -> pool -> 120 -> 84 -> 10, 62,006 parameters.
* :class:`ResNetGN` — ResNet-18 (He et al. 2016) with GroupNorm in place of BatchNorm (Hsieh et al.
  2020, "The Non-IID Data Quagmire"), with the usual CIFAR stem (3x3 conv, stride 1, no max-pool):
  11,173,962 parameters for 10 classes (GroupNorm's affine weights equal BatchNorm's, and it has no
  running statistics, so nothing couples the samples of a batch or the clients of a federation).

Every model runs its named children in order (``for child in children: x = child(x)``) and each
child takes and returns one plain tensor, so the pipeline engine can cut the model between any two
children (the LSTM layers return only their output sequence, not the ``(h, c)`` state tuple).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.models.part_a import LayerStack

__all__ = [
    "FemnistCNNConfig",
    "FemnistCNN",
    "CharLSTMConfig",
    "CharLSTM",
    "SequenceLSTM",
    "LastStepLinear",
    "CifarCNNConfig",
    "CifarCNN",
    "ResNetGNConfig",
    "ResNetGN",
    "BasicBlockGN",
    "count_parameters",
]


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


class ConvPool(nn.Module):
    """``max_pool(relu(conv(x)))``: one conv block; the conv is ``padding`` (int or ``"same"``)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, padding: int | str, pool: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=padding)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.conv(x)), self.pool)


class Dense(nn.Module):
    """``relu(linear(flatten(x)))``: a hidden dense layer that accepts images or vectors."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.linear(x.flatten(1)))


# ---------------------------------------------------------------------------------------------
# LEAF FEMNIST CNN (McMahan et al.'s MNIST CNN with hidden = 512)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FemnistCNNConfig:
    """Shape of a :class:`FemnistCNN`."""

    in_channels: int = 1
    """Image channels (1 for FEMNIST / MNIST)."""
    side: int = 28
    """Image height and width (28 for FEMNIST / MNIST); two 2x2 pools make it ``side // 4``."""
    num_classes: int = 62
    """Classes (62 for FEMNIST: digits, upper- and lower-case letters; 10 for MNIST)."""
    channels: tuple[int, int] = (32, 64)
    """Output channels of the two 5x5 convs."""
    kernel: int = 5
    """Conv kernel size (padding "same")."""
    hidden: int = 2048
    """Units of the dense layer: 2048 in LEAF, 512 in McMahan et al.'s MNIST CNN."""


class FemnistCNN(LayerStack):
    """``conv1 -> conv2 -> fc -> head``: conv blocks (conv "same", ReLU, max-pool 2), dense + ReLU, logits.

    Parameters on 28x28 with the defaults: conv1 832, conv2 51,264, fc 3136*2048 + 2048 = 6,424,576,
    head 2048*62 + 62 = 127,038; 6,603,710 in all.
    """

    def __init__(self, cfg: FemnistCNNConfig = FemnistCNNConfig()) -> None:
        super().__init__()
        c1, c2 = cfg.channels
        if cfg.side < 4:
            raise ValueError(f"FemnistCNN pools twice by 2: images must be at least 4x4, got side {cfg.side}")
        self.cfg = cfg
        self.conv1 = ConvPool(cfg.in_channels, c1, cfg.kernel, "same")
        self.conv2 = ConvPool(c1, c2, cfg.kernel, "same")
        self.fc = Dense(c2 * (cfg.side // 4) ** 2, cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.num_classes)


# ---------------------------------------------------------------------------------------------
# LEAF Shakespeare LSTM
# ---------------------------------------------------------------------------------------------


class SequenceLSTM(nn.LSTM):
    """A batch-first ``nn.LSTM`` that returns only its output sequence ``[N, T, hidden]``, starting
    from a zero state as ``nn.LSTM`` does. The output is made contiguous (a batch-first LSTM returns
    a transposed view), because a pipeline stage sends its output to the next rank as it is, and
    point-to-point sends need contiguous tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        output, _ = super().forward(x)
        return output.contiguous()


class LastStepLinear(nn.Linear):
    """A linear layer applied to the last time step of a ``[N, T, features]`` sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[:, -1])


@dataclass(frozen=True)
class CharLSTMConfig:
    """Shape of a :class:`CharLSTM`."""

    vocab_size: int = 80
    """Symbols the embedding knows (LEAF's Shakespeare alphabet has 80)."""
    embed_dim: int = 8
    """Embedding width (8 in LEAF)."""
    hidden: int = 256
    """Units of each LSTM layer (256 in LEAF)."""
    layers: int = 2
    """Stacked LSTM layers (2 in LEAF); children ``lstm1 .. lstm{layers}``."""
    num_classes: int = 80
    """Output classes: the next symbol (80 in LEAF)."""


class CharLSTM(LayerStack):
    """``embed -> lstm1 -> ... -> lstmL -> head``: next-symbol logits from int64 tokens ``[N, T]``.

    The layers are separate single-layer LSTMs so the pipeline may cut between them; with no
    dropout, ``lstm1 -> lstm2`` computes exactly what ``nn.LSTM(num_layers=2)`` does. Parameters
    with the defaults: embedding 80*8 = 640; lstm1 4*256*(8 + 256) + 2*4*256 = 272,384; lstm2
    4*256*(256 + 256) + 2*4*256 = 526,336; head 256*80 + 80 = 20,560; 819,920 in all.
    """

    def __init__(self, cfg: CharLSTMConfig = CharLSTMConfig()) -> None:
        super().__init__()
        if cfg.layers < 1:
            raise ValueError(f"CharLSTM needs at least one LSTM layer, got {cfg.layers}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        for i in range(cfg.layers):
            width = cfg.embed_dim if i == 0 else cfg.hidden
            self.add_module(f"lstm{i + 1}", SequenceLSTM(width, cfg.hidden, batch_first=True))
        self.head = LastStepLinear(cfg.hidden, cfg.num_classes)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 CNN (the PyTorch tutorial's)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CifarCNNConfig:
    """Shape of a :class:`CifarCNN`."""

    in_channels: int = 3
    """Image channels."""
    side: int = 32
    """Image height and width (32 for CIFAR-10)."""
    num_classes: int = 10
    """Classes."""
    channels: tuple[int, int] = (6, 16)
    """Output channels of the two 5x5 convs (no padding)."""
    hidden: tuple[int, int] = (120, 84)
    """Units of the two dense layers."""


class CifarCNN(LayerStack):
    """``conv1 -> conv2 -> fc1 -> fc2 -> head`` (the PyTorch tutorial CNN, 62,006 parameters on 32x32x3).

    conv1 3*6*25 + 6 = 456, conv2 6*16*25 + 16 = 2,416, fc1 400*120 + 120 = 48,120, fc2 120*84 + 84
    = 10,164, head 84*10 + 10 = 850.
    """

    def __init__(self, cfg: CifarCNNConfig = CifarCNNConfig()) -> None:
        super().__init__()
        c1, c2 = cfg.channels
        h1, h2 = cfg.hidden
        side = ((cfg.side - 4) // 2 - 4) // 2  # valid 5x5 conv, pool 2, valid 5x5 conv, pool 2
        if side < 1:
            raise ValueError(f"CifarCNN needs images of at least 14x14, got side {cfg.side}")
        self.cfg = cfg
        self.conv1 = ConvPool(cfg.in_channels, c1, 5, 0)
        self.conv2 = ConvPool(c1, c2, 5, 0)
        self.fc1 = Dense(c2 * side * side, h1)
        self.fc2 = Dense(h1, h2)
        self.head = nn.Linear(h2, cfg.num_classes)


# ---------------------------------------------------------------------------------------------
# ResNet-18 with GroupNorm
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResNetGNConfig:
    """Shape of a :class:`ResNetGN`."""

    in_channels: int = 3
    """Image channels."""
    num_classes: int = 10
    """Classes."""
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    """Channels of the four stages (ResNet-18's)."""
    blocks: tuple[int, int, int, int] = (2, 2, 2, 2)
    """Basic blocks per stage ((2, 2, 2, 2) is ResNet-18, (3, 4, 6, 3) ResNet-34)."""
    groups: int = 2
    """GroupNorm groups in every normalisation layer; every width must be divisible by it. The
    parameter count does not depend on it (each channel keeps one scale and one shift)."""


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels)


class BasicBlockGN(nn.Module):
    """ResNet's basic block: ``relu(gn(conv3x3(relu(gn(conv3x3(x))))) + shortcut(x))``; the
    shortcut is a strided 1x1 conv + GroupNorm when the shape changes, else the identity."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.norm2 = _norm(c_out, groups)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _norm(c_out, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Stem(nn.Module):
    """The CIFAR stem: ``relu(gn(conv3x3(x)))`` at stride 1, no max-pool (32x32 stays 32x32)."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=1, padding=1, bias=False)
        self.norm = _norm(c_out, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class GlobalAvgPool(nn.Module):
    """``[N, C, H, W] -> [N, C]``: the mean over the spatial positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class ResNetGN(LayerStack):
    """``stem -> layer1 -> layer2 -> layer3 -> layer4 -> pool -> head``: ResNet with GroupNorm.

    Stages 2-4 halve the resolution (32 -> 16 -> 8 -> 4 on CIFAR). Parameters with the defaults
    and 10 classes: stem 1,856, layer1 147,968, layer2 525,568, layer3 2,099,712, layer4 8,393,728,
    head 5,130; 11,173,962 in all (the BatchNorm CIFAR ResNet-18's count).
    """

    def __init__(self, cfg: ResNetGNConfig = ResNetGNConfig()) -> None:
        super().__init__()
        if len(cfg.widths) != 4 or len(cfg.blocks) != 4:
            raise ValueError(f"ResNetGN has four stages: widths {cfg.widths} and blocks {cfg.blocks} need 4 entries")
        if cfg.groups < 1 or any(w % cfg.groups for w in cfg.widths):
            raise ValueError(f"GroupNorm groups ({cfg.groups}) must divide every width {cfg.widths}")
        if min(cfg.blocks) < 1:
            raise ValueError(f"every stage needs at least one block, got {cfg.blocks}")
        self.cfg = cfg
        self.stem = Stem(cfg.in_channels, cfg.widths[0], cfg.groups)
        c_in = cfg.widths[0]
        for i, (width, count) in enumerate(zip(cfg.widths, cfg.blocks, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlockGN(c_in if b == 0 else width, width, stride if b == 0 else 1, cfg.groups)
                      for b in range(count)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = width
        self.pool = GlobalAvgPool()
        self.head = nn.Linear(c_in, cfg.num_classes)

"""Part A of the exam: small models whose properties are checked by hand-computed numbers.

Every model is a plain single-device ``nn.Module``. The stack-of-layers models (:class:`ExamNet`,
:class:`LinearAutoencoder`, :class:`BNConvNet`, :class:`DualHeadViT`) run their named children in
order (``for child in children: x = child(x)``) so the pipeline engine can cut them between any
two children. The :class:`GAN` is two players and is not a stack.

Also here: the exam's scalar function :func:`exam_function` with its autograd derivative, a
slow objective on R^2 (:func:`slow_objective`) for the gradient-descent vs Adagrad experiment,
and the ring-of-8-Gaussians sampler used to test the GAN's mode coverage.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ExamNet",
    "LinearAutoencoder",
    "BNConvNet",
    "GAN",
    "DualHeadViT",
    "exam_function",
    "exam_function_grad",
    "exam_function_grad_formula",
    "slow_objective",
    "SLOW_CURVATURE",
    "SLOW_START",
    "ring_centres",
    "sample_ring",
    "ring_mode_coverage",
]


class LayerStack(nn.Module):
    """A model that is its children run in order; the pipeline engine may cut between any two."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child in self.children():
            x = child(x)
        return x


class Scale(nn.Module):
    """``g(x) = scale * x``: the exam's linear hidden activation (``scale = 1/4``)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


# ---------------------------------------------------------------------------------------------
# ExamNet and the exam's function
# ---------------------------------------------------------------------------------------------


class ExamNet(LayerStack):
    """The exam's 4-2-4 network: ``y = W2 g(W1 x)`` with ``g(x) = x/4``, no biases.

    Parameters
    ----------
    n_in, n_hidden, n_out:
        Layer widths (4, 2, 4 in the exam).
    init_value:
        Every weight starts at this constant (1 in the exam); ``None`` keeps PyTorch's random
        init (two equal hidden units stay equal under gradient descent, so training from the
        constant init can only learn a rank-1 map).
    activation_scale:
        The slope of the linear hidden activation (1/4 in the exam).
    """

    def __init__(
        self,
        n_in: int = 4,
        n_hidden: int = 2,
        n_out: int = 4,
        init_value: float | None = 1.0,
        activation_scale: float = 0.25,
    ) -> None:
        super().__init__()
        self.hidden = nn.Linear(n_in, n_hidden, bias=False)
        self.act = Scale(activation_scale)
        self.output = nn.Linear(n_hidden, n_out, bias=False)
        if init_value is not None:
            nn.init.constant_(self.hidden.weight, init_value)
            nn.init.constant_(self.output.weight, init_value)


def exam_function(x: torch.Tensor) -> torch.Tensor:
    """``f(x) = x^2 (1 + sin(pi x))`` from torch ops, so autograd differentiates it.

    ``f >= 0`` and ``f = 0`` exactly at ``x = 0`` and ``x = 2n - 1/2``; those are global minima, so
    ``f'`` vanishes there too (``f'`` also vanishes at the local maxima in between).
    """
    return x**2 * (1 + torch.sin(torch.pi * x))


def exam_function_grad(x: torch.Tensor | float | list[float]) -> torch.Tensor:
    """``f'(x)`` computed by autograd (float64), elementwise."""
    x = torch.as_tensor(x, dtype=torch.float64).detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(exam_function(x).sum(), x)
    return grad


def exam_function_grad_formula(x: torch.Tensor) -> torch.Tensor:
    """The hand-derived ``f'(x) = 2x(1 + sin(pi x)) + pi x^2 cos(pi x)`` (to check autograd)."""
    return 2 * x * (1 + torch.sin(torch.pi * x)) + torch.pi * x**2 * torch.cos(torch.pi * x)


# ---------------------------------------------------------------------------------------------
# Linear autoencoder
# ---------------------------------------------------------------------------------------------


class LinearAutoencoder(LayerStack):
    """``x -> D E x`` with linear ``E: R^d -> R^k`` and ``D: R^k -> R^d`` and no activation.

    At its optimum under squared error on centred data, the decoder's column space is the top-k
    principal subspace (Baldi & Hornik 1989); the columns themselves need not be orthogonal.
    """

    def __init__(self, d: int, k: int, bias: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Linear(d, k, bias=bias)
        self.decoder = nn.Linear(k, d, bias=bias)

    def subspace(self) -> torch.Tensor:
        """Orthonormal basis ``[d, k]`` of the decoder's column space."""
        q, _ = torch.linalg.qr(self.decoder.weight.detach().double())
        return q


# ---------------------------------------------------------------------------------------------
# BatchNorm convolutional network
# ---------------------------------------------------------------------------------------------


def _conv_block(c_in: int, c_out: int, pool: bool, conv_bias: bool) -> nn.Sequential:
    layers: dict[str, nn.Module] = {
        # BatchNorm subtracts the per-channel batch mean right after, so a conv bias would be
        # cancelled exactly in training mode: it is a wasted parameter (tested).
        "conv": nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=conv_bias),
        "bn": nn.BatchNorm2d(c_out),
        "relu": nn.ReLU(),
    }
    if pool:
        layers["pool"] = nn.MaxPool2d(2)
    return _named_sequential(layers)


def _named_sequential(layers: dict[str, nn.Module]) -> nn.Sequential:
    seq = nn.Sequential()
    for name, layer in layers.items():
        seq.add_module(name, layer)
    return seq


class BNConvNet(LayerStack):
    """Four 3x3 conv blocks (conv without bias -> BatchNorm -> ReLU), two max-pools, a linear head.

    About 25k parameters on 8x8 digits. Children: ``block1 .. block4``, ``head``.

    Parameters
    ----------
    in_channels, image_size, num_classes:
        Input ``[N, in_channels, image_size, image_size]`` and number of classes.
    widths:
        Channels of the four conv blocks.
    dropout:
        Dropout before the linear head (0 = off, the default, for exact equivalence tests).
    conv_bias:
        Give the convolutions a bias (only to show that BatchNorm cancels it).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
        widths: tuple[int, int, int, int] = (16, 32, 32, 32),
        dropout: float = 0.0,
        conv_bias: bool = False,
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"BNConvNet needs an image size divisible by 4, got {image_size}")
        w1, w2, w3, w4 = widths
        self.block1 = _conv_block(in_channels, w1, pool=False, conv_bias=conv_bias)
        self.block2 = _conv_block(w1, w2, pool=True, conv_bias=conv_bias)
        self.block3 = _conv_block(w2, w3, pool=False, conv_bias=conv_bias)
        self.block4 = _conv_block(w3, w4, pool=True, conv_bias=conv_bias)
        side = image_size // 4
        self.head = _named_sequential(
            {"flatten": nn.Flatten(), "dropout": nn.Dropout(dropout), "fc": nn.Linear(w4 * side * side, num_classes)}
        )


# ---------------------------------------------------------------------------------------------
# GAN
# ---------------------------------------------------------------------------------------------


def _mlp(sizes: list[int], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), activation()]
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """MLP from noise ``z [N, latent_dim]`` to samples ``[N, data_dim]``."""

    def __init__(self, latent_dim: int, data_dim: int, hidden: int, layers: int, out_activation: str) -> None:
        super().__init__()
        self.body = _mlp([latent_dim] + [hidden] * layers, nn.ReLU)
        self.out = nn.Linear(hidden, data_dim)
        if out_activation not in ("none", "tanh"):
            raise ValueError(f"out_activation must be 'none' or 'tanh', got {out_activation!r}")
        self.out_activation = out_activation

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.out(self.body(z))
        return torch.tanh(x) if self.out_activation == "tanh" else x


class Discriminator(nn.Module):
    """MLP features followed by a logistic regression (``classifier``) saying real vs fake.

    ``forward`` returns the logit; ``sigmoid(logit)`` is the probability of "real".
    """

    def __init__(self, data_dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.features = _mlp([data_dim] + [hidden] * layers, lambda: nn.LeakyReLU(0.2))
        self.classifier = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).squeeze(-1)  # [N] logits


class GAN(nn.Module):
    """Generator and discriminator MLPs; the two players are trained alternately.

    ``forward(z)`` generates. :meth:`discriminator_loss` is the BCE of "real" on real samples and
    "fake" on generated ones; :meth:`generator_loss` is the non-saturating BCE (the generator
    maximises ``log D(G(z))`` instead of minimising ``log(1 - D(G(z)))``, whose gradient vanishes
    exactly when the discriminator wins early in training).
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int = 8,
        hidden: int = 128,
        g_layers: int = 2,
        d_layers: int = 2,
        out_activation: str = "none",
    ) -> None:
        super().__init__()
        self.data_dim, self.latent_dim = data_dim, latent_dim
        self.generator = Generator(latent_dim, data_dim, hidden, g_layers, out_activation)
        self.discriminator = Discriminator(data_dim, hidden, d_layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal noise ``[n, latent_dim]`` on the model's device and dtype."""
        ref = self.generator.out.weight
        return torch.randn(n, self.latent_dim, generator=generator, dtype=ref.dtype).to(ref.device)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` generated samples ``[n, data_dim]``."""
        return self.generator(self.noise(n, generator))

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
        # BCE with logits = sigmoid + BCE, computed stably.
        return F.binary_cross_entropy_with_logits(
            real_logits, torch.ones_like(real_logits)
        ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        logits = self.discriminator(fake)
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


def ring_centres(modes: int = 8, radius: float = 2.0) -> torch.Tensor:
    """Centres ``[modes, 2]`` equally spaced on a circle."""
    angles = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
    return radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)


def sample_ring(
    n: int, modes: int = 8, radius: float = 2.0, sigma: float = 0.05, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points from a mixture of ``modes`` isotropic Gaussians on a ring.

    Returns ``(x [n, 2] float32, mode [n] long)``; modes are drawn uniformly.
    """
    mode = torch.randint(modes, (n,), generator=generator)
    noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    x = ring_centres(modes, radius)[mode] + sigma * noise
    return x.float(), mode


def ring_mode_coverage(
    samples: torch.Tensor,
    modes: int = 8,
    radius: float = 2.0,
    sigma: float = 0.05,
    min_fraction: float = 0.02,
) -> tuple[int, torch.Tensor]:
    """How many ring modes a set of samples covers.

    A mode is covered when at least ``min_fraction`` of all samples lie within ``3 sigma`` of its
    centre. Returns ``(covered, fraction_per_mode [modes])``.
    """
    distance = torch.cdist(samples.double().reshape(-1, 2), ring_centres(modes, radius))  # [n, modes]
    fraction = (distance <= 3 * sigma).double().mean(dim=0)
    return int((fraction >= min_fraction).sum()), fraction


# ---------------------------------------------------------------------------------------------
# Dual-head ViT
# ---------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Image ``[N, C, H, W]`` -> patch tokens ``[N, L, dim]`` (a strided conv = linear per patch)."""

    def __init__(self, in_channels: int, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TokenEmbed(nn.Module):
    """Prepend a learned class token and add learned positional embeddings: ``[N, L+1, dim]``."""

    def __init__(self, n_patches: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, n_patches + 1, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.dropout(torch.cat([cls, x], dim=1) + self.pos)


class DualHead(nn.Module):
    """LayerNorm, take the class token, and run both heads; outputs ``[N, n_classes + n_labels]``.

    One output tensor (both heads concatenated) keeps pipeline schedules generic; the task's loss
    splits it into class logits (softmax/cross-entropy) and label logits (sigmoid/BCE).
    """

    def __init__(self, dim: int, n_classes: int, n_labels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.classes = nn.Linear(dim, n_classes)
        self.labels = nn.Linear(dim, n_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        token = self.norm(x[:, 0])  # [N, dim]
        return torch.cat([self.classes(token), self.labels(token)], dim=1)


class DualHeadViT(LayerStack):
    """A small vision transformer with an n-class softmax head and an m-label sigmoid head.

    Children: ``patch_embed``, ``tokens`` (class token + positions), ``block0 .. block{depth-1}``
    (pre-norm transformer encoder layers), ``head``. Output ``[N, n_classes + n_labels]`` logits;
    :meth:`split` separates them.
    """

    def __init__(
        self,
        image_size: int = 8,
        in_channels: int = 1,
        patch: int = 2,
        dim: int = 32,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
        n_classes: int = 10,
        n_labels: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"patch size {patch} does not divide image size {image_size}")
        self.n_classes, self.n_labels = n_classes, n_labels
        self.patch_embed = PatchEmbed(in_channels, patch, dim)
        self.tokens = TokenEmbed((image_size // patch) ** 2, dim, dropout)
        for i in range(depth):
            block = nn.TransformerEncoderLayer(
                dim, heads, dim * mlp_ratio, dropout, activation="gelu", batch_first=True, norm_first=True
            )
            self.add_module(f"block{i}", block)
        self.head = DualHead(dim, n_classes, n_labels)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, n_classes + n_labels]`` -> (class logits, label logits)."""
        return out[:, : self.n_classes], out[:, self.n_classes :]


# ---------------------------------------------------------------------------------------------
# Slow objective on R^2
# ---------------------------------------------------------------------------------------------

SLOW_CURVATURE: tuple[float, float] = (100.0, 0.1)
"""Curvatures of the valley's steep and flat directions: condition number 1000."""
SLOW_START: tuple[float, float] = (1.0, 1.5)
"""Where both optimisers start."""


def slow_objective(w: torch.Tensor, curvature: tuple[float, float] = SLOW_CURVATURE) -> torch.Tensor:
    """A narrow, axis-aligned valley ``f(w) = (a w0^2 + b w1^2) / 2`` with ``a/b = 1000``.

    Gradient descent must keep its step below ``2/a`` to stay stable across the valley, so along
    the floor it shrinks ``w1`` by only ``1 - lr b`` per step: thousands of iterations. Adagrad
    divides each coordinate's step by its own gradient history, which rescales both directions
    to the same speed. ``w`` is ``[..., 2]``; returns ``[...]``.
    """
    a, b = curvature
    return 0.5 * (a * w[..., 0] ** 2 + b * w[..., 1] ** 2)

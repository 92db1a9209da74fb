"""Masked autoencoder (He et al., "Masked Autoencoders Are Scalable Vision Learners", 2021).

Follows the official ``models_mae.py``: patchify; fixed 2-D sin-cos positional embeddings with a
cls token; the encoder sees only the visible patches; a lighter decoder appends one shared
learned mask token per masked patch, un-shuffles with ``ids_restore``, adds its own positional
embeddings and predicts ``p*p*C`` pixels per patch; the loss is the per-patch MSE averaged over
the masked patches only (optionally against per-patch normalised pixels).

Two deviations, both for fedsim's engines:

* the mask is an *input* (``forward(imgs, mask)``), drawn by the task from per-sample keys
  (:mod:`fedsim.models.masking`), so that it does not depend on rank or batch composition;
* the model is a stack of named children run in order, each mapping a *state tuple* to the next
  (``embed``: ``(imgs, mask) -> (tokens, ids_restore, target)``; ``enc{i}`` / ``enc_norm``:
  tokens -> tokens; ``decoder_embed``: ``-> (tokens, mask, target)``; ``dec{i}``;
  ``head``: ``-> (pred, target, mask)``), so a pipeline can start a stage at any child.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.models.masking import apply_mask, unshuffle

__all__ = ["MAEConfig", "MAE", "PRESETS", "patchify", "unpatchify", "sincos_pos_embed_2d", "masked_patch_loss"]

State = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class MAEConfig:
    """Sizes of the MAE. Defaults train on 8x8 digits in seconds (patch 2 -> 4x4 = 16 patches)."""

    img_size: int = 8
    """Image height = width (pixels)."""
    patch_size: int = 2
    """Patch side p (pixels); ``img_size`` must be a multiple."""
    in_chans: int = 1
    """Image channels C."""
    embed_dim: int = 64
    """Encoder width."""
    depth: int = 4
    """Encoder blocks."""
    num_heads: int = 4
    """Encoder attention heads."""
    decoder_embed_dim: int = 32
    """Decoder width (lighter than the encoder, as in the paper)."""
    decoder_depth: int = 2
    """Decoder blocks."""
    decoder_num_heads: int = 4
    """Decoder attention heads."""
    mlp_ratio: float = 4.0
    """MLP hidden width / block width."""
    norm_pix_loss: bool = False
    """Regress per-patch normalised pixels ((t - mean) / sqrt(var + 1e-6)) instead of raw ones."""

    @property
    def grid(self) -> tuple[int, int]:
        side = self.img_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    def validate(self) -> MAEConfig:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads or self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError("embed widths must be multiples of their head counts")
        if self.embed_dim % 4 or self.decoder_embed_dim % 4:
            raise ValueError("2-D sin-cos positional embeddings need widths divisible by 4")
        return self


PRESETS: dict[str, MAEConfig] = {
    "digits": MAEConfig(),
    # ViT-Tiny encoder (12 x 192, 3 heads) with a light 4 x 128 decoder, on 224x224 RGB, 16x16 patches.
    "vit_tiny": MAEConfig(img_size=224, patch_size=16, in_chans=3, embed_dim=192, depth=12, num_heads=3,
                          decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4),
}


# ---- helpers (pure functions) -------------------------------------------------------------------
def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, L, p*p*C]`` (row-major patches, pixels in (p, p, C) order as official)."""
    n, c, h, w = imgs.shape
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """``[N, L, p*p*C]`` -> ``[N, C, H, W]`` for a square patch grid."""
    n, length, _ = x.shape
    side = int(math.isqrt(length))
    x = x.reshape(n, side, side, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, side * p, side * p)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1, 1).double() * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos embeddings ``[(1 +) H*W, dim]`` (half for rows, half for columns; cls = 0)."""
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    # Official code embeds the w-coordinate in the first half, the h-coordinate in the second.
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-patch MSE ``[N, L]``, averaged over masked patches only (``mask`` 1 = masked)."""
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


# ---- blocks -------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, T, D]
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [N, heads, T, d/heads]
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block`` as used by MAE)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class OnTokens(nn.Module):
    """Apply a tokens -> tokens module to the first element of the state, carry the rest."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module

    def forward(self, state: State) -> State:
        return (self.inner(state[0]), *state[1:])


class MaskedPatchEmbed(nn.Module):
    """``(imgs, mask) -> (tokens [N, 1+K, D], ids_restore [N, L], target [N, L, p*p*C])``."""

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # Fixed, not learned: a buffer keeps it out of optimizers and gradient all-reduces.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.embed_dim, cfg.grid)[None])

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        target = patchify(imgs, self.cfg.patch_size)
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """All patch tokens with positions, ``[N, L, D]`` (no cls)."""
        x = self.proj(imgs).flatten(2).transpose(1, 2)
        return x + self.pos_embed[:, 1:, :]

    def forward(self, state: State) -> State:
        imgs, mask = state[0], state[1]
        x, _, ids_restore = apply_mask(self.tokens(imgs), mask)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1), ids_restore, self.target(imgs)


class DecoderEmbed(nn.Module):
    """``(tokens [N, 1+K, D], ids_restore, target) -> (tokens [N, 1+L, Dd], mask [N, L], target)``."""

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.decoder_embed_dim, cfg.grid)[None])

    def forward(self, state: State) -> State:
        x, ids_restore, target = state
        x = self.proj(x)
        n, length = ids_restore.shape
        visible = x.shape[1] - 1
        # One shared mask token per masked patch, then back to patch order.
        filler = self.mask_token.expand(n, length - visible, -1)
        patches = unshuffle(torch.cat([x[:, 1:, :], filler], dim=1), ids_restore)
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.pos_embed
        # Shuffled positions >= visible are the masked ones.
        mask = (ids_restore >= visible).to(x.dtype)
        return x, mask, target


class PredictionHead(nn.Module):
    """``(tokens [N, 1+L, Dd], mask, target) -> (pred [N, L, p*p*C], target, mask)``."""

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=1e-6)
        self.pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_dim)

    def forward(self, state: State) -> State:
        x, mask, target = state
        return self.pred(self.norm(x))[:, 1:, :], target, mask


# ---- the model ----------------------------------------------------------------------------------
class MAE(nn.Module):
    """MAE with a ViT encoder and a light ViT decoder; ``forward(imgs, mask) -> (pred, target, mask)``.

    Children in run order: ``embed``, ``enc0`` .. ``enc{depth-1}``, ``enc_norm``,
    ``decoder_embed``, ``dec0`` .. ``dec{decoder_depth-1}``, ``head``.
    """

    def __init__(self, cfg: MAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = (cfg or MAEConfig()).validate()
        self.embed = MaskedPatchEmbed(cfg)
        for i in range(cfg.depth):
            self.add_module(f"enc{i}", OnTokens(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio)))
        self.enc_norm = OnTokens(nn.LayerNorm(cfg.embed_dim, eps=1e-6))
        self.decoder_embed = DecoderEmbed(cfg)
        for i in range(cfg.decoder_depth):
            self.add_module(f"dec{i}", OnTokens(Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio)))
        self.head = PredictionHead(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """As the official code: xavier-uniform linears (and the patch conv as a linear), N(0, .02) tokens."""
        w = self.embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.embed.cls_token, std=0.02)
        nn.init.normal_(self.decoder_embed.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ---- the stack (what a pipeline cuts) -------------------------------------------------------
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.named_children()]

    def encoder_names(self) -> list[str]:
        return [f"enc{i}" for i in range(self.cfg.depth)]

    def decoder_names(self) -> list[str]:
        return [f"dec{i}" for i in range(self.cfg.decoder_depth)]

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> State:
        """``imgs [N, C, H, W]``, ``mask [N, L]`` (1 = masked) -> ``(pred, target, mask)``."""
        state: State = (imgs, mask)
        for child in self.children():
            state = child(state)
        return state

    # ---- the official method names ----------------------------------------------------------
    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> State:
        """``-> (latent [N, 1+K, D], ids_restore, target)``."""
        state: State = self.embed((imgs, mask))
        for name in self.encoder_names():
            state = getattr(self, name)(state)
        return self.enc_norm(state)

    def forward_decoder(self, state: State) -> State:
        """``(latent, ids_restore, target) -> (pred [N, L, p*p*C], target, mask)``."""
        state = self.decoder_embed(state)
        for name in self.decoder_names():
            state = getattr(self, name)(state)
        return self.head(state)

    @staticmethod
    def forward_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_patch_loss(pred, target, mask)

    def reconstruct(self, imgs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, pred)`` with ``pred`` in pixel space ``[N, C, H, W]`` (norm_pix predictions are
        mapped back with each patch's own mean and variance, for pictures only)."""
        pred, target, mask = self(imgs, mask)
        loss = masked_patch_loss(pred, target, mask)
        if self.cfg.norm_pix_loss:
            raw = patchify(imgs, self.cfg.patch_size)
            pred = pred * (raw.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + raw.mean(dim=-1, keepdim=True)
        return loss, unpatchify(pred, self.cfg.patch_size, self.cfg.in_chans)

    # ---- the encoder alone (probe, fine-tune, few-shot features) ------------------------------
    def encode(self, imgs: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Features of unmasked images ``[N, D]``: mean of patch tokens (``pool="mean"``) or cls."""
        mask = torch.zeros(imgs.shape[0], self.cfg.num_patches, dtype=torch.long, device=imgs.device)
        latent = self.forward_encoder(imgs, mask)[0]
        return latent[:, 1:, :].mean(dim=1) if pool == "mean" else latent[:, 0, :]


def config_from(preset: str = "digits", **overrides: object) -> MAEConfig:
    """A preset with some fields replaced (``None`` values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown MAE preset '{preset}'; known: {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})

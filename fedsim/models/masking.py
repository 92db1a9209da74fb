"""Patch masking for the MAE: random, block-wise (BEiT) and grid, keyed per sample.

Every strategy draws a mask for each sample from that sample's own random stream, whose seed
is a function of ``(seed, sample index, draw, salt)`` only (:func:`sample_keys`). A sample
therefore gets the same mask whichever rank, client, microbatch or batch it lands in, which is
what makes data-parallel and pipelined MAE training equal to central training.

Conventions (as the official MAE code):

* ``mask`` is ``[N, L]`` in patch order (row-major over the patch grid), 0 = kept, 1 = masked;
* exactly ``L - int(L * (1 - ratio))`` patches are masked in every sample, so every sample has
  the same number of visible tokens and a batch of visible tokens is a dense ``[N, K, D]``;
* ``ids_restore`` is the inverse permutation of ``ids_shuffle`` (kept patches first), so
  ``gather(cat(visible, masked), ids_restore)`` puts tokens back in patch order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal

import torch

from fedsim.errors import FedsimError
from fedsim.seeding import derive_seed

__all__ = [
    "STRATEGIES", "Strategy", "num_masked", "sample_keys", "random_mask", "block_mask", "grid_mask",
    "draw_masks", "apply_mask", "random_masking", "block_masking", "grid_masking", "unshuffle",
]

Strategy = Literal["random", "block", "grid"]
STRATEGIES: tuple[str, ...] = ("random", "block", "grid")
Rect = tuple[int, int, int, int]  # (top, left, height, width) on the patch grid


def num_masked(num_patches: int, ratio: float) -> int:
    """Masked patches per sample: ``L - int(L * (1 - ratio))`` (the official code's ``len_keep``)."""
    if not 0.0 <= ratio < 1.0:
        raise FedsimError(f"mask ratio {ratio!r} must be in [0, 1)")
    return num_patches - int(num_patches * (1 - ratio))


def sample_keys(seed: int, indices: Sequence[int] | torch.Tensor, draw: Sequence[int] | int = 0,
                salt: str = "train") -> list[int]:
    """One 63-bit seed per sample from ``(seed, sample index, draw, salt)``.

    ``draw`` counts how often the sample was masked before (a new mask each epoch); ``salt``
    separates splits (test sample 3 is not train sample 3).
    """
    idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    draws = [draw] * len(idx) if isinstance(draw, int) else list(draw)
    if len(draws) != len(idx):
        raise ValueError("one draw count per sample index")
    return [derive_seed(seed, "mae-mask", salt, int(i), int(d)) for i, d in zip(idx, draws, strict=True)]


# ---- one sample ----------------------------------------------------------------------------
def random_mask(num_patches: int, ratio: float, rng: random.Random) -> list[int]:
    """Per-patch uniform noise; keep the patches with the lowest noise (the official code)."""
    keep = num_patches - num_masked(num_patches, ratio)
    noise = [rng.random() for _ in range(num_patches)]
    order = sorted(range(num_patches), key=noise.__getitem__)
    mask = [1] * num_patches
    for i in order[:keep]:
        mask[i] = 0
    return mask


def block_mask(grid: tuple[int, int], ratio: float, rng: random.Random, *, min_block: int = 0,
               return_rects: bool = False) -> list[int] | tuple[list[int], list[Rect]]:
    """BEiT block-wise masking on an ``H x W`` patch grid, with an exact masked count.

    Rectangles of random area in ``[min_block, remaining budget]`` and log-uniform aspect ratio
    in ``[0.3, 1/0.3]`` are placed at random until the budget is met (BEiT's
    ``MaskingGenerator``: a rectangle is accepted only if it adds at least one and at most the
    remaining number of patches, so the count never overshoots). When ten tries in a row add
    nothing (small grids, nearly full budget), the rest is topped up with random single patches
    (1x1 rectangles). With ``return_rects`` also returns every rectangle used, top-ups included.
    """
    height, width = grid
    total = height * width
    budget = num_masked(total, ratio)
    # BEiT uses 16 of 196 patches as the smallest block; scale that to the grid, at least 1.
    min_block = min_block or max(1, round(total * 16 / 196))
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    mask = [0] * total
    rects: list[Rect] = []
    count = 0
    while count < budget:
        remaining = budget - count
        added = 0
        for _ in range(10):
            area = rng.uniform(min(min_block, remaining), remaining)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (1 <= h <= height and 1 <= w <= width):
                continue
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            cells = [r * width + c for r in range(top, top + h) for c in range(left, left + w)]
            new = sum(1 for i in cells if not mask[i])
            if 0 < new <= remaining:
                for i in cells:
                    mask[i] = 1
                rects.append((top, left, h, w))
                added = new
                break
        if added == 0:
            break
        count += added
    if count < budget:  # top up with single random patches
        free = [i for i in range(total) if not mask[i]]
        for i in rng.sample(free, budget - count):
            mask[i] = 1
            rects.append((i // width, i % width, 1, 1))
    return (mask, rects) if return_rects else mask


def grid_mask(grid: tuple[int, int], rng: random.Random | None = None, *, random_offset: bool = False) -> list[int]:
    """Keep one patch of every 2x2 cell (75% masked): the same corner everywhere.

    The kept corner is the top-left one, or one corner drawn per sample when ``random_offset``.
    """
    height, width = grid
    if height % 2 or width % 2:
        raise FedsimError(f"grid masking needs an even patch grid, got {height}x{width}")
    dr, dc = (0, 0)
    if random_offset:
        if rng is None:
            raise ValueError("random_offset needs a random stream")
        dr, dc = rng.randrange(2), rng.randrange(2)
    return [0 if (r % 2 == dr and c % 2 == dc) else 1 for r in range(height) for c in range(width)]


# ---- a batch -------------------------------------------------------------------------------
def draw_masks(strategy: str, grid: tuple[int, int], ratio: float, keys: Sequence[int], *,
               random_offset: bool = False, device: torch.device | str | None = None) -> torch.Tensor:
    """``[N, L]`` long masks (0 kept, 1 masked), sample ``n`` drawn from ``random.Random(keys[n])``.

    ``grid`` masking always masks 75% (``ratio`` must be 0.75).
    """
    if strategy not in STRATEGIES:
        raise FedsimError(f"unknown mask strategy '{strategy}'; known: {', '.join(STRATEGIES)}")
    if strategy == "grid" and abs(ratio - 0.75) > 1e-9:
        raise FedsimError(f"grid masking keeps one patch per 2x2 cell, i.e. ratio 0.75, not {ratio!r}")
    num_patches = grid[0] * grid[1]
    rows = []
    for key in keys:
        rng = random.Random(key)
        if strategy == "random":
            rows.append(random_mask(num_patches, ratio, rng))
        elif strategy == "block":
            rows.append(block_mask(grid, ratio, rng))  # type: ignore[arg-type]
        else:
            rows.append(grid_mask(grid, rng, random_offset=random_offset))
    if not rows:
        return torch.zeros(0, num_patches, dtype=torch.long, device=device)
    return torch.tensor(rows, dtype=torch.long, device=device)


def apply_mask(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the visible tokens of ``x`` ``[N, L, D]`` under ``mask`` ``[N, L]``.

    Returns ``(x_visible [N, K, D], mask [N, L] as x's dtype, ids_restore [N, L])``. Kept patches
    come first in patch order (a stable sort of the mask); ``ids_restore`` undoes that shuffle.
    """
    n, length, dim = x.shape
    if mask.shape != (n, length):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tokens {(n, length)}")
    masked = mask.long()
    counts = masked.sum(dim=1)
    if n and not bool((counts == counts[0]).all()):
        raise ValueError("every sample must mask the same number of patches")
    len_keep = length - int(counts[0]) if n else length
    ids_shuffle = torch.argsort(masked, dim=1, stable=True)  # kept (0) first, each group in patch order
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    return x_visible, masked.to(x.dtype), ids_restore


def unshuffle(tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Put ``[N, L, D]`` tokens in shuffled order (kept first) back in patch order."""
    return torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def random_masking(x: torch.Tensor, ratio: float, keys: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Random masking of tokens ``x [N, L, D]``: ``(x_visible, mask, ids_restore)``."""
    return apply_mask(x, draw_masks("random", (1, x.shape[1]), ratio, keys, device=x.device))


def block_masking(x: torch.Tensor, grid: tuple[int, int], ratio: float, keys: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Block-wise masking of tokens ``x [N, H*W, D]``: ``(x_visible, mask, ids_restore)``."""
    return apply_mask(x, draw_masks("block", grid, ratio, keys, device=x.device))


def grid_masking(x: torch.Tensor, grid: tuple[int, int], keys: Sequence[int], *,
                 random_offset: bool = False) -> tuple[torch.Tensor, ...]:
    """Grid masking (one kept per 2x2 cell) of tokens ``x [N, H*W, D]``: ``(x_visible, mask, ids_restore)``."""
    return apply_mask(x, draw_masks("grid", grid, 0.75, keys, random_offset=random_offset, device=x.device))

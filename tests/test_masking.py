"""Masking strategies: exact counts, shuffle/un-shuffle, grid and block shapes, per-sample keys."""

from __future__ import annotations

import random

import pytest
import torch

from fedsim.errors import FedsimError
from fedsim.models.masking import (
    apply_mask,
    block_mask,
    block_masking,
    draw_masks,
    grid_mask,
    grid_masking,
    num_masked,
    random_masking,
    sample_keys,
    unshuffle,
)

GRIDS = [(4, 4), (14, 14), (6, 10)]


def test_num_masked_follows_the_official_len_keep() -> None:
    # L - int(L * (1 - r)), computed by hand.
    assert num_masked(16, 0.75) == 12
    assert num_masked(196, 0.75) == 147
    assert num_masked(16, 0.9) == 15  # int(16 * 0.1) = int(1.6) = 1 kept
    assert num_masked(16, 0.25) == 4
    assert num_masked(196, 0.5) == 98
    assert num_masked(16, 0.0) == 0
    with pytest.raises(FedsimError, match="1.0"):
        num_masked(16, 1.0)


@pytest.mark.parametrize("strategy", ["random", "block", "grid"])
@pytest.mark.parametrize("grid", GRIDS)
def test_every_mask_has_the_exact_masked_count(strategy: str, grid: tuple[int, int]) -> None:
    ratios = [0.75] if strategy == "grid" else [0.25, 0.5, 0.75, 0.9]
    length = grid[0] * grid[1]
    for ratio in ratios:
        masks = draw_masks(strategy, grid, ratio, sample_keys(3, range(200)), random_offset=True)
        assert masks.shape == (200, length)
        assert set(masks.unique().tolist()) <= {0, 1}
        assert (masks.sum(1) == num_masked(length, ratio)).all(), (strategy, grid, ratio)


def test_ids_restore_inverts_the_shuffle_and_gather_round_trips() -> None:
    torch.manual_seed(0)
    n, length, dim = 5, 16, 3
    x = torch.randn(n, length, dim)
    masks = draw_masks("random", (4, 4), 0.75, sample_keys(0, range(n)))
    x_visible, mask, ids_restore = apply_mask(x, masks)
    keep = length - 12
    assert x_visible.shape == (n, keep, dim)
    assert torch.equal(mask, masks.float())
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    # ids_restore is the inverse permutation of the shuffle.
    arange = torch.arange(length).expand(n, -1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), arange)
    assert torch.equal(torch.gather(ids_restore, 1, ids_shuffle), arange)
    # The visible tokens are exactly the kept patches, in patch order.
    for i in range(n):
        kept = (masks[i] == 0).nonzero().flatten()
        assert torch.equal(x_visible[i], x[i, kept])
    # Shuffle everything, then un-shuffle: the original tokens come back.
    shuffled = torch.gather(x, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, dim))
    assert torch.equal(shuffled[:, :keep], x_visible)
    assert torch.equal(unshuffle(shuffled, ids_restore), x)


def test_strategy_functions_return_visible_mask_restore() -> None:
    x = torch.randn(4, 16, 2)
    keys = sample_keys(1, range(4))
    for out in (random_masking(x, 0.75, keys), block_masking(x, (4, 4), 0.5, keys), grid_masking(x, (4, 4), keys)):
        x_visible, mask, ids_restore = out
        assert x_visible.shape[1] == 16 - int(mask[0].sum())
        assert ids_restore.shape == (4, 16)
        assert (mask.sum(1) == mask[0].sum()).all()


def test_grid_keeps_exactly_one_patch_per_two_by_two_cell() -> None:
    for grid in [(4, 4), (14, 14), (6, 8)]:
        h, w = grid
        fixed = torch.tensor(grid_mask(grid)).reshape(h, w)
        assert (fixed[0::2, 0::2] == 0).all() and fixed.sum() == h * w - h * w // 4  # top-left kept
        masks = draw_masks("grid", grid, 0.75, sample_keys(0, range(64)), random_offset=True).reshape(-1, h, w)
        kept_per_cell = (1 - masks).reshape(-1, h // 2, 2, w // 2, 2).sum(dim=(2, 4))
        assert (kept_per_cell == 1).all()
        # One offset per sample: every cell keeps the same corner; offsets vary across samples.
        corners = set()
        for m in masks:
            rows, cols = (m == 0).nonzero(as_tuple=True)
            assert len(set((rows % 2).tolist())) == 1 and len(set((cols % 2).tolist())) == 1
            corners.add((int(rows[0] % 2), int(cols[0] % 2)))
        assert len(corners) == 4
    with pytest.raises(FedsimError, match="even"):
        grid_mask((7, 7))
    with pytest.raises(FedsimError, match="0.75"):
        draw_masks("grid", (4, 4), 0.5, [1])


def _union(rects: list[tuple[int, int, int, int]], grid: tuple[int, int]) -> torch.Tensor:
    out = torch.zeros(grid, dtype=torch.long)
    for top, left, h, w in rects:
        out[top:top + h, left:left + w] = 1
    return out


def _masked_neighbour_fraction(mask: torch.Tensor) -> float:
    """Fraction of horizontally/vertically adjacent masked pairs among masked patches' neighbours."""
    m = mask.float()
    pairs = (m[:, 1:] * m[:, :-1]).sum() + (m[1:, :] * m[:-1, :]).sum()
    return float(pairs / m.sum())


def test_block_masks_are_unions_of_rectangles_and_clustered() -> None:
    grid = (14, 14)
    from_blocks = total = 0
    block_adjacency, random_adjacency = [], []
    for seed in range(100):
        mask, rects = block_mask(grid, 0.5, random.Random(seed), return_rects=True)
        mask = torch.tensor(mask).reshape(grid)
        assert torch.equal(mask, _union(rects, grid))
        assert int(mask.sum()) == num_masked(196, 0.5)
        # Rectangles respect BEiT's aspect range (up to rounding) and lie inside the grid.
        for top, left, h, w in rects:
            assert 0 <= top and top + h <= 14 and 0 <= left and left + w <= 14
        big = _union([r for r in rects if r[2] * r[3] > 1], grid)
        from_blocks += int(big.sum())
        total += int(mask.sum())
        block_adjacency.append(_masked_neighbour_fraction(mask))
        rnd = draw_masks("random", grid, 0.5, [seed])[0].reshape(grid)
        random_adjacency.append(_masked_neighbour_fraction(rnd))
    # Nearly all masked patches come from real blocks (not single-patch top-ups) ...
    assert from_blocks / total > 0.9
    # ... so masked patches have far more masked neighbours than under random masking.
    assert sum(block_adjacency) / 100 > 1.4 * sum(random_adjacency) / 100


def test_masks_depend_only_on_seed_and_sample_index() -> None:
    grid = (4, 4)
    for strategy in ("random", "block", "grid"):
        ratio = 0.75 if strategy == "grid" else 0.5
        alone = draw_masks(strategy, grid, ratio, sample_keys(7, [5]), random_offset=True)[0]
        in_batch = draw_masks(strategy, grid, ratio, sample_keys(7, [3, 9, 5, 1]), random_offset=True)[2]
        other_batch = draw_masks(strategy, grid, ratio, sample_keys(7, torch.tensor([5, 0])), random_offset=True)[0]
        assert torch.equal(alone, in_batch) and torch.equal(alone, other_batch)
    # Different seeds, draws (epochs) or splits give different masks (over many samples).
    base = draw_masks("random", grid, 0.5, sample_keys(7, range(50)))
    assert not torch.equal(base, draw_masks("random", grid, 0.5, sample_keys(8, range(50))))
    assert not torch.equal(base, draw_masks("random", grid, 0.5, sample_keys(7, range(50), draw=1)))
    assert not torch.equal(base, draw_masks("random", grid, 0.5, sample_keys(7, range(50), salt="test")))
    assert sample_keys(7, [1, 2]) == sample_keys(7, [1, 2])  # no hidden state

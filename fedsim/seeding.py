"""Keyed randomness: seeds and orders that depend only on what they are keyed by.

Every random draw that must agree across engines (data order, shards, masks, client sampling) is
keyed by (seed, epoch / round / partition / sample), never by rank, call count or process.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

__all__ = ["derive_seed", "keyed_generator", "seed_everything", "epoch_permutation", "strided_shard"]


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends only on ``keys`` (e.g. (seed, epoch), (seed, round, partition)).

    Hash-based rather than ``seed + offset`` so that neighbouring keys give unrelated streams.
    """
    digest = hashlib.blake2b(repr(tuple(keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def keyed_generator(*keys: int | str) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(derive_seed(*keys))
    return generator


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (model init and dropout draw from these)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of the training data in ``epoch``: a function of (seed, epoch) only, so a resumed
    run and every engine see the same order."""
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=keyed_generator(seed, "epoch", epoch)).tolist()



def strided_shard(n: int, world: int, rank: int, seed: int, epoch: int, shuffle: bool = True, *,
                  drop_last: bool = False) -> list[int]:
    """Sample indices of ``rank`` in ``epoch``: every ``world``-th entry of the (seed, epoch) permutation.

    ``DistributedSampler``'s interleaving: the ranks' k-th batches of ``b`` together are the central
    run's k-th batch of ``world * b`` over the same permutation. ``drop_last`` leaves out the last
    ``n % world`` samples of the permutation so that every rank has ``n // world`` samples and the
    same number of steps (``DistributedSampler(drop_last=True)``).
    """
    order = epoch_permutation(n, seed, epoch, shuffle)
    if drop_last:
        order = order[: (n // world) * world]
    return order[rank::world]

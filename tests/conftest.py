"""Shared test settings: one torch thread (deterministic float sums, no oversubscription on 2 cores)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Dataset caches (the digits split) go to a folder of this session, not the user's ~/.cache.
os.environ.setdefault("FEDSIM_CACHE_DIR", tempfile.mkdtemp(prefix="fedsim-test-cache-"))
torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def repo_root() -> str:
    return REPO_ROOT

"""The one checkpoint format every engine writes, and atomic file writes.

A checkpoint is a dict saved with ``torch.save``::

    {"format": 1, "engine": "central", "model": state_dict, "optimizers": {name: state},
     "schedulers": {name: state}, "rng": {...}, "epoch": int, "step": int, "round": int,
     "engine_state": {...}}

``epoch`` / ``step`` / ``round`` count what is *completed*. ``engine_state`` holds whatever an
engine needs beyond that (a strategy's state, per-client control variates, ...).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


def _atomic_replace(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_replace(Path(path), lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def capture_rng() -> dict[str, Any]:
    """Every random generator a run draws from, so a resumed run draws the same numbers."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_checkpoint(
    engine: str,
    model: dict[str, torch.Tensor],
    optimizers: dict[str, Any] | None = None,
    schedulers: dict[str, Any] | None = None,
    *,
    epoch: int = 0,
    step: int = 0,
    round: int = 0,
    engine_state: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "engine": engine,
        "model": model,
        "optimizers": optimizers or {},
        "schedulers": schedulers or {},
        "rng": rng if rng is not None else capture_rng(),
        "epoch": epoch,
        "step": step,
        "round": round,
        "engine_state": engine_state or {},
    }


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Atomically write a checkpoint (a crash mid-write leaves the previous one intact)."""
    _atomic_replace(Path(path), lambda handle: torch.save(checkpoint, handle))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    from fedsim.errors import FedsimError

    path = Path(path)
    if not path.is_file():
        raise FedsimError(f"no checkpoint to resume from at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint.get("format") != FORMAT_VERSION:
        raise FedsimError(f"{path}: checkpoint format {checkpoint.get('format')!r} is not {FORMAT_VERSION}")
    return checkpoint

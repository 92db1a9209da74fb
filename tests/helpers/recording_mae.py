"""The MAE task, recording every training mask it draws: (sample, epoch) -> mask, one JSONL file per
process, so tests can compare the masks of engines whose workers run in other processes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedsim.tasks import Batch, TaskContext
from fedsim.tasks.mae import MAEOptions, MAETask


@dataclass(frozen=True)
class RecordingMAEOptions(MAEOptions):
    record_dir: str = ""
    """Folder for ``masks-<pid>.jsonl`` (one row per sample per training forward pass)."""


class RecordingMAETask(MAETask):
    name = "recording_mae"
    Options = RecordingMAEOptions

    def model_inputs(self, model: nn.Module, batch: Batch, context: TaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = super().model_inputs(model, batch, context)
        folder = Path(self.options.record_dir)
        with open(folder / f"masks-{os.getpid()}.jsonl", "a") as sink:
            for sample, row in zip(batch[1][:, 1].tolist(), mask.int().tolist(), strict=True):
                sink.write(json.dumps({"sample": sample, "epoch": context.epoch, "mask": row}) + "\n")
        return x, mask


def read_masks(folder: Path) -> dict[tuple[int, int], list[int]]:
    """Every recorded (sample, epoch) -> mask; a pair drawn twice must have drawn the same mask."""
    masks: dict[tuple[int, int], list[int]] = {}
    for path in sorted(folder.glob("masks-*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            key = (row["sample"], row["epoch"])
            assert masks.setdefault(key, row["mask"]) == row["mask"], f"{key} drew two different masks"
    return masks

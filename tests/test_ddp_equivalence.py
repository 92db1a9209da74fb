"""Gradient averaging, proven: 2 gloo ranks with batch b == central training with batch 2b.

One real torchrun job (``torchrun --standalone --nproc-per-node 2 -m fedsim run FILE``) trains
every task of the experiment file below; the central engine then trains the same tasks in this
process with the doubled batch. Plain SGD, float64, one thread, dropout off, two epochs of two
steps (so the per-epoch reshuffle is exercised), masks keyed by (seed, sample index).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import fedsim
from fedsim.checkpoint import load_checkpoint
from fedsim.config import load_experiment
from fedsim.engines.common import build_model, load_task_data
from fedsim.engines.parallel.launch import run_with_timeout

PER_RANK_BATCH = 8
TASKS: dict[str, dict[str, Any]] = {
    "exam_net": {},
    "bn_cnn": {},
    "dual_head_vit": {"depth": 2, "dropout": 0.0},
    "mae": {"probe_epochs": 1, "finetune_epochs": 0, "plot_images": 0},
    # The few-shot backbone (bn_cnn on base classes 0-4); a couple of episodes keep the end cheap.
    "fewshot_dc": {"episodes": 2, "shots": [1], "queries": 3},
}
# MAE masks are keyed by (seed, sample index, epoch): across epochs a sample lands on another rank
# and must still draw the central run's mask, so the MAE runs the same 2 epochs x 2 steps.
RUN_TRAIN: dict[str, str] = {}

EXPERIMENT = """
name = "equiv"
mode = "ddp"
[train]
epochs = 2
max_steps = 2
batch_size = {batch}
lr = 0.05
dtype = "float64"
threads = 1
progress = false
[ddp]
nproc = 2
sync_bn = true
"""


def _experiment_text(batch: int) -> str:
    text = EXPERIMENT.format(batch=batch)
    for task, options in TASKS.items():
        text += f'\n[[runs]]\nname = "{task}"\ntask = "{task}"\n'
        if options:
            text += "[runs.task_options]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in options.items())
        if task in RUN_TRAIN:
            text += "[runs.train]\n" + RUN_TRAIN[task]
    return text


def _initial_state(path: str, name: str) -> dict[str, torch.Tensor]:
    run = next(r for r in load_experiment(path).runs if r.name == name)
    task, split = load_task_data(run)
    return build_model(task, split, run, torch.device("cpu")).state_dict()


def _toml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


@pytest.mark.slow
def test_two_ranks_equal_central_large_batch(tmp_path: Path, repo_root: str) -> None:
    # Prepare
    exp = tmp_path / "equiv.toml"
    exp.write_text(_experiment_text(PER_RANK_BATCH))
    # Execute: the same CLI under torchrun (every run of the file in one job).
    code = run_with_timeout([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "fedsim", "run", str(exp), "--out", str(tmp_path / "ddp")], 420,
                            what="torchrun equivalence job")
    assert code == 0
    central = fedsim.run(str(exp), [f"train.batch_size={2 * PER_RANK_BATCH}", "mode=central"],
                         out=str(tmp_path / "central"), quiet=True)
    # Assert: same parameters (and BatchNorm buffers) after 4 steps, for every task.
    for summary in central:
        name = summary["name"]
        ddp_state = load_checkpoint(tmp_path / "ddp" / "equiv" / name / "checkpoint.pt")
        assert ddp_state["step"] == 4 and ddp_state["engine_state"]["world_size"] == 2
        central_state = summary["model"].state_dict()
        assert ddp_state["model"].keys() == central_state.keys(), name
        worst = max(float((ddp_state["model"][k].double() - v.double()).abs().max()) for k, v in central_state.items())
        initial = _initial_state(str(exp), name)
        moved = max(float((initial[k].double() - v.double()).abs().max()) for k, v in central_state.items())
        assert moved > 1e-4, f"{name}: training did not move the parameters"
        print(f"{name}: max abs difference DDP x2 vs central = {worst:.3g} (parameters moved up to {moved:.3g})")
        assert worst < 1e-5, f"{name}: max abs difference {worst:.3g}"
        # Metrics of rank 0 are the all-reduced means and were written once.
        lines = (tmp_path / "ddp" / "equiv" / name / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == (1 if name in RUN_TRAIN else 2)
    assert {s["name"] for s in central} == set(TASKS)
    assert torch.get_default_dtype() == torch.float32

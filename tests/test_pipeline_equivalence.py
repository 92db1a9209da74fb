"""Pipelined training == single-process gradient accumulation over the same microbatches.

Prepare: one experiment file per world size holding every (task, schedule) case, run by a real
``torchrun`` (gloo, CPU, float64, plain SGD, one thread, 3 steps). Execute: each case's reference
in this process: the same seeded model and the same batches, each cut into the same microbatches
(replica ``d`` takes samples ``d::dp``, then ``m`` equal chunks), ``loss / (dp * m)`` backpropagated
per microbatch, one SGD step per batch. Assert: max abs difference of every parameter (and, with
one replica, every buffer, e.g. BatchNorm statistics) < 1e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch

from fedsim.checkpoint import load_checkpoint
from fedsim.config import RunConfig, load_experiment
from fedsim.engines.common import build_model, load_task_data
from fedsim.engines.parallel.pipeline import FullBatches
from fedsim.tasks import move_batch
from fedsim.train import configure_torch, make_loader

pytestmark = pytest.mark.slow

STEPS = 3
COMMON: dict[str, Any] = {
    "mode": "pipeline",
    "train": {"epochs": 1, "max_steps": STEPS, "batch_size": 16, "lr": 0.05, "optimizer": "sgd",
              "dtype": "float64", "threads": 1, "device": "cpu", "progress": False},
    "pipeline": {"stages": 2, "microbatches": 4},
}
MAE_OPTIONS = {"probe_epochs": 1, "finetune_epochs": 0, "plot_images": 0}

# (task, schedule, task_options); interleaved only where the split allows >= 2 * stages pieces.
TWO_RANK_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("exam_net", "gpipe", {}),
    ("exam_net", "1f1b", {}),
    ("linear_ae", "gpipe", {}),
    ("linear_ae", "1f1b", {}),
    ("bn_cnn", "gpipe", {}),
    ("bn_cnn", "1f1b", {}),
    ("bn_cnn", "interleaved_1f1b", {}),
    ("dual_head_vit", "gpipe", {}),
    ("dual_head_vit", "1f1b", {}),
    ("dual_head_vit", "interleaved_1f1b", {}),
    ("mae", "gpipe", MAE_OPTIONS),
    ("mae", "1f1b", MAE_OPTIONS),
    ("mae", "interleaved_1f1b", MAE_OPTIONS),
]
# 2 pipeline replicas x 2 stages = 4 ranks, DDP across the replicas of each stage.
DP_PP_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("bn_cnn", "gpipe", {}),
    ("dual_head_vit", "1f1b", {}),
]


def case_name(task: str, schedule: str) -> str:
    return f"{task}-{schedule}"


def write_experiment(path: Path, name: str, cases: list[tuple[str, str, dict[str, Any]]], dp: int) -> Path:
    runs = []
    for task, schedule, options in cases:
        pipeline: dict[str, Any] = {"schedule": schedule, "dp": dp}
        if schedule == "interleaved_1f1b":
            pipeline["virtual_stages"] = 2
        runs.append({"name": case_name(task, schedule), "task": task, "task_options": options, "pipeline": pipeline})
    path.write_text(tomli_w.dumps({"name": name, **COMMON, "runs": runs}))
    return path


def torchrun(experiment: Path, nproc: int, out: Path, timeout: float = 900) -> None:
    """A real torchrun job on this machine's loopback (stopped by its own process group on timeout)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "fedsim", "run", str(experiment), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise
    assert proc.returncode == 0, output[-6000:]


def reference_state(run: RunConfig) -> dict[str, torch.Tensor]:
    """Single-process gradient accumulation over the pipeline's microbatches."""
    configure_torch(run.train)
    task, split = load_task_data(run)
    model = build_model(task, split, run, torch.device("cpu"))
    optimizer = task.build_optimizers(model, run.train)["model"]
    b, dp, m = run.train.batch_size, run.pipeline.dp, run.pipeline.microbatches
    batches = FullBatches(make_loader(split.train, b * dp, run.train.seed, 0, run.train.shuffle), b * dp)
    for step, (x, y) in enumerate(batches):
        if step >= run.train.max_steps:
            break
        model.train()
        optimizer.zero_grad(set_to_none=True)
        for d in range(dp):
            for xm, ym in zip(x[d::dp].chunk(m), y[d::dp].chunk(m), strict=True):
                (task.loss(model, move_batch((xm, ym), model)) / (dp * m)).backward()
        optimizer.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def max_differences(run: RunConfig, run_dir: Path) -> tuple[float, float]:
    """(max abs diff over parameters, over floating buffers) between the pipeline and the reference."""
    pipelined = load_checkpoint(run_dir / "checkpoint.pt")
    assert pipelined["step"] == STEPS
    expected = reference_state(run)
    task, split = load_task_data(run)
    initial = dict(build_model(task, split, run, torch.device("cpu")).named_parameters())
    params = buffers = moved = 0.0
    assert set(pipelined["model"]) == set(expected)
    for name, value in expected.items():
        if not value.is_floating_point():
            continue
        diff = float((pipelined["model"][name].double() - value.double()).abs().max())
        if name in initial:
            params = max(params, diff)
            moved = max(moved, float((value - initial[name].detach()).abs().max()))
        else:
            buffers = max(buffers, diff)
    assert moved > 1e-4, f"{run.name}: training did not change the parameters ({moved:.3g}); the check is vacuous"
    print(f"{run.name}: max |param diff| = {params:.3g}, max |buffer diff| = {buffers:.3g}, "
          f"max |param change| = {moved:.3g}")
    return params, buffers


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pipeline2")
    experiment = write_experiment(root / "pp2.toml", "pp2", TWO_RANK_CASES, dp=1)
    torchrun(experiment, 2, root / "results")
    return experiment, root / "results" / "pp2"


@pytest.fixture(scope="module")
def dp_pp_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pipeline4")
    experiment = write_experiment(root / "dppp.toml", "dppp", DP_PP_CASES, dp=2)
    torchrun(experiment, 4, root / "results")
    return experiment, root / "results" / "dppp"


def _run(experiment: Path, name: str) -> RunConfig:
    return next(r for r in load_experiment(experiment).runs if r.name == name)


@pytest.mark.parametrize(("task", "schedule"), [(t, s) for t, s, _ in TWO_RANK_CASES])
def test_two_stage_pipeline_matches_gradient_accumulation(two_rank_results: tuple[Path, Path], task: str,
                                                          schedule: str) -> None:
    experiment, root = two_rank_results
    run = _run(experiment, case_name(task, schedule))
    params, buffers = max_differences(run, root / run.name)
    assert params < 1e-5, f"{run.name}: parameters differ by {params:.3g}"
    assert buffers < 1e-5, f"{run.name}: buffers differ by {buffers:.3g}"


@pytest.mark.parametrize(("task", "schedule"), [(t, s) for t, s, _ in DP_PP_CASES])
def test_dp_x_pp_matches_gradient_accumulation(dp_pp_results: tuple[Path, Path], task: str, schedule: str) -> None:
    experiment, root = dp_pp_results
    run = _run(experiment, case_name(task, schedule))
    # Parameters only: DDP broadcasts replica 0's buffers, so running statistics follow replica 0.
    params, _ = max_differences(run, root / run.name)
    assert params < 1e-5, f"{run.name}: parameters differ by {params:.3g}"
    summary = (root / run.name / "summary.json").read_text()
    assert '"dp": 2' in summary and '"stages": 2' in summary

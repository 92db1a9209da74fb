"""Pipeline pieces that need no torchrun: splitting, balancing, checks and their error messages."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsim.config import RunConfig, from_dict
from fedsim.engines.common import build_model, load_task_data
from fedsim.engines.parallel.pipeline import (
    ideal_efficiency,
    probe_boundaries,
    use_cuda,
    validate_run,
)
from fedsim.engines.parallel.pipeline_split import balanced_cuts, check_schedule, make_pieces, plan_split
from fedsim.errors import ConfigError, UnsupportedError
from fedsim.tasks import make_task

TINY = "tests.helpers.tiny_task:TinyTask"


def run_config(task: str = "bn_cnn", pipeline: dict[str, Any] | None = None, **train: Any) -> RunConfig:
    return from_dict(RunConfig, {"task": task, "mode": "pipeline", "pipeline": pipeline or {},
                                 "train": {"progress": False, **train}, "source": "exp.toml"}, "exp.toml")


def plan_for(run: RunConfig) -> Any:
    task, split = load_task_data(run)
    return plan_split(build_model(task, split, run, torch.device("cpu")), task, run)


# ---- balancing (hand-computed) -------------------------------------------------------------------
def test_balanced_cuts_minimise_the_largest_piece() -> None:
    assert balanced_cuts([10, 10, 10, 10], [1, 2, 3], 2) == [2]  # 20 | 20
    assert balanced_cuts([30, 10, 10, 10], [1, 2, 3], 2) == [1]  # 30 | 30
    assert balanced_cuts([5, 5, 5, 5, 5, 5], [1, 2, 3, 4, 5], 3) == [2, 4]  # 10 | 10 | 10
    assert balanced_cuts([10, 10, 10, 10], [3], 2) == [3]  # only one allowed cut: 30 | 10
    # A tie in parameters (the zero-parameter activation goes either way) is broken by layer counts.
    assert balanced_cuts([0, 100, 0, 100], [2, 3], 2) == [2]
    with pytest.raises(ValueError):
        balanced_cuts([1, 1, 1], [1], 3)


def test_bn_cnn_default_split_for_two_stages_is_balanced_by_parameters() -> None:
    # block1..4 = 176, 4672, 9280, 9280 parameters (3x3 convs without bias + BatchNorm), head = 1290.
    # Cuts: block2 -> 176 | 24522, block3 -> 4848 | 19850, block4 -> 14128 | 10570, head -> 23408 | 1290.
    plan = plan_for(run_config(pipeline={"stages": 2}))
    assert plan.split_points == ("block4",)
    assert plan.params == (14128, 10570)
    assert plan_for(run_config(pipeline={"stages": 2, "split": ["balanced"]})).split_points == ("block4",)


def test_explicit_split_and_pieces_share_the_models_modules() -> None:
    run = run_config(pipeline={"stages": 2, "split": ["block3"]})
    task, split = load_task_data(run)
    model = build_model(task, split, run, torch.device("cpu"))
    plan = plan_split(model, task, run)
    assert plan.children_of(0) == ("block1", "block2") and plan.children_of(1) == ("block3", "block4", "head")
    pieces = make_pieces(model, plan)
    assert pieces[1].block3 is model.block3  # shared: training a piece trains the model
    assert set(pieces[0].state_dict()) | set(pieces[1].state_dict()) == set(model.state_dict())
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    assert torch.equal(pieces[1](pieces[0](x)), model(x))


def test_task_default_points_are_used_as_they_are_when_they_fit() -> None:
    plan = plan_for(run_config("exam_net", {"stages": 2}))
    assert plan.split_points == ("output",)
    # 4 pieces of dual_head_vit's 7 layers, balanced among its 6 split points: patch_embed 160,
    # tokens 32 + 17 * 32 = 576, each encoder layer 3168 + 1056 + 2112 + 2080 + 2 * 64 = 8544, head
    # 64 + 330 + 132 = 526. Four blocks in four pieces: the embeddings go with block0, the head with block3.
    plan = plan_for(run_config("dual_head_vit", {"stages": 2, "virtual_stages": 2, "schedule": "interleaved_1f1b"}))
    assert plan.split_points == ("block1", "block2", "block3")
    assert plan.params == (9280, 8544, 8544, 9070)


def test_probe_leaves_batchnorm_statistics_and_rng_alone() -> None:
    run = run_config(pipeline={"stages": 2})
    task, split = load_task_data(run)
    model = build_model(task, split, run, torch.device("cpu"))
    plan = plan_split(model, task, run)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 1, 8, 8)
    rng = torch.get_rng_state()
    boundaries = probe_boundaries(model, plan, (x,))
    assert [tuple(b[0].shape) for b in boundaries] == [(8, 1, 8, 8), (8, 32, 4, 4), (8, 10)]  # block2 pools 8 -> 4
    assert boundaries[1][0].requires_grad and not boundaries[0][0].requires_grad
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(rng, torch.get_rng_state())


def test_the_last_stage_loss_is_the_tasks_output_loss() -> None:
    """The schedule's loss_fn(output, target) is Task.output_loss: on the whole model's output it is
    the task's loss (the composition the other engines use)."""
    run = run_config("dual_head_vit")
    task, split = load_task_data(run)
    model = build_model(task, split, run, torch.device("cpu"))
    x, y = split.train.tensors[0][:6], split.train.tensors[1][:6]
    assert task.has_separable_loss()
    assert torch.equal(task.output_loss(model(x), y), task.loss(model, (x, y)))


def test_ideal_efficiency() -> None:
    assert ideal_efficiency(1, 4) == 1.0
    assert ideal_efficiency(2, 4) == pytest.approx(0.8)  # 1 - 1/5
    assert ideal_efficiency(4, 8) == pytest.approx(1 - 3 / 11)


# ---- errors, each naming the key and the value ------------------------------------------------------
def test_batch_not_divisible_by_microbatches() -> None:
    with pytest.raises(ConfigError, match=r"exp.toml: key 'train.batch_size' = 30: not divisible by "
                                          r"pipeline.microbatches = 4"):
        check_schedule(run_config(pipeline={"microbatches": 4}, batch_size=30))


def test_1f1b_with_fewer_microbatches_than_stages() -> None:
    with pytest.raises(ConfigError, match=r"key 'pipeline.microbatches' = 2: 1f1b needs at least as many "
                                          r"microbatches as stages \(4\)"):
        check_schedule(run_config(pipeline={"schedule": "1f1b", "stages": 4, "microbatches": 2}))
    check_schedule(run_config(pipeline={"schedule": "gpipe", "stages": 4, "microbatches": 2}))  # GPipe may


def test_more_stages_than_layers() -> None:
    with pytest.raises(ConfigError, match=r"key 'pipeline.stages' = 3: 3 stages need 3 pieces but task "
                                          r"'exam_net' splits into at most 2 layers"):
        plan_for(run_config("exam_net", {"stages": 3, "microbatches": 3}))
    with pytest.raises(ConfigError, match=r"2 stages x 2 virtual stages need 4 pieces .* 'linear_ae'"):
        plan_for(run_config("linear_ae", {"stages": 2, "virtual_stages": 2, "schedule": "interleaved_1f1b"}))


def test_unknown_split_point() -> None:
    with pytest.raises(ConfigError, match=r"key 'pipeline.split' = 'blok3': unknown split point; task 'bn_cnn' "
                                          r"allows: block2, block3, block4, head"):
        plan_for(run_config(pipeline={"split": ["blok3"]}))
    with pytest.raises(ConfigError, match=r"'block1': is a layer but not one of the task's split points"):
        plan_for(run_config(pipeline={"split": ["block1"]}))
    with pytest.raises(ConfigError, match=r"names 2 split point\(s\) but 2 pieces need 1"):
        plan_for(run_config(pipeline={"split": ["block2", "block3"]}))
    with pytest.raises(ConfigError, match="distinct and in model order"):
        plan_for(run_config(pipeline={"stages": 3, "split": ["block4", "block2"]}))


def test_schedule_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"'pipeline.virtual_stages' = 1: interleaved_1f1b needs at least 2"):
        check_schedule(run_config(pipeline={"schedule": "interleaved_1f1b"}))
    with pytest.raises(ConfigError, match=r"'pipeline.virtual_stages' = 2: only interleaved_1f1b"):
        check_schedule(run_config(pipeline={"schedule": "gpipe", "virtual_stages": 2}))
    with pytest.raises(ConfigError, match=r"2 x 2 = 4 ranks, but WORLD_SIZE is 2"):
        check_schedule(run_config(pipeline={"dp": 2, "stages": 2}), world_size=2)


def test_gpu_placement_needs_one_gpu_per_stage_process() -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    too_many = gpus + 1
    with pytest.raises(ConfigError, match=rf"'train.device' = 'cuda': the pipeline puts each of its {too_many} "
                                          rf"processes on this node on its own GPU"):
        use_cuda(run_config(device="cuda"), too_many)
    assert use_cuda(run_config(device="auto"), too_many) is False  # auto falls back to gloo on the CPU
    assert use_cuda(run_config(device="cpu"), 1) is False


def test_a_task_that_cannot_be_split_says_why() -> None:
    assert make_task("gan").pipeline_reason
    with pytest.raises(UnsupportedError, match="task 'gan' cannot be pipelined: two players trained alternately"):
        validate_run(run_config("gan"))


def test_fedsim_run_reports_a_bad_pipeline_before_launching(tmp_path: Path, repo_root: str) -> None:
    experiment = tmp_path / "bad.toml"
    experiment.write_text('task = "bn_cnn"\nmode = "pipeline"\n[pipeline]\nsplit = ["nope"]\n')
    result = subprocess.run([sys.executable, "-m", "fedsim", "run", str(experiment), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=repo_root,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert "key 'pipeline.split' = 'nope': unknown split point" in result.stderr
    assert "launching" not in result.stderr  # no torchrun was started
    assert not (tmp_path / "bad").exists()


def test_every_stack_task_declares_split_points() -> None:
    for name in ("exam_net", "linear_ae", "bn_cnn", "dual_head_vit", "mae"):
        task = make_task(name)
        assert task.pipeline_split_points, name
        task.require("pipeline")


def test_run_config_is_frozen_so_overrides_make_new_runs() -> None:
    run = run_config()
    assert dataclasses.replace(run.pipeline, stages=4).stages == 4 and run.pipeline.stages == 2

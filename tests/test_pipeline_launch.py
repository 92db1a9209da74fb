"""Both launch paths of experiments/pipeline_digits.toml, and resume across them.

Prepare: the experiment file, cut to 3 steps per epoch. Execute: (1) ``torchrun --standalone
--nproc-per-node 2 -m fedsim run`` for all its runs, 2 epochs; (2) ``fedsim run --only gpipe``
(which starts torchrun itself) for 1 epoch; (3) the same run continued to 2 epochs with
``--resume``. Assert: every run wrote its metrics, summary and checkpoint; the schedules agree
with each other; the resumed run ends with exactly the uninterrupted run's weights (SGD momentum
state and the epoch order survive the restart).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedsim.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

EXPERIMENT = "experiments/pipeline_digits.toml"
FAST = ["--set", "train.max_steps=3", "--set", "train.threads=1"]


def run_cli(cmd: list[str], cwd: str, timeout: float = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # torchrun and its workers are in this process group
        proc.communicate()
        raise
    assert proc.returncode == 0, output[-6000:]
    return output


def test_both_launch_paths_write_results_and_resume_matches(tmp_path: Path, repo_root: str) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    output = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      "-m", "fedsim", "run", EXPERIMENT, "--out", str(full), "--set", "train.epochs=2", *FAST],
                     repo_root)
    assert "pipeline_digits: final metrics" in output
    runs = ["gpipe", "1f1b", "interleaved", "balanced"]
    weights = {}
    for name in runs:
        folder = full / "pipeline_digits" / name
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["mode"] == "pipeline" and summary["steps"] == 6 and summary["pipeline"]["stages"] == 2
        assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2
        assert summary["metrics"]["accuracy"] > 0.2  # 6 SGD steps of a CNN on 10 classes: above chance
        weights[name] = load_checkpoint(folder / "checkpoint.pt")["model"]
    # Same split (block3) and same microbatches: GPipe and 1F1B compute the same step (float32).
    for key, value in weights["gpipe"].items():
        assert torch.allclose(value.double(), weights["1f1b"][key].double(), atol=1e-5), key
    assert json.loads((full / "pipeline_digits" / "interleaved" / "summary.json").read_text())["pipeline"][
        "split"] == ["block2", "block3", "block4"]

    output = run_cli([sys.executable, "-m", "fedsim", "run", EXPERIMENT, "--only", "gpipe", "--out", str(cut),
                      "--set", "train.epochs=1", *FAST], repo_root)
    assert "launching" in output and "torch.distributed.run" in output
    assert load_checkpoint(cut / "pipeline_digits" / "gpipe" / "checkpoint.pt")["epoch"] == 1
    run_cli([sys.executable, "-m", "fedsim", "run", EXPERIMENT, "--only", "gpipe", "--out", str(cut), "--resume",
             "--set", "train.epochs=2", *FAST], repo_root)
    resumed = load_checkpoint(cut / "pipeline_digits" / "gpipe" / "checkpoint.pt")
    assert resumed["epoch"] == 2 and resumed["step"] == 6
    for key, value in weights["gpipe"].items():
        assert torch.equal(value, resumed["model"][key]), key
    history = [json.loads(line) for line in (cut / "pipeline_digits" / "gpipe" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]

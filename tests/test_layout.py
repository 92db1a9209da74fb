"""The package layout's import contracts (pyproject's [tool.importlinter]) hold, and they have teeth:
an upward import, a cycle between siblings, or a strategy importing an engine each break one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy under test, not the installed checkout
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    for name in ("fedsim", "strategies"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def append(path: Path, code: str) -> None:
    path.write_text(path.read_text() + "\n\n" + code + "\n")


def test_the_contracts_hold(copy: Path) -> None:
    result = lint(copy)
    assert result.returncode == 0, result.stdout
    assert "4 kept, 0 broken" in result.stdout


def test_an_upward_import_inside_a_function_breaks_the_layers(copy: Path) -> None:
    append(copy / "fedsim" / "train.py", "def _reach_up() -> None:\n    from fedsim.engines import central  # noqa: F401")
    result = lint(copy)
    assert result.returncode != 0
    assert "fedsim's layers: imports only go downwards BROKEN" in result.stdout
    assert "fedsim.train -> fedsim.engines.central" in result.stdout


def test_a_cycle_between_sibling_modules_is_found(copy: Path) -> None:
    # data_parallel is imported by ddp; importing ddp back (even lazily) closes a cycle in one layer.
    append(copy / "fedsim" / "engines" / "parallel" / "data_parallel.py",
           "def _back() -> None:\n    from fedsim.engines.parallel import ddp  # noqa: F401")
    result = lint(copy)
    assert result.returncode != 0
    assert "no import cycles between sibling packages or modules BROKEN" in result.stdout


def test_a_strategy_importing_an_engine_is_forbidden(copy: Path) -> None:
    append(copy / "strategies" / "math.py", "def _engine() -> None:\n    import fedsim.engines.central  # noqa: F401")
    result = lint(copy)
    assert result.returncode != 0
    assert "strategies never import an engine BROKEN" in result.stdout

"""The central-vs-federated comparison with a virtual clock: hours to the target, ``report.target``, 120 columns.

Hand-built ``summary.json`` dicts (no training): central runs carry ``_samples_per_epoch`` so the
comparison does not load their data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fedsim.errors import FedsimError
from fedsim.reports.compare import COLUMNS, _hours, comparison, report, write_comparison

WIDTH = 120


def central(final: float = 1.0, seed: int = 0, epochs: int = 4) -> dict[str, Any]:
    history = [{"epoch": e, "test_accuracy": final * (e + 1) / (epochs + 1)} for e in range(epochs)]
    history.append({"epoch": epochs, "test_accuracy": final})
    return {"name": "central", "mode": "central", "seed": seed, "config": {}, "_samples_per_epoch": 1437,
            "metrics": {"accuracy": final, "loss": 0.1}, "history": history, "wall_time_s": 3.0 + seed}


def federated(name: str, accuracies: list[float], sim_times: list[float] | None, *, seed: int = 0,
              strategy: str = "fedavg", options: dict[str, Any] | None = None, partition: str = "iid",
              alpha: float = 1.0, total: float | None = None) -> dict[str, Any]:
    """A federated run's summary; ``sim_times`` None: an old summary written before the virtual clock."""
    history = []
    for r, accuracy in enumerate(accuracies):
        record = {"round": r, "test_accuracy": accuracy, "samples_total": 575.0 * r}
        if sim_times is not None:
            record["sim_time_s"] = sim_times[r]
        history.append(record)
    metrics = {"accuracy": accuracies[-1], "bytes_total": 20609600.0, "samples_total": 575.0 * (len(accuracies) - 1),
               "client_accuracy_worst10": 0.5 + 0.01 * seed}
    if sim_times is not None:
        metrics["sim_time_s"] = sim_times[-1] if total is None else total
    fed = {"strategy": strategy, "strategy_options": options or {}, "partition": partition, "alpha": alpha}
    return {"name": name, "mode": "federated", "seed": seed, "config": {"federated": fed}, "metrics": metrics,
            "history": history, "rounds": len(accuracies) - 1, "wall_time_s": 10.0 + seed}


CLOCK = [0.0, 1800.0, 3600.0, 5400.0]  # half an hour per round


def row(table: dict[str, Any], name: str) -> dict[str, Any]:
    """The run's cells by column name, plus its numbers under ``numbers``."""
    cells = next(r for r in table["rows"] if r[0] == name)
    out = dict(zip(table["columns"], cells, strict=True))
    out["numbers"] = next(n for n in table["numbers"] if n["run"] == name)
    return out


def test_hours_to_target_on_a_hand_made_history() -> None:
    # central final 1.0 -> threshold 0.9: crossed at round 2, whose clock reads 3600 s = 1 h
    table = comparison([central(1.0), federated("fed", [0.1, 0.5, 0.92, 0.95], CLOCK, total=6000.0)])
    assert table["threshold"] == pytest.approx(0.9) and table["target"] == 0.9
    fed = row(table, "fed")
    assert fed["rounds to 90% central"] == "2.0"
    assert fed["sim time to 90% central"] == "60.0 min"
    assert fed["numbers"]["sim_hours_to_target"] == [1.0]
    assert fed["numbers"]["sim_hours_total"] == pytest.approx(6000.0 / 3600)  # metrics.sim_time_s wins
    cent = row(table, "central")
    assert cent["sim time to 90% central"] == "-" and cent["numbers"]["sim_hours_to_target"] == []
    assert cent["numbers"]["sim_hours_total"] is None


def test_round_zero_never_counts_and_the_total_falls_back_to_the_last_round() -> None:
    fed = federated("fed", [0.95, 0.5, 0.6, 0.91], CLOCK)
    del fed["metrics"]["sim_time_s"]
    table = comparison([central(1.0), fed])
    assert row(table, "fed")["sim time to 90% central"] == "90.0 min"
    assert row(table, "fed")["numbers"]["sim_hours_total"] == pytest.approx(1.5)


def test_mean_std_partial_seeds_and_not_reached() -> None:
    runs = [central(1.0, seed) for seed in range(3)]
    for seed, accuracies in enumerate([[0.1, 0.91, 0.92, 0.93], [0.1, 0.5, 0.91, 0.93], [0.1, 0.5, 0.6, 0.95]]):
        runs.append(federated("all", accuracies, CLOCK, seed=seed))  # 0.5 h, 1 h, 1.5 h
    for seed, accuracies in enumerate([[0.1, 0.91, 0.92, 0.93], [0.1, 0.5, 0.6, 0.7], [0.1, 0.5, 0.91, 0.93]]):
        runs.append(federated("some", accuracies, CLOCK, seed=seed))  # 0.5 h, never, 1 h
    for seed in range(3):
        runs.append(federated("none", [0.1, 0.5, 0.6, 0.7], CLOCK, seed=seed))
    table = comparison(runs)
    assert row(table, "all")["sim time to 90% central"] == "60.0 ± 30.0 min"
    assert row(table, "all")["rounds to 90% central"] == "2.0 ± 1.0"
    some = row(table, "some")
    assert some["sim time to 90% central"] == "45.0 ± 21.2 min (2/3 seeds)"
    assert some["rounds to 90% central"] == "1.5 ± 0.7 (2/3 seeds)"
    assert some["numbers"]["sim_hours_to_target"] == [0.5, math.inf, 1.0]
    none = row(table, "none")
    assert none["sim time to 90% central"] == "not reached" and none["rounds to 90% central"] == "not in 3 rounds"
    assert none["numbers"]["sim_hours_to_target"] == [math.inf] * 3
    assert none["numbers"]["sim_hours_total"] == pytest.approx(1.5)


def test_old_summaries_without_a_clock_show_a_dash() -> None:
    table = comparison([central(1.0), federated("old", [0.1, 0.5, 0.92, 0.95], None)])
    old = row(table, "old")
    assert old["rounds to 90% central"] == "2.0"  # the rest works as before
    assert old["sim time to 90% central"] == "-"
    assert old["numbers"]["sim_hours_to_target"] == [] and old["numbers"]["sim_hours_total"] is None
    assert table["sim_curves"] == {}


def test_hours_format_two_decimals_or_three_significant_digits() -> None:
    assert _hours([1.234]) == "74.0 min"
    assert _hours([1.0, 1.2]) == "66.0 ± 8.5 min"
    assert _hours([3.0]) == "3.0 h"
    assert _hours([0.0086]) == "31.0 s"
    assert _hours([0.005, 0.006]) == "19.8 ± 2.5 s"
    assert _hours([100.0]) == "4.2 d"
    assert _hours([0.0]) == "0.0 s"


def test_target_changes_the_threshold_and_the_headers() -> None:
    runs = [central(1.0), federated("fed", [0.1, 0.5, 0.92, 0.95], CLOCK)]
    default = comparison(runs)
    assert "rounds to 90% central" in default["columns"] and "sim time to 90% central" in default["columns"]
    table = comparison(runs, "accuracy", target=0.95)
    assert table["threshold"] == pytest.approx(0.95) and table["target"] == 0.95
    assert "rounds to 95% central" in table["columns"] and "sim time to 95% central" in table["columns"]
    assert len(table["columns"]) == len(COLUMNS)
    fed = row(table, "fed")
    assert fed["rounds to 95% central"] == "3.0" and fed["sim time to 95% central"] == "90.0 min"
    assert comparison(runs, target=0.875)["columns"][7] == "rounds to 87.5% central"


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, 90, "0.9", True, None, math.nan, math.inf])
def test_a_bad_target_is_an_error(bad: Any, tmp_path: Path) -> None:
    runs = [central(1.0), federated("fed", [0.1, 0.5, 0.92, 0.95], CLOCK)]
    with pytest.raises(FedsimError, match="target"):
        comparison(runs, target=bad)
    experiment = SimpleNamespace(name="cvf", source="experiments/cvf.toml",
                                 report={"kind": "central_vs_federated", "target": bad})
    with pytest.raises(FedsimError) as error:
        report(experiment, runs, tmp_path)
    message = str(error.value)
    assert "report.target" in message and repr(bad) in message and "experiments/cvf.toml" in message
    assert not (tmp_path / "comparison.md").exists()


def test_report_reads_the_target(tmp_path: Path, capsys: Any) -> None:
    runs = [central(1.0), federated("fed", [0.1, 0.5, 0.92, 0.95], CLOCK)]
    experiment = SimpleNamespace(name="cvf", source="cvf.toml", report={"kind": "central_vs_federated",
                                                                        "metric": "accuracy", "target": 1})
    report(experiment, runs, tmp_path)
    printed = capsys.readouterr().out
    assert "to 100% central" in printed and "sim time to 100%" in printed
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["target"] == 1.0 and "rounds to 100% central" in saved["columns"]


# ---- the experiment's shape: central + 6 federated runs, 3 seeds, long labels ------------------------
RUNS = [("fedavg-iid", "fedavg", {}, "iid", 1.0), ("fedavg-dir1.0", "fedavg", {}, "dirichlet", 1.0),
        ("fedavg-dir0.1", "fedavg", {}, "dirichlet", 0.1),
        ("fedprox-iid", "fedprox", {"proximal_mu": 0.1}, "iid", 1.0),
        ("fedprox-dir1.0", "fedprox", {"proximal_mu": 0.1}, "dirichlet", 1.0),
        ("fedprox-dir0.1", "fedprox", {"proximal_mu": 0.1}, "dirichlet", 0.1)]


def experiment_summaries(clock: bool = True) -> list[dict[str, Any]]:
    """What ``experiments/central_vs_federated.toml`` writes: 3 seeds, 10 rounds, the Dir(0.1) runs miss the
    target on one seed, simulated rounds of 1-3 minutes (so hours both above and below 0.1)."""
    out = []
    for seed in range(3):
        out.append(central([0.9753, 0.9769, 0.9785][seed], seed))
        for i, (name, strategy, options, partition, alpha) in enumerate(RUNS):
            skewed = partition == "dirichlet" and alpha < 1
            tau = (1.5 + 0.3 * i + 0.2 * seed) * (1.5 if skewed else 1)
            ceiling = 0.80 if skewed and seed == 1 else 0.975 - 0.003 * i
            accuracies = [0.1] + [ceiling * (1 - math.exp(-r / tau)) for r in range(1, 11)]
            per_round = 60.0 + 20.0 * i + 7.0 * seed
            times = [per_round * r for r in range(11)] if clock else None
            out.append(federated(name, accuracies, times, seed=seed, strategy=strategy, options=options,
                                 partition=partition, alpha=alpha))
    return out


def printed_lines(capsys: Any) -> list[str]:
    printed = capsys.readouterr().out
    return [line for line in printed.splitlines() if not line.startswith("wrote ")]  # paths are as long as they are


def test_the_experiment_fits_120_columns_with_the_clock_column(tmp_path: Path, capsys: Any) -> None:
    import matplotlib.image

    table = write_comparison(experiment_summaries(), tmp_path, title="central_vs_federated")
    lines = printed_lines(capsys)
    assert lines and all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    printed = "\n".join(lines)
    assert "…" not in printed  # no cell had to be cut to fit
    header = next(line for line in lines if " run " in line)
    assert "to 90% central" in header and "sim time to 90%" in header and "MB sent" in header
    for name, strategy, options, partition, alpha in RUNS:
        line = next(line for line in lines if line.split() and line.split()[0] == name)
        assert strategy + (" mu=0.1" if options else "") in line
        assert ("iid" if partition == "iid" else f"dir({alpha:g})") in line
        assert row(table, name)["sim time to 90% central"].replace(" seeds)", ")") in line  # "(2/3)" on the terminal
        assert "20.6" in line
    assert "0.9769 ± 0.0016" in printed and "(2/3)" in printed
    assert all(row(table, name)["sim time to 90% central"].split(" (")[0].endswith((" s", " min", " h", " d", "reached"))
               for name, *_ in RUNS)  # every cell has its unit

    markdown = (tmp_path / "comparison.md").read_text()
    assert markdown.splitlines()[0] == "| " + " | ".join(table["columns"]) + " |"
    assert "sim time to 90% central" in markdown and "dirichlet(0.1)" in markdown and "(2/3 seeds)" in markdown
    assert "| samples |" in markdown and "wall s" in markdown
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["target"] == 0.9
    numbers = {n["run"]: n for n in saved["numbers"]}
    assert numbers["fedavg-iid"]["sim_hours_total"] == pytest.approx((600 + 670 + 740) / 3 / 3600)  # 60, 67, 74 s per round
    assert math.inf in numbers["fedavg-dir0.1"]["sim_hours_to_target"]  # written as Infinity
    assert numbers["central"]["sim_hours_total"] is None

    assert table["plot_panels"] == 3
    three = matplotlib.image.imread(tmp_path / "comparison.png").shape[1]
    write_comparison(experiment_summaries(clock=False), tmp_path / "old", title="central_vs_federated")
    lines = printed_lines(capsys)
    assert all(len(line) <= WIDTH for line in lines) and "…" not in "\n".join(lines)
    two = matplotlib.image.imread(tmp_path / "old" / "comparison.png").shape[1]
    assert three == pytest.approx(two * 3 / 2, rel=0.01)
    assert json.loads((tmp_path / "old" / "comparison.json").read_text())["numbers"][1]["sim_hours_to_target"] == []

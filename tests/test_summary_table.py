"""The generic table ``fedsim run`` prints first: fits 120 columns, figures in human units."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fedsim
from fedsim.config import RunConfig, experiment_from_dict
from fedsim.results import MISSING, make_summary, summary_table

WIDTH = 120


def runs() -> dict[str, RunConfig]:
    experiment = experiment_from_dict({
        "name": "cvf", "task": "bn_cnn", "seeds": [0, 1, 2],
        "federated": {"engine": "local", "num_clients": 20, "clients_per_round": 10, "rounds": 10},
        "runs": [{"name": "central", "mode": "central"},
                 {"name": "fedprox-dir0.1", "mode": "federated", "federated": {"strategy": "fedprox"}},
                 {"name": "ae", "mode": "central", "task": "linear_ae"}],
    })
    return {run.name: run for run in experiment.runs}


def summaries() -> list[dict[str, Any]]:
    """Three seeds of a central and a federated run, with the metrics each engine writes."""
    configs, out = runs(), []
    for seed, (acc_c, acc_f, wall) in enumerate([(0.97, 0.90, 10.0), (0.98, 0.92, 12.0), (0.99, 0.94, 14.0)]):
        central = make_summary(configs["central"], {"accuracy": acc_c, "loss": 0.1, "train_loss": 0.05},
                               primary_metric="accuracy", started=0.0, extra={"epochs": 4, "steps": 360, "history": []})
        federated = make_summary(configs["fedprox-dir0.1"], {
            "accuracy": acc_f, "loss": 0.3, "best_accuracy": acc_f, "client_accuracy_mean": 0.8,
            "client_accuracy_worst10": 0.5, "bytes_total": 20609600.0, "samples_total": 5750.0,
            "failed_client_rounds": 0}, primary_metric="accuracy", started=0.0, extra={"rounds": 10, "history": [], "engine": "local"})
        for summary in (central, federated):
            summary["seed"], summary["wall_time_s"] = seed, wall
        out += [central, federated]
    return out


def cells(table: str, run: str) -> list[str]:
    line = next(line for line in table.splitlines() if f" {run} " in line)
    return [cell.strip() for cell in line.strip("│┃ ").split("│")]


def header(table: str) -> list[str]:
    line = next(line for line in table.splitlines() if " run " in line)
    return [cell.strip() for cell in line.strip("│┃ ").split("┃")]


def test_engines_write_the_tasks_primary_metric(tmp_path: Path) -> None:
    train = {"epochs": 0, "progress": False, "checkpoint": False}
    for task, primary in (("bn_cnn", "accuracy"), ("linear_ae", "recon_mse")):
        summary = fedsim.run({"name": task, "task": task, "train": train}, out=tmp_path, quiet=True)[0]
        assert summary["primary_metric"] == primary
        assert json.loads((tmp_path / task / task / "summary.json").read_text())["primary_metric"] == primary


def test_table_fits_120_columns_with_human_units(capsys: Any) -> None:
    table = summary_table(summaries(), title="cvf: final metrics (mean ± std over seeds)", width=WIDTH)
    printed = capsys.readouterr().out
    assert printed == table
    lines = table.splitlines()
    assert all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    assert header(table) == ["run", "mode", "seeds", "accuracy", "MB sent", "samples", "wall s"]
    assert cells(table, "central") == ["central", "central", "3", "0.9800 ± 0.0100", MISSING, MISSING, "12.0 ± 2.0"]
    assert cells(table, "fedprox-dir0.1") == ["fedprox-dir0.1", "federated", "3", "0.9200 ± 0.0200", "20.6", "5,750",
                                              "12.0 ± 2.0"]
    # one line per run: nothing wraps (title, 3 header lines, 2 rows, bottom border)
    assert len(lines) == 1 + 3 + 2 + 1


def test_long_names_are_shortened_in_the_middle_and_other_metrics_stay_out() -> None:
    long_name = "fedprox-" + "x" * 150 + "-dir0.1"
    rows = summaries()
    for summary in rows:
        if summary["name"] == "fedprox-dir0.1":
            summary["name"] = long_name
    table = summary_table(rows, width=WIDTH)
    assert all(len(line) <= WIDTH for line in table.splitlines())
    shortened = next(line for line in table.splitlines() if "…" in line)
    assert "fedprox-x" in shortened and "x-dir0.1" in shortened and "20.6" in shortened
    assert "client_accuracy_worst10" not in table and "best_accuracy" not in table


def test_mixed_primary_metrics_and_missing_values() -> None:
    configs = runs()
    ae = make_summary(configs["ae"], {"recon_mse": 0.0123, "loss": 0.02}, primary_metric="recon_mse", started=0.0)
    gone = make_summary(configs["central"], {"loss": 0.5}, primary_metric="accuracy", started=0.0)  # no accuracy: falls back to loss
    gone["name"], gone["primary_metric"] = "old", ""
    table = summary_table([*summaries(), ae, gone], width=WIDTH)
    assert all(len(line) <= WIDTH for line in table.splitlines())
    assert header(table)[3] == "main metric"
    assert cells(table, "ae")[3] == "recon_mse 0.0123"
    assert cells(table, "old")[3] == "loss 0.5000"
    assert cells(table, "central")[3] == "accuracy 0.9800 ± 0.0100"
    assert cells(table, "ae")[4:6] == [MISSING, MISSING]


def test_the_comparison_report_fits_120_columns(tmp_path: Path, capsys: Any) -> None:
    """The central-vs-federated report prints its key columns in 120 columns; comparison.md keeps all."""
    from fedsim.reports.compare import COLUMNS, write_comparison

    table = write_comparison(summaries(), tmp_path, title="central_vs_federated")
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if not line.startswith("wrote ")]  # file paths are as long as they are
    assert lines and all(len(line) <= WIDTH for line in lines)
    assert "0.9800 ± 0.0100" in printed and "0.9200 ± 0.0200" in printed and "20.6" in printed
    markdown = (tmp_path / "comparison.md").read_text()
    assert markdown.splitlines()[0] == "| " + " | ".join(table["columns"]) + " |"
    assert len(table["columns"]) == len(COLUMNS) and "wall s" in markdown

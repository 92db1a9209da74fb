"""The virtual clock: hand-computed per-client and per-round times under each waiting policy, sampling only
clients that are online, and the clock inside real federated runs (same seed, same clock).

Profiles come from device traces written here, so every time below is computed by hand from
bytes * 8 / bandwidth + samples / speed.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fedsim.config import SystemConfig, experiment_from_dict, over_selected
from fedsim.engines.common import RunContext
from fedsim.engines.federated import flower_app
from fedsim.engines.federated.clock import (
    message_array_bytes,
    plan_round,
    planned_samples,
    sample_available,
    units_within,
)
from fedsim.engines.federated.devices import DAY_S, Devices
from fedsim.engines.federated.engine import run_federated
from fedsim.errors import ConfigError
from fedsim.results import RunDir
from fedsim.wire.array_codec import arrays_to_record, npy_size

# A model of two float32 arrays: np.save writes 128 header bytes + the payload for each.
MODEL = {"w": np.zeros(10, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
MODEL_BYTES = 128 + 40 + 128 + 8
ONE_SECOND_MBPS = MODEL_BYTES * 8 / 1e6  # a bandwidth that moves the model in exactly one second


def np_save_size(array: np.ndarray) -> int:
    stream = io.BytesIO()
    np.save(stream, array)
    return len(stream.getvalue())


def write_trace(path: Path, rows: list[tuple[int, float, float, float]]) -> Path:
    path.write_text("client_id,compute_sps,down_mbps,up_mbps\n" + "".join(f"{k},{c!r},{d!r},{u!r}\n"
                                                                           for k, c, d, u in rows))
    return path


def devices_of(tmp_path: Path, rows: list[tuple[int, float, float, float]], num_clients: int = 4,
               availability: str = "", **system: Any) -> Devices:
    trace = write_trace(tmp_path / "devices.csv", rows)
    extra: dict[str, Any] = {"device_trace": str(trace)}
    if availability:
        (tmp_path / "online.csv").write_text("client_id,start_s,end_s\n" + availability)
        extra["availability_trace"] = str(tmp_path / "online.csv")
    return Devices(SystemConfig(**extra, **system), num_clients, seed=0, base_dir=tmp_path)


# ---- bytes and samples -----------------------------------------------------------------------------
def test_array_bytes_are_np_save_bytes_without_serialising() -> None:
    for dtype in ("float32", "float64", "int64", "uint8"):
        for shape in ((), (3,), (64, 1, 3, 3), (1000,), (0,), (2,) * 7):
            assert npy_size(dtype, shape) == np_save_size(np.zeros(shape, dtype=dtype)), (dtype, shape)
    # Sizes are cached by the arguments as given: other spellings of a dtype and list shapes agree.
    for given in (np.dtype("float32"), "<f4", np.float32, "float32"):
        for shape in ([64, 1, 3, 3], (64, 1, 3, 3)):
            assert npy_size(given, shape) == np_save_size(np.zeros((64, 1, 3, 3), dtype=np.float32)), (given, shape)
    assert npy_size(">f8", (3, 2)) == np_save_size(np.zeros((3, 2), dtype=">f8"))
    content = RecordDict({"arrays": arrays_to_record(MODEL), "config": ConfigRecord({"lr": 0.1}),
                          "client-state": arrays_to_record({"c": np.zeros(5)})})
    assert message_array_bytes(content, skip=("client-state",)) == MODEL_BYTES
    assert message_array_bytes(content) == MODEL_BYTES + np_save_size(np.zeros(5))


def test_planned_samples_are_what_the_loader_yields() -> None:
    assert planned_samples(45, 10, epochs=3) == 135
    # steps cycle through epochs of ceil(45/10) = 5 batches: 10, 10, 10, 10, 5
    assert [planned_samples(45, 10, steps=s) for s in (1, 4, 5, 6, 11)] == [10, 40, 45, 55, 100]
    assert planned_samples(3, 10, steps=4) == 12  # a client smaller than a batch: every step is the whole client


# ---- one round, by hand ------------------------------------------------------------------------------
# Four clients, every one moving the model in 1 s each way at 10 samples/s with 10, 20, 40, 80 samples:
# one epoch takes 1 + (1, 2, 4, 8) + 1 = 3, 4, 6, 10 s.
SIZES = {0: 10, 1: 20, 2: 40, 3: 80}
ROWS = [(k, 10.0, ONE_SECOND_MBPS, ONE_SECOND_MBPS) for k in range(4)]


def plan(devices: Devices, **kwargs: Any) -> Any:
    args: dict[str, Any] = {"start_s": 0.0, "sampled": [0, 1, 2, 3], "devices": devices,
                            "bytes_down": dict.fromkeys(range(4), MODEL_BYTES),
                            "bytes_up": dict.fromkeys(range(4), MODEL_BYTES), "n_train": SIZES, "batch_size": 10,
                            "full_units": 1, "by_steps": False, "aggregate": 4}
    args.update(kwargs)
    return plan_round(**args)


def test_per_client_times_and_waiting_for_every_reply(tmp_path: Path) -> None:
    p = plan(devices_of(tmp_path, ROWS))
    assert {k: t.total_s for k, t in p.times.items()} == pytest.approx({0: 3.0, 1: 4.0, 2: 6.0, 3: 10.0}, abs=1e-12)
    assert [(t.down_s, t.compute_s, t.up_s) for t in p.times.values()][1] == pytest.approx((1.0, 2.0, 1.0))
    assert p.send == p.aggregated == [0, 1, 2, 3] and p.late == [] and p.offline == []
    assert p.round_s == pytest.approx(10.0)
    # a simulated dropout is sent (it raises) but never replies: the round ends at the last reply
    p = plan(devices_of(tmp_path, ROWS), no_reply=[3])
    assert p.send == [0, 1, 2, 3] and p.aggregated == [0, 1, 2] and p.round_s == pytest.approx(6.0)
    # two local epochs double the compute
    p = plan(devices_of(tmp_path, ROWS), full_units=2)
    assert p.times[3].total_s == pytest.approx(18.0) and p.round_s == pytest.approx(18.0)


def test_over_selection_aggregates_the_first_k(tmp_path: Path) -> None:
    assert over_selected(2, 1.0) == 4 and over_selected(10, 0.3) == 13 and over_selected(3, 0.0) == 3
    p = plan(devices_of(tmp_path, ROWS), aggregate=2)
    assert p.aggregated == p.send == [0, 1] and p.late == [2, 3]
    assert p.round_s == pytest.approx(4.0)  # the 2nd reply
    # a dropout among the fastest: the next one takes its place
    p = plan(devices_of(tmp_path, ROWS), aggregate=2, no_reply=[0])
    assert p.aggregated == [1, 2] and p.late == [3] and p.round_s == pytest.approx(6.0)


def test_deadline_drops_or_keeps_partial_work(tmp_path: Path) -> None:
    devices = devices_of(tmp_path, ROWS)
    p = plan(devices, deadline_s=7.0)
    assert p.aggregated == p.send == [0, 1, 2] and p.late == [3]
    assert p.round_s == pytest.approx(7.0)  # a reply is missing: the server waits until the deadline
    p = plan(devices, deadline_s=12.0)
    assert p.aggregated == [0, 1, 2, 3] and p.round_s == pytest.approx(10.0)  # everyone made it
    # partial work, two local epochs (4, 6, 10, 18 s): client 3 fits (12 - 2) s x 10/s = 100 samples = 1 epoch
    p = plan(devices, full_units=2, deadline_s=12.0, late_work="partial")
    assert p.aggregated == [0, 1, 2, 3] and p.partial == {3: 1} and p.late == []
    assert p.times[3].total_s == pytest.approx(10.0) and p.times[3].samples == 80
    assert p.round_s == pytest.approx(10.0)
    # deadline 3.5 s: client 0 fits one epoch (3 s), client 1 cannot fit one (2 s of compute > 1.5 s)
    p = plan(devices, full_units=2, deadline_s=3.5, late_work="partial")
    assert p.aggregated == [0] and p.partial == {0: 1} and p.late == [1, 2, 3] and p.round_s == pytest.approx(3.5)
    assert units_within(1.5, devices.profile(1), 20, 10, 2, by_steps=False) == 0


def test_deadline_partial_work_in_steps(tmp_path: Path) -> None:
    devices = devices_of(tmp_path, ROWS)
    # 5 steps of 10 samples (client 0's 10 samples cycled 5 times): 1 + 5 + 1 = 7 s for everyone; a 5.2 s
    # deadline leaves 3.2 s of compute = 32 samples = 3 steps
    p = plan(devices, full_units=5, by_steps=True, deadline_s=12.0)
    assert all(t.samples == 50 and t.total_s == pytest.approx(7.0) for t in p.times.values())
    p = plan(devices, full_units=5, by_steps=True, deadline_s=5.2, late_work="partial")
    assert p.times[0].samples == 30 and p.times[0].total_s == pytest.approx(5.0)
    assert p.partial == {0: 3, 1: 3, 2: 3, 3: 3} and p.round_s == pytest.approx(5.0)


def test_bandwidth_prices_each_direction(tmp_path: Path) -> None:
    rows = [(0, 100.0, 8e-6 * MODEL_BYTES, 2e-6 * MODEL_BYTES)]  # 1 s down, 4 s up
    devices = devices_of(tmp_path, rows, num_clients=1)
    p = plan(devices, sampled=[0], aggregate=1)
    assert (p.times[0].down_s, p.times[0].compute_s, p.times[0].up_s) == pytest.approx((1.0, 0.1, 4.0))


# ---- availability ------------------------------------------------------------------------------------
def test_only_online_clients_are_sampled(tmp_path: Path) -> None:
    # client 1 is online 0-100 s of the day only, client 2 never before 1000 s; the rest always
    devices = devices_of(tmp_path, ROWS, availability="1,0,100\n2,1000,2000\n")
    for r in range(1, 30):
        start, cohort = sample_available(7, r, 4, 3, devices, 500.0)
        assert start == 500.0 and cohort == [0, 3]  # 1 and 2 are offline at 500 s: never sampled
        start, cohort = sample_available(7, r, 4, 2, devices, 50.0)
        assert 2 not in cohort and len(cohort) == 2
    # a client whose window ends before its reply is uploaded is offline, not aggregated
    p = plan(devices, start_s=95.0)  # client 1 needs 4 s, its window ends at 100 s: it makes it
    assert p.aggregated == [0, 1, 3] and p.offline == [2]
    p = plan(devices, start_s=97.0)
    assert p.offline == [1, 2] and 1 not in p.send and p.aggregated == [0, 3]


def test_a_round_waits_for_the_first_client_to_come_online(tmp_path: Path) -> None:
    devices = devices_of(tmp_path, ROWS, availability="".join(f"{k},3600,7200\n" for k in range(4)))
    start, cohort = sample_available(0, 1, 4, 2, devices, 100.0)
    assert start == 3600.0 and len(cohort) == 2
    start, cohort = sample_available(0, 1, 4, 2, devices, 7300.0)  # the next day's window
    assert start == DAY_S + 3600.0


# ---- in real runs ---------------------------------------------------------------------------------------
EPOCHS, BATCH = 2, 10


def synthetic_run(tmp_path: Path, **system: Any) -> dict[str, Any]:
    rows = [(k, 50.0 + 25 * k, 1.0 + k, 0.5 + k / 2) for k in range(8)]
    trace = write_trace(tmp_path / "devices.csv", rows)
    return {
        "name": "clock", "task": "logreg", "mode": "federated",
        "data": {"name": "fedprox_synthetic", "test_fraction": 0.1,
                 "options": {"alpha": 1.0, "beta": 1.0, "num_clients": 8, "size_cap": 80}},
        "train": {"lr": 0.01, "batch_size": BATCH, "progress": False, "threads": 1, "checkpoint": False},
        "federated": {"engine": "local", "partition": "natural", "num_clients": 8, "clients_per_round": 4,
                      "rounds": 3, "local_epochs": EPOCHS, "system": {"device_trace": str(trace), **system}},
    }


def run(config: dict[str, Any], out: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], dict]:
    replies: dict[int, dict[int, dict[str, Any]]] = {}
    original = flower_app.RoundLoop._by_partition

    def recording(self: Any, sent: Any, got: Any) -> Any:
        out_ = original(self, sent, got)
        server_round = int(next(iter(sent)).metadata.group_id) if sent else 0
        replies.setdefault(server_round, {}).update(
            {p: dict(m.content["metrics"]) for p, m in out_.items() if not m.has_error() and "metrics" in m.content})
        return out_

    monkeypatch.setattr(flower_app.RoundLoop, "_by_partition", recording)
    experiment = experiment_from_dict(config)
    return run_federated(experiment.runs[0], RunContext(out=RunDir(out))), replies


def test_run_clock_matches_hand_computation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary, replies = run(synthetic_run(tmp_path), tmp_path / "a", monkeypatch)
    model_bytes = sum(np_save_size(v.numpy()) for v in summary["model"].state_dict().values())
    elapsed = 0.0
    for record in summary["history"][1:]:
        got = replies[record["round"]]
        times = dict(zip(record["clients"], record["client_time_s"], strict=True))
        for p, metrics in got.items():  # the samples the client really processed price its compute
            k = p
            expected = model_bytes * 8 / ((1.0 + k) * 1e6) + metrics["samples"] / (50.0 + 25 * k) + \
                model_bytes * 8 / ((0.5 + k / 2) * 1e6)
            assert times[p] == pytest.approx(expected, rel=1e-9), (record["round"], p)
        assert record["sim_start_s"] == pytest.approx(elapsed)
        assert record["sim_round_s"] == pytest.approx(max(times.values()))
        elapsed += record["sim_round_s"]
        assert record["sim_time_s"] == pytest.approx(elapsed)
    assert summary["metrics"]["sim_time_s"] == pytest.approx(elapsed)


def test_same_seed_same_clock_and_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = synthetic_run(tmp_path, availability="daily", over_selection=0.5, deadline_s=6.0, late_work="partial",
                           online_hours_median=20.0)
    a, _ = run(config, tmp_path / "a", monkeypatch)
    b, _ = run(config, tmp_path / "b", monkeypatch)
    keys = ("clients", "aggregated", "late", "offline", "client_time_s", "sim_time_s", "sim_round_s")
    assert [[h.get(k) for k in keys] for h in a["history"]] == [[h.get(k) for k in keys] for h in b["history"]]
    for name, value in a["model"].state_dict().items():
        assert torch.equal(value, b["model"].state_dict()[name])
    rounds = a["history"][1:]
    assert all(len(h["clients"]) == 6 and len(h["aggregated"]) <= 4 for h in rounds)  # ceil(1.5 x 4) sampled
    assert all(h["sim_round_s"] <= 6.0 + 1e-9 for h in rounds)


def test_default_clock_changes_nothing_but_the_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default profiles time the rounds; the same clients train the same work, so the model is unchanged
    whatever the profiles are."""
    fast, _ = run(synthetic_run(tmp_path), tmp_path / "a", monkeypatch)
    config = synthetic_run(tmp_path)
    config["federated"]["system"] = {"compute_sps_median": 1.0}
    slow, _ = run(config, tmp_path / "b", monkeypatch)
    assert slow["metrics"]["sim_time_s"] > fast["metrics"]["sim_time_s"] > 0
    for name, value in fast["model"].state_dict().items():
        assert torch.equal(value, slow["model"].state_dict()[name])


def test_bad_system_config_is_refused_at_load(tmp_path: Path) -> None:
    def refused(match: str, **system: Any) -> None:
        config = synthetic_run(tmp_path, **system)
        with pytest.raises(ConfigError, match=match):
            experiment_from_dict(config)

    refused("over_selection", over_selection=1.5)  # ceil(2.5 x 4) = 10 > 8 clients
    refused("late_work", late_work="partial")
    refused("deadline_s", deadline_s=-1.0)
    refused("down_mbps_median", down_mbps_median=0.0)
    refused("buffer_size", server="fedbuff", buffer_size=5)
    refused("federated.system.deadline_s", server="fedbuff", buffer_size=2, deadline_s=10.0)
    assert math.isfinite(experiment_from_dict(synthetic_run(tmp_path, deadline_s=10.0)).runs[0].federated.system.deadline_s)


# ---- bad input, refused at load: one line naming file, line or key, and value; exit 2 ------------------
FED = ('task = "logreg"\nmode = "federated"\n[data]\nname = "fedprox_synthetic"\n'
       'options = { num_clients = 6, size_cap = 60 }\n[train]\nprogress = false\n'
       '[federated]\npartition = "natural"\nrounds = 1\nclients_per_round = 2\n')


@pytest.mark.parametrize("case,trace,header,file_key,value", [
    ("unknown client id", "devices", "client_id,compute_sps,down_mbps,up_mbps\n0,10,1,1\n6,10,1,1\n",
     "line 3: client_id", "'6'"),
    ("negative bandwidth", "devices", "client_id,compute_sps,down_mbps,up_mbps\n0,10,1,1\n1,10,-2,1\n",
     "line 3: down_mbps", "'-2'"),
    ("interval ends before it starts", "online", "client_id,start_s,end_s\n0,100,200\n1,500,400\n",
     "line 3: end_s", "'400'"),
])
def test_bad_traces_exit_2_naming_file_line_and_value(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
                                                      trace: str, header: str, file_key: str, value: str) -> None:
    from fedsim.cli import main

    csv = tmp_path / f"{trace}.csv"
    csv.write_text(header)
    key = "device_trace" if trace == "devices" else "availability_trace"
    path = tmp_path / "exp.toml"
    path.write_text(FED + f'[federated.system]\n{key} = "{csv}"\n')
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert str(csv) in lines[0] and f"key '{file_key}' = {value}:" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # nothing ran


def test_a_deadline_no_client_can_meet_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedsim.cli import main

    path = tmp_path / "exp.toml"
    path.write_text(FED + "[federated.system]\ndeadline_s = 0.001\n")
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], lines
    assert "key 'federated.system.deadline_s' = 0.001:" in lines[0] and "no client can meet it" in lines[0]
    # partial work lowers the bar to one local epoch, a generous deadline passes
    path.write_text(FED + "[federated.system]\ndeadline_s = 1000.0\n")
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 0


def test_sampling_online_clients_costs_the_cohort_not_the_population() -> None:
    """A million clients online one window a day: a round's sampling asks about a few hundred of them."""
    asked: list[int] = []

    class Counting(Devices):
        def available_mask(self, ks: np.ndarray, t: float) -> np.ndarray:
            asked.append(len(ks))
            return super().available_mask(ks, t)

    devices = Counting(SystemConfig(availability="daily"), 10**6, seed=0)
    for r, t in enumerate((0.0, 6 * 3600.0, 13 * 3600.0, 22 * 3600.0), start=1):
        asked.clear()
        start, cohort = sample_available(0, r, 10**6, 100, devices, t)
        assert len(cohort) == 100 and all(devices.available(p, start) for p in cohort)
        assert sum(asked) <= 16 * 400, (t, sum(asked))


def test_the_heterogeneity_experiment_runs_cut_short(tmp_path: Path) -> None:
    from fedsim.cli import main
    from fedsim.config import load_experiment

    path = Path(__file__).resolve().parents[1] / "experiments" / "heterogeneity.toml"
    runs = {r.name: r for r in load_experiment(path).runs}
    assert set(runs) == {"central", "fedavg-all", "fedavg-deadline", "fedavg-partial", "fedavg-overselect", "fedbuff"}
    assert {r.federated.system.availability for r in runs.values()} == {"daily"}  # one population for all
    assert runs["fedbuff"].federated.system.server == "fedbuff"
    assert runs["fedavg-partial"].federated.system.late_work == "partial"
    code = main(["run", str(path), "--out", str(tmp_path), "--set", "seeds=[0]", "--set", "federated.rounds=2",
                 "--set", "train.epochs=1"])
    assert code == 0
    folder = tmp_path / "heterogeneity"
    assert "sim time to 90% central" in (folder / "comparison.md").read_text()
    assert (folder / "comparison.png").stat().st_size > 0
    import json

    summary = json.loads((folder / "fedbuff-seed0" / "summary.json").read_text())
    assert summary["metrics"]["sim_time_s"] > 0 and len(summary["history"][1]["staleness"]) == 10

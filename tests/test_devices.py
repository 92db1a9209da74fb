"""Device profiles and availability on the simulated clock (fedsim.engines.federated.devices)."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import pytest

from fedsim.config import SystemConfig
from fedsim.engines.federated.devices import (
    DAY_S,
    DeviceProfile,
    Devices,
    read_availability_trace,
    read_device_trace,
)
from fedsim.errors import ConfigError

H = 3600.0


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- profiles -------------------------------------------------------------------------------------


def test_profiles_are_keyed_by_seed_and_client() -> None:
    system = SystemConfig()
    a = Devices(system, 1000, seed=7)
    b = Devices(system, 1000, seed=7)
    # asked in a different order, with other clients in between: same answers
    first = [a.profile(k) for k in (5, 17, 999)]
    b.profiles(np.arange(1000)[::-1])
    assert [b.profile(k) for k in (999, 17, 5)][::-1] == first
    # a larger population does not change client k's draws
    assert Devices(system, 10**6, seed=7).profile(17) == first[1]
    other = Devices(system, 1000, seed=8)
    assert all(other.profile(k) != p for k, p in zip((5, 17, 999), first, strict=True))
    # the three quantities of one client are not the same draw
    p = first[0]
    zs = [math.log(p.compute_sps / 100.0) / 0.7, math.log(p.down_mbps / 20.0) / 1.4,
          math.log(p.up_mbps / 5.0) / 1.4]
    assert len({round(z, 9) for z in zs}) == 3


def test_profile_matches_vectorised_profiles() -> None:
    devices = Devices(SystemConfig(), 500, seed=3)
    ks = np.array([0, 1, 2, 250, 499, 2, 0])
    compute, down, up = devices.profiles(ks)
    assert compute.dtype == down.dtype == up.dtype == np.float64
    for i, k in enumerate(ks.tolist()):
        single = devices.profiles(np.array([k]))
        assert devices.profile(k) == DeviceProfile(compute[i], down[i], up[i])
        assert (single[0][0], single[1][0], single[2][0]) == (compute[i], down[i], up[i])


def test_million_clients_lazy_and_vectorised() -> None:
    start = time.perf_counter()
    devices = Devices(SystemConfig(), 10**6, seed=11)
    assert time.perf_counter() - start < 0.5  # no per-client work at construction (it takes ~1 ms)
    compute, down, up = devices.profiles(np.arange(10**6))
    assert compute.shape == down.shape == up.shape == (10**6,)
    assert np.all(np.isfinite(compute)) and np.all(compute > 0)
    for k in (0, 1, 12345, 500_000, 999_999):
        assert devices.profile(k) == DeviceProfile(compute[k], down[k], up[k])


def test_log_normal_statistics() -> None:
    """200,000 clients: the sample median's relative standard error is ~1.25 * sigma / sqrt(n) < 0.4 %
    and that of the 5/95 % quantiles' log ratio ~1 %, so 3 % and 5 % tolerances never flake."""
    system = SystemConfig(compute_sps_median=80.0, compute_sps_sigma=0.7, down_mbps_median=20.0,
                          down_mbps_sigma=1.4)
    compute, down, _ = Devices(system, 200_000, seed=0).profiles(np.arange(200_000))
    assert np.median(compute) == pytest.approx(80.0, rel=0.03)
    assert np.median(down) == pytest.approx(20.0, rel=0.03)
    for values, sigma in ((compute, 0.7), (down, 1.4)):
        p5, p95 = np.percentile(values, [5, 95])
        assert math.log(p95 / p5) == pytest.approx(2 * 1.6449 * sigma, rel=0.05)
    assert abs(np.corrcoef(np.log(compute), np.log(down))[0, 1]) < 0.02  # independent quantities


def test_sigma_zero_gives_the_median() -> None:
    system = SystemConfig(compute_sps_sigma=0.0, down_mbps_sigma=0.0, up_mbps_sigma=0.0)
    compute, down, up = Devices(system, 100, seed=1).profiles(np.arange(100))
    assert np.all(compute == 100.0) and np.all(down == 20.0) and np.all(up == 5.0)


# --- device trace ---------------------------------------------------------------------------------


def test_device_trace_overrides_listed_clients(tmp_path: Path) -> None:
    _write(tmp_path / "dev.csv", " client_id , compute_sps,down_mbps , up_mbps\n"
                                 "3, 50, 10.5, 2\n\n"
                                 "0,1e3,100,40\n")
    plain = Devices(SystemConfig(), 10, seed=5)
    traced = Devices(SystemConfig(device_trace="dev.csv"), 10, seed=5, base_dir=tmp_path)
    assert traced.profile(3) == DeviceProfile(50.0, 10.5, 2.0)
    assert traced.profile(0) == DeviceProfile(1000.0, 100.0, 40.0)
    for k in (1, 2, 4, 9):
        assert traced.profile(k) == plain.profile(k)
    compute, down, up = traced.profiles(np.array([9, 3, 1, 0, 3]))
    assert compute.tolist() == [plain.profile(9).compute_sps, 50.0, plain.profile(1).compute_sps, 1000.0, 50.0]
    assert down[1] == 10.5 and up[3] == 40.0
    # an absolute path ignores base_dir
    absolute = Devices(SystemConfig(device_trace=str(tmp_path / "dev.csv")), 10, seed=5, base_dir="/nonexistent")
    assert absolute.profile(3) == DeviceProfile(50.0, 10.5, 2.0)
    assert read_device_trace(tmp_path / "dev.csv", 10) == {3: DeviceProfile(50.0, 10.5, 2.0),
                                                          0: DeviceProfile(1000.0, 100.0, 40.0)}


# --- availability ---------------------------------------------------------------------------------


def test_always_available() -> None:
    devices = Devices(SystemConfig(), 10, seed=0)
    assert devices.always_available
    assert devices.available(3, 12345.0)
    assert devices.online_until(3, 5.0) == math.inf
    assert devices.next_online(3, 5.0) == 5.0
    assert devices.available_mask(np.arange(10), 7.0).all()


def test_availability_trace(tmp_path: Path) -> None:
    _write(tmp_path / "av.csv", "client_id,start_s,end_s\n"
                                "1,3600,7200\n"
                                "1,36000,43200\n"
                                "1,7200,10800\n"  # touches the first: merged into [3600, 10800)
                                "2,0,3600\n"
                                "2,82800,86400\n"  # runs to midnight and continues at 0:00
                                "4,0,86400\n")
    assert read_availability_trace(tmp_path / "av.csv", 5) == {
        1: [(3600.0, 10800.0), (36000.0, 43200.0)], 2: [(0.0, 3600.0), (82800.0, 86400.0)], 4: [(0.0, DAY_S)]}
    devices = Devices(SystemConfig(availability_trace=str(tmp_path / "av.csv")), 5, seed=0)
    assert not devices.always_available
    # client 1
    assert not devices.available(1, 0.0)
    assert devices.next_online(1, 0.0) == 3600.0
    assert devices.available(1, 3600.0)  # half-open: online at the start ...
    assert devices.online_until(1, 3600.0) == 10800.0  # ... and the touching rows are one interval
    assert not devices.available(1, 10800.0)  # ... offline at the end
    assert devices.next_online(1, 10800.0) == 36000.0
    assert devices.next_online(1, 50000.0) == DAY_S + 3600.0  # tomorrow's first interval
    # periodic: day 3 looks like day 0
    assert devices.available(1, 3 * DAY_S + 40000.0)
    assert devices.online_until(1, 3 * DAY_S + 40000.0) == 3 * DAY_S + 43200.0
    assert devices.next_online(1, 3 * DAY_S + 20000.0) == 3 * DAY_S + 36000.0
    # client 2: online across midnight, until 1:00 the next day
    assert devices.available(2, 85000.0) and devices.available(2, DAY_S + 100.0)
    assert devices.online_until(2, 85000.0) == DAY_S + 3600.0
    assert devices.online_until(2, DAY_S + 100.0) == DAY_S + 3600.0
    assert not devices.available(2, 3600.0)
    assert devices.next_online(2, 3600.0) == 82800.0
    # client 4: the whole day
    assert devices.online_until(4, 123.0) == math.inf and devices.next_online(4, 5 * DAY_S) == 5 * DAY_S
    # unlisted clients follow availability = "always"
    assert devices.available(0, 5000.0) and devices.online_until(3, 5000.0) == math.inf
    with pytest.raises(ValueError):
        devices.online_until(1, 0.0)
    for t in (0.0, 3600.0, 40000.0, 85000.0, DAY_S + 100.0):
        mask = devices.available_mask(np.arange(5), t)
        assert mask.tolist() == [devices.available(k, t) for k in range(5)]


def test_trace_boundaries_with_fractional_seconds(tmp_path: Path) -> None:
    """``day * DAY_S + start`` can round below ``start`` seconds into the day: next_online must still
    return a time at which the client is online, and online_until one at which it is not."""
    _write(tmp_path / "av.csv", "client_id,start_s,end_s\n0,0.1,0.3\n0,1234.567891,5000.000001\n")
    devices = Devices(SystemConfig(availability_trace="av.csv"), 1, seed=0, base_dir=tmp_path)
    for day in (0, 1, 3, 17, 1000, 123_456):
        for t in (day * DAY_S, day * DAY_S + 0.3, day * DAY_S + 1000.0):
            begin = devices.next_online(0, t)
            assert begin >= t and devices.available(0, begin)
            until = devices.online_until(0, begin)
            assert until > begin and not devices.available(0, until)


def test_daily_windows_are_consistent_and_periodic() -> None:
    system = SystemConfig(availability="daily")
    devices = Devices(system, 10**6, seed=2)
    assert not devices.always_available
    rng = np.random.default_rng(0)
    ks = rng.integers(0, 10**6, size=40).tolist()
    times = np.linspace(0.0, 2 * DAY_S, 97).tolist()
    wraps = 0
    for k in ks:
        for t in times:
            online = devices.available(k, t)
            nxt = devices.next_online(k, t)
            assert (nxt == t) == online
            assert t <= nxt < t + DAY_S
            assert devices.available(k, nxt)
            if online:
                until = devices.online_until(k, t)
                assert t < until <= t + DAY_S
                assert not devices.available(k, until)  # half-open: offline at the end
                assert devices.available(k, until - 1e-6 * (until - t))
                wraps += until % DAY_S < t % DAY_S  # the window ran past midnight
            else:
                assert not devices.available(k, (t + nxt) / 2)
            assert devices.available(k, t + 5 * DAY_S) == online  # repeats every day
        mask = devices.available_mask(np.array(ks), times[k % len(times)])
        assert mask.tolist() == [devices.available(j, times[k % len(times)]) for j in ks]
    assert wraps > 0  # windows around 22:00 lasting ~6 h wrap past midnight


def test_daily_window_statistics() -> None:
    """The fraction of clients online at each hour matches an independent Monte Carlo of the stated
    distributions (start ~ N(22, 3) h wrapped mod 24, length ~ 6 h * exp(0.5 z), windows wrapping past
    midnight) within 0.02 (20,000 clients: standard error of a fraction <= 0.0035, plus the reference's
    <= 0.0012). The window length (online_until - next_online) has median 6 h within 5 %."""
    devices = Devices(SystemConfig(availability="daily"), 20_000, seed=4)
    ks = np.arange(20_000)
    rng = np.random.default_rng(0)
    start = np.mod(rng.normal(22.0, 3.0, 200_000), 24.0)
    length = np.minimum(6.0 * np.exp(0.5 * rng.standard_normal(200_000)), 24.0)
    for hour in (0.0, 3.0, 6.0, 12.0, 18.0, 22.0, 23.5):
        expected = (np.mod(hour - start, 24.0) < length).mean()
        assert devices.available_mask(ks, hour * H + 7 * DAY_S).mean() == pytest.approx(expected, abs=0.02)
    lengths = []
    for k in range(0, 20_000, 10):
        offline = devices.online_until(k, 0.0) if devices.available(k, 0.0) else 0.0
        if offline == math.inf:  # a window capped at 24 h
            lengths.append(DAY_S)
            continue
        begin = devices.next_online(k, offline)
        lengths.append(devices.online_until(k, begin) - begin)
    assert np.median(lengths) == pytest.approx(6 * H, rel=0.05)
    assert max(lengths) <= DAY_S


def test_daily_window_of_24_hours_is_always_online() -> None:
    system = SystemConfig(availability="daily", online_hours_median=30.0, online_hours_sigma=0.0)
    devices = Devices(system, 100, seed=0)
    for k in range(0, 100, 7):
        assert devices.available(k, 1234.5) and devices.online_until(k, 1234.5) == math.inf
    assert devices.available_mask(np.arange(100), 50_000.0).all()


def test_trace_overrides_daily(tmp_path: Path) -> None:
    _write(tmp_path / "av.csv", "client_id,start_s,end_s\n0,0,60\n")
    devices = Devices(SystemConfig(availability="daily", availability_trace="av.csv"), 50, seed=1,
                      base_dir=tmp_path)
    daily = Devices(SystemConfig(availability="daily"), 50, seed=1)
    assert devices.available(0, 30.0) and not devices.available(0, 60.0)
    assert devices.next_online(0, 61.0) == DAY_S
    for k in range(1, 50):
        assert devices.next_online(k, 1000.0) == daily.next_online(k, 1000.0)


# --- bad input ------------------------------------------------------------------------------------

DEVICE_HEADER = "client_id,compute_sps,down_mbps,up_mbps\n"
AVAILABILITY_HEADER = "client_id,start_s,end_s\n"


@pytest.mark.parametrize(("text", "key", "value", "reason"), [
    ("client_id,compute_sps,down_mbps\n0,1,2\n", "line 1: header", "client_id,compute_sps,down_mbps",
     "expected header 'client_id,compute_sps,down_mbps,up_mbps'"),
    ("", "line 1: header", "", "empty file"),
    (DEVICE_HEADER + "0,1,2,3\n12,1,2,3\n", "line 3: client_id", "12",
     "unknown client id; the population has 10 clients (0..9)"),
    (DEVICE_HEADER + "-1,1,2,3\n", "line 2: client_id", "-1", "unknown client id"),
    (DEVICE_HEADER + "x,1,2,3\n", "line 2: client_id", "x", "not an integer"),
    (DEVICE_HEADER + "0,1,2,3\n1,1,fast,3\n", "line 3: down_mbps", "fast", "not a number"),
    (DEVICE_HEADER + "0,1,2,3\n1,1,-2,3\n", "line 3: down_mbps", "-2", "must be > 0"),
    (DEVICE_HEADER + "0,0,2,3\n", "line 2: compute_sps", "0", "must be > 0"),
    (DEVICE_HEADER + "0,1,2,inf\n", "line 2: up_mbps", "inf", "finite"),
    (DEVICE_HEADER + "0,1,2,nan\n", "line 2: up_mbps", "nan", "finite"),
    (DEVICE_HEADER + "4,1,2,3\n\n4,1,2,3\n", "line 4: client_id", "4", "duplicate client: already listed on line 2"),
    (DEVICE_HEADER + "4,1,2\n", "line 2", "4,1,2", "expected 4 columns"),
])
def test_bad_device_trace(tmp_path: Path, text: str, key: str, value: str, reason: str) -> None:
    path = _write(tmp_path / "dev.csv", text)
    with pytest.raises(ConfigError) as info:
        read_device_trace(path, 10)
    assert str(info.value).startswith(f"{path}: key '{key}' = {value!r}: ")
    assert reason in str(info.value)
    with pytest.raises(ConfigError, match="dev.csv"):
        Devices(SystemConfig(device_trace="dev.csv"), 10, seed=0, base_dir=tmp_path)


@pytest.mark.parametrize(("text", "key", "value", "reason"), [
    ("client_id,start,end\n", "line 1: header", "client_id,start,end", "expected header 'client_id,start_s,end_s'"),
    (AVAILABILITY_HEADER + "0,0,10\n10,0,10\n", "line 3: client_id", "10", "the population has 10 clients (0..9)"),
    (AVAILABILITY_HEADER + "0,noon,10\n", "line 2: start_s", "noon", "not a number"),
    (AVAILABILITY_HEADER + "0,-5,10\n", "line 2: start_s", "-5", "must be >= 0"),
    (AVAILABILITY_HEADER + "0,0,10\n0,80000,90000\n", "line 3: end_s", "90000", "must be <= 86400"),
    (AVAILABILITY_HEADER + "0,500,100\n", "line 2: end_s", "100", "ends before it starts"),
    (AVAILABILITY_HEADER + "0,500,500\n", "line 2: end_s", "500", "ends before it starts"),
])
def test_bad_availability_trace(tmp_path: Path, text: str, key: str, value: str, reason: str) -> None:
    path = _write(tmp_path / "av.csv", text)
    with pytest.raises(ConfigError) as info:
        read_availability_trace(path, 10)
    assert str(info.value).startswith(f"{path}: key '{key}' = {value!r}: ")
    assert reason in str(info.value)
    with pytest.raises(ConfigError, match="av.csv"):
        Devices(SystemConfig(availability="daily", availability_trace="av.csv"), 10, seed=0, base_dir=tmp_path)


@pytest.mark.parametrize(("field", "key", "header"), [
    ("device_trace", "federated.system.device_trace", "client_id,compute_sps,down_mbps,up_mbps"),
    ("availability_trace", "federated.system.availability_trace", "client_id,start_s,end_s"),
])
def test_missing_trace_file(tmp_path: Path, field: str, key: str, header: str) -> None:
    system = dataclasses.replace(SystemConfig(), **{field: "traces/missing.csv"})
    with pytest.raises(ConfigError) as info:
        Devices(system, 10, seed=0, base_dir=tmp_path)
    message = str(info.value)
    path = str(tmp_path / "traces" / "missing.csv")
    assert message.startswith(f"{path}: key '{key}' = {path!r}: file not found")
    assert header in message

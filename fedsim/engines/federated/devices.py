"""Every federated client's device and its online hours, on fedsim's simulated clock.

A population can hold a million clients while a round asks about a cohort of a hundred, so nothing
here is per-client state built up front: a client's draws are a pure function of
``(seed, quantity, client id)`` — a counter-based hash (splitmix64 of ``key ^ k``, ``key`` from
:func:`fedsim.seeding.derive_seed`) turned into a standard normal by ``torch.special.ndtri`` — so
asking for client ``k`` costs O(1), does not depend on which other clients were asked for or in
what order, and vectorises over an array of ids. Traces (CSV) override the draws for the clients
they list; they are read once, in O(rows).

Time is seconds since the run started at midnight of day 0; availability repeats every
:data:`DAY_S`. Online intervals are half-open, ``[start, end)``: a client is online at ``start``
and offline at ``end``.
"""

from __future__ import annotations

import csv
import math
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedsim.config import SystemConfig
from fedsim.errors import ConfigError
from fedsim.seeding import derive_seed

__all__ = ["DAY_S", "DeviceProfile", "Devices", "read_device_trace", "read_availability_trace"]

DAY_S = 86400.0
"""Length of the simulated day, seconds: availability (windows and traces) repeats with this period."""

_HOUR_S = 3600.0
_DEVICE_COLUMNS = ("client_id", "compute_sps", "down_mbps", "up_mbps")
_AVAILABILITY_COLUMNS = ("client_id", "start_s", "end_s")
_DEVICE_KEY = "federated.system.device_trace"
_AVAILABILITY_KEY = "federated.system.availability_trace"

Intervals = tuple[tuple[float, float], ...]
"""A client's online intervals within one day: sorted, disjoint, not touching, inside [0, DAY_S]."""

_ALWAYS: Intervals = ((0.0, DAY_S),)


@dataclass(frozen=True)
class DeviceProfile:
    """What a client's device can do: how fast it trains and how fast it talks to the server."""

    compute_sps: float
    """Training samples per second."""
    down_mbps: float
    """Download bandwidth, Mbit/s."""
    up_mbps: float
    """Upload bandwidth, Mbit/s."""


# --- keyed standard normals -----------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 arrays (wrapping arithmetic): neighbouring inputs give
    unrelated outputs, so client ids can be hashed directly instead of stepping a generator."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
        return x ^ (x >> np.uint64(31))


def _normals(key: int, ks: np.ndarray) -> np.ndarray:
    """Standard normals of clients ``ks`` under ``key``: hash -> uniform in (0, 1) -> inverse normal CDF.

    The uniform is ``(top 52 bits + 0.5) / 2**52``: exact in float64 and never 0 or 1, so ``ndtri``
    is always finite.
    """
    bits = _splitmix64(np.uint64(key) ^ ks.astype(np.uint64))
    uniform = ((bits >> np.uint64(12)).astype(np.float64) + 0.5) * 2.0**-52
    # torch's ndtri (Cephes', as SciPy's) rather than importing scipy.special only for it: ~11 MB and 0.15 s
    # of start-up in every server process.
    return torch.special.ndtri(torch.from_numpy(uniform)).numpy()


# --- traces ---------------------------------------------------------------------------------------


def _rows(path: str | Path, config_key: str, columns: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """(line number, stripped cells) of each non-blank data row of a CSV whose header is ``columns``."""
    file = str(path)
    expected = ",".join(columns)
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise ConfigError(file, config_key, file, f"file not found; it should be a CSV with header "
                                                  f"'{expected}'") from exc
    except OSError as exc:
        raise ConfigError(file, config_key, file, f"cannot be read ({exc.strerror}); it should be a CSV "
                                                  f"with header '{expected}'") from exc
    with handle:
        reader = csv.reader(handle)
        try:
            header = next((row for row in reader if any(cell.strip() for cell in row)), None)
            if header is None:
                raise ConfigError(file, "line 1: header", "", f"empty file; expected header '{expected}'")
            if tuple(cell.strip() for cell in header) != columns:
                raise ConfigError(file, f"line {reader.line_num}: header", ",".join(header),
                                  f"expected header '{expected}'")
            for row in reader:
                cells = [cell.strip() for cell in row]
                if not any(cells):
                    continue
                if len(cells) != len(columns):
                    raise ConfigError(file, f"line {reader.line_num}", ",".join(row),
                                      f"expected {len(columns)} columns ({expected}), got {len(cells)}")
                yield reader.line_num, cells
        except UnicodeDecodeError as exc:
            raise ConfigError(file, config_key, file, "not a UTF-8 text CSV file") from exc
        except csv.Error as exc:
            raise ConfigError(file, f"line {reader.line_num}", file, f"not a valid CSV row ({exc})") from exc


def _client_id(file: str, line: int, text: str, num_clients: int) -> int:
    try:
        k = int(text)
    except ValueError:
        raise ConfigError(file, f"line {line}: client_id", text, "not an integer client id") from None
    if not 0 <= k < num_clients:
        raise ConfigError(file, f"line {line}: client_id", text,
                          f"unknown client id; the population has {num_clients} clients "
                          f"(0..{num_clients - 1})")
    return k


def _number(file: str, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(file, f"line {line}: {column}", text, "not a number") from None
    if not math.isfinite(value):
        raise ConfigError(file, f"line {line}: {column}", text, "must be a finite number")
    return value


def read_device_trace(path: str | Path, num_clients: int) -> dict[int, DeviceProfile]:
    """Device profiles listed in a CSV ``client_id,compute_sps,down_mbps,up_mbps`` (one row per client).

    Errors name the file, the line (header = line 1) and column, and the value: a missing file or
    header, an unknown client id, a non-number, a speed that is not > 0, a client listed twice.
    """
    file = str(path)
    profiles: dict[int, DeviceProfile] = {}
    first_line: dict[int, int] = {}
    for line, cells in _rows(path, _DEVICE_KEY, _DEVICE_COLUMNS):
        k = _client_id(file, line, cells[0], num_clients)
        values = []
        for column, text in zip(_DEVICE_COLUMNS[1:], cells[1:], strict=True):
            value = _number(file, line, column, text)
            if value <= 0:
                raise ConfigError(file, f"line {line}: {column}", text, "must be > 0")
            values.append(value)
        if k in profiles:
            raise ConfigError(file, f"line {line}: client_id", cells[0],
                              f"duplicate client: already listed on line {first_line[k]}")
        profiles[k] = DeviceProfile(*values)
        first_line[k] = line
    return profiles


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted union of intervals; overlapping or touching ones become one."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def read_availability_trace(path: str | Path, num_clients: int) -> dict[int, list[tuple[float, float]]]:
    """Online intervals listed in a CSV ``client_id,start_s,end_s`` (seconds within a day, 0-86400).

    A client may have several rows. Each client's intervals are returned sorted and **merged**:
    overlapping or touching intervals (``[0, 10)`` and ``[10, 20)``) become one, so the list is
    disjoint and gaps between entries are real offline time. Intervals are half-open ``[start, end)``
    and repeat every day. Errors name the file, the line and column, and the value: a missing file or
    header, an unknown client id, a non-number, start_s < 0, end_s > 86400, end_s <= start_s.
    """
    file = str(path)
    raw: dict[int, list[tuple[float, float]]] = {}
    for line, cells in _rows(path, _AVAILABILITY_KEY, _AVAILABILITY_COLUMNS):
        k = _client_id(file, line, cells[0], num_clients)
        start = _number(file, line, "start_s", cells[1])
        end = _number(file, line, "end_s", cells[2])
        if start < 0:
            raise ConfigError(file, f"line {line}: start_s", cells[1],
                              f"must be >= 0 (seconds within a day, 0-{DAY_S:.0f})")
        if end > DAY_S:
            raise ConfigError(file, f"line {line}: end_s", cells[2],
                              f"must be <= {DAY_S:.0f} (seconds within a day, 0-{DAY_S:.0f})")
        if end <= start:
            raise ConfigError(file, f"line {line}: end_s", cells[2],
                              f"the interval ends before it starts (start_s = {cells[1]})")
        raw.setdefault(k, []).append((start, end))
    return {k: _merge(intervals) for k, intervals in sorted(raw.items())}


# --- the population's devices ---------------------------------------------------------------------


class Devices:
    """Device profiles and availability of clients ``0 .. num_clients - 1``, drawn lazily.

    Construction reads the traces (paths relative to ``base_dir`` unless absolute) and nothing else:
    it costs O(rows of the traces), never O(num_clients). Every later question about client ``k``
    is answered from ``(seed, k)`` in O(1) (or a look-up in the traces).
    """

    def __init__(self, system: SystemConfig, num_clients: int, seed: int, base_dir: str | Path = ".") -> None:
        self.system = system
        self.num_clients = num_clients
        self.seed = seed
        self._keys = {name: derive_seed(seed, "devices", name)
                      for name in ("compute_sps", "down_mbps", "up_mbps", "online_start", "online_hours")}
        device_trace = (read_device_trace(_resolve(system.device_trace, base_dir), num_clients)
                        if system.device_trace else {})
        # Trace overrides as sorted arrays, so that profiles(ks) can find them with one searchsorted.
        self._trace_ids = np.array(sorted(device_trace), dtype=np.int64)
        self._trace_values = np.array([[device_trace[k].compute_sps, device_trace[k].down_mbps,
                                        device_trace[k].up_mbps] for k in self._trace_ids.tolist()],
                                      dtype=np.float64).reshape(-1, 3)
        trace = (read_availability_trace(_resolve(system.availability_trace, base_dir), num_clients)
                 if system.availability_trace else {})
        self._availability_trace: dict[int, Intervals] = {k: tuple(v) for k, v in trace.items()}
        self._availability_ids = np.array(sorted(trace), dtype=np.int64)
        self.always_available: bool = system.availability == "always" and not system.availability_trace
        """True when every client is online all the time (no availability to simulate)."""

    # profiles

    def profiles(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(compute_sps, down_mbps, up_mbps) of clients ``ks``, float64 arrays of ``ks``' shape."""
        ks = np.asarray(ks, dtype=np.int64)
        s = self.system
        compute = s.compute_sps_median * np.exp(s.compute_sps_sigma * _normals(self._keys["compute_sps"], ks))
        down = s.down_mbps_median * np.exp(s.down_mbps_sigma * _normals(self._keys["down_mbps"], ks))
        up = s.up_mbps_median * np.exp(s.up_mbps_sigma * _normals(self._keys["up_mbps"], ks))
        if self._trace_ids.size:
            where = np.searchsorted(self._trace_ids, ks).clip(max=self._trace_ids.size - 1)
            listed = self._trace_ids[where] == ks
            rows = self._trace_values[where[listed]]
            compute[listed], down[listed], up[listed] = rows[:, 0], rows[:, 1], rows[:, 2]
        return compute, down, up

    def profile(self, k: int) -> DeviceProfile:
        """Client ``k``'s device: the same numbers as ``profiles(np.array([k]))``, by construction."""
        compute, down, up = self.profiles(np.array([k], dtype=np.int64))
        return DeviceProfile(float(compute[0]), float(down[0]), float(up[0]))

    # availability

    def _daily_windows(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, duration) in seconds of the ``daily`` windows of clients ``ks``; start in [0, DAY_S),
        duration in (0, DAY_S] (a duration of DAY_S = always online)."""
        s = self.system
        hours = s.online_start_hour + s.online_start_hours_std * _normals(self._keys["online_start"], ks)
        start = np.mod(hours, 24.0) * _HOUR_S
        start = np.where(start >= DAY_S, 0.0, start)  # mod of a tiny negative number can round to 24 h
        length = s.online_hours_median * np.exp(s.online_hours_sigma * _normals(self._keys["online_hours"], ks))
        return start, np.minimum(length, 24.0) * _HOUR_S

    def _intervals(self, k: int) -> Intervals:
        """Client ``k``'s online intervals within a day (see :data:`Intervals`)."""
        listed = self._availability_trace.get(k)
        if listed is not None:
            return listed
        if self.system.availability == "always":
            return _ALWAYS
        start_a, length_a = self._daily_windows(np.array([k], dtype=np.int64))
        start, end = float(start_a[0]), float(start_a[0] + length_a[0])
        if length_a[0] >= DAY_S:
            return _ALWAYS
        if end <= DAY_S:
            return ((start, end),)
        return ((0.0, end - DAY_S), (start, DAY_S))  # wraps past midnight

    def available(self, k: int, t: float) -> bool:
        """Whether client ``k`` is online at simulated time ``t``."""
        if self.always_available:
            return True
        return _find(self._intervals(k), _time_of_day(t)[1]) is not None

    def online_until(self, k: int, t: float) -> float:
        """End of the online interval of client ``k`` that contains ``t`` (``math.inf`` if always online).

        Only for ``available(k, t)``; an interval that runs to midnight and continues at 0:00 the next
        day ends when the continuation ends.
        """
        if self.always_available:
            return math.inf
        intervals = self._intervals(k)
        if intervals == _ALWAYS:
            return math.inf
        day, tau = _time_of_day(t)
        i = _find(intervals, tau)
        if i is None:
            raise ValueError(f"client {k} is not online at t = {t}")
        end = intervals[i][1]
        if end >= DAY_S and intervals[0][0] <= 0.0:
            end += intervals[0][1]
        return _instant(day, end)

    def next_online(self, k: int, t: float) -> float:
        """Earliest time >= ``t`` at which client ``k`` is online: ``t`` if it is online now,
        ``math.inf`` if it never is."""
        if self.always_available or t == math.inf:
            return t
        intervals = self._intervals(k)
        if not intervals:
            return math.inf
        day, tau = _time_of_day(t)
        if _find(intervals, tau) is not None:
            return t
        i = bisect_right(intervals, (tau, math.inf))
        if i < len(intervals):
            return _instant(day, intervals[i][0])
        return _instant(day + 1, intervals[0][0])

    def available_mask(self, ks: np.ndarray, t: float) -> np.ndarray:
        """``available(k, t)`` for every ``k`` in ``ks`` at once (bool array): for filtering a whole
        population by availability without a Python call per client."""
        ks = np.asarray(ks, dtype=np.int64)
        if self.always_available:
            return np.ones(ks.shape, dtype=bool)
        _, tau = _time_of_day(t)
        if self.system.availability == "always":
            mask = np.ones(ks.shape, dtype=bool)
        else:
            start, length = self._daily_windows(ks)
            end = start + length
            mask = ((tau >= start) & (tau < end)) | (tau < end - DAY_S)  # the part past midnight
        if self._availability_ids.size:
            for i in np.flatnonzero(np.isin(ks, self._availability_ids)):
                mask.flat[i] = _find(self._availability_trace[int(ks.flat[i])], tau) is not None
        return mask


def _resolve(path: str, base_dir: str | Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(base_dir) / p


def _time_of_day(t: float) -> tuple[int, float]:
    """(day index, seconds into that day) of simulated time ``t``; seconds in [0, DAY_S)."""
    day = math.floor(t / DAY_S)
    tau = t - day * DAY_S
    if tau >= DAY_S:
        day, tau = day + 1, tau - DAY_S
    elif tau < 0:
        day, tau = day - 1, tau + DAY_S
    return day, tau


def _instant(day: int, seconds: float) -> float:
    """The first simulated time that :func:`_time_of_day` places at or after ``seconds`` into ``day``
    (``seconds`` may exceed a day). ``day * DAY_S + seconds`` alone can round to a time whose
    seconds-into-the-day fall just short of ``seconds``; stepping up by one ulp at a time keeps
    ``available(k, next_online(k, t))`` true and ``available(k, online_until(k, t))`` false."""
    whole = math.floor(seconds / DAY_S)
    day, seconds = day + whole, seconds - whole * DAY_S
    t = day * DAY_S + seconds
    while _time_of_day(t) < (day, seconds):
        t = math.nextafter(t, math.inf)
    return t


def _find(intervals: Intervals, tau: float) -> int | None:
    """Index of the interval containing ``tau`` (half-open), or None."""
    i = bisect_right(intervals, (tau, math.inf)) - 1
    if i >= 0 and intervals[i][0] <= tau < intervals[i][1]:
        return i
    return None

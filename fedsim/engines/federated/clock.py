"""fedsim's virtual clock: how long a round would take on real devices, without sleeping.

A client's simulated time in a round is

    download(bytes of the arrays it is sent) + compute(samples it trains on / its samples per second)
    + upload(bytes of the arrays it replies with)

with bandwidths and speed from its device profile (:mod:`fedsim.engines.federated.devices`). Bytes are
the ``.npy`` bytes of each array (payload + header), computed from dtypes and shapes
(:func:`fedsim.wire.array_codec.npy_size`), never by serialising; samples are what the ClientApp's
loader yields for the local epochs (steps) it is told to train (:func:`planned_samples`). The reply is
priced like the model it was sent (the arrays record of the message), known before the client trains,
so the plan of a round — who trains, with how much work, who is aggregated, when the server stops
waiting — is a pure function of (seed, round, profiles, sizes) and is the same on every engine:
fedsim's in-process grid, Flower's simulation and a deployed SuperLink.

The server stops waiting (:func:`plan_round`) when every reply it waits for has arrived; with
over-selection when the K-th reply arrives; with a deadline at the deadline if a reply is still
missing. Clients that would reply after the server stops are not sent the round at all (their replies
would be discarded): the simulation does not pay for their training. Simulated dropouts
(``federated.dropout_fraction``) and clients whose online window ends before their reply is uploaded
never reply; a server without a deadline is taken to notice them at no cost (a real one would wait for a
timeout: set ``deadline_s`` to model that).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedsim.engines.federated.devices import DeviceProfile, Devices
from fedsim.errors import RunFailedError
from fedsim.seeding import derive_seed
from fedsim.wire.array_codec import array_wire_bytes

__all__ = ["ClientTime", "RoundPlan", "client_time", "planned_samples", "work_samples", "plan_round", "sample_available",
           "record_bytes", "message_array_bytes", "units_within"]

MEGABIT = 1e6


def record_bytes(record: ArrayRecord) -> int:
    """``.npy`` bytes of every array in ``record`` (from dtypes and shapes)."""
    return sum(array_wire_bytes(array) for array in record.values())


def message_array_bytes(content: RecordDict, skip: Sequence[str] = ()) -> int:
    """``.npy`` bytes of the arrays of a message (records named in ``skip`` are not traffic)."""
    return sum(record_bytes(record) for key, record in content.items()
               if isinstance(record, ArrayRecord) and key not in skip)


def planned_samples(n_train: Any, batch_size: int, epochs: int = 1, steps: int = 0) -> Any:
    """Samples a client with ``n_train`` training samples processes: ``epochs`` passes, or ``steps``
    batches of ``batch_size`` cycling through its epochs (each epoch's last batch holds the remainder),
    as the ClientApp's loader yields them. ``n_train`` may be an array of client sizes (validation prices a
    whole population at once); an integer gives an integer."""
    if steps <= 0:
        total = int(epochs) * np.asarray(n_train, dtype=np.int64)
    else:
        n = np.asarray(n_train, dtype=np.int64)
        per_epoch = np.maximum(1, -(-n // batch_size))
        full, rest = np.divmod(int(steps), per_epoch)
        total = full * n + np.minimum(rest * batch_size, n)
    return int(total) if total.ndim == 0 else total


def work_samples(n_train: Any, batch_size: int, units: int, by_steps: bool) -> Any:
    """:func:`planned_samples` of ``units`` local steps (``by_steps``) or local epochs."""
    return planned_samples(n_train, batch_size, steps=units) if by_steps else \
        planned_samples(n_train, batch_size, epochs=units)


@dataclass(frozen=True)
class ClientTime:
    """One client's simulated seconds in a round (from the round's start)."""

    partition: int
    down_s: float
    compute_s: float
    up_s: float
    samples: int
    units: int
    """Local epochs (steps when the run counts steps) it trains."""

    @property
    def total_s(self) -> float:
        return self.down_s + self.compute_s + self.up_s


def client_time(partition: int, bytes_down: int, bytes_up: int, samples: int, units: int,
                profile: DeviceProfile) -> ClientTime:
    """Download + compute + upload of one client with ``profile``."""
    return ClientTime(partition, bytes_down * 8 / (profile.down_mbps * MEGABIT), samples / profile.compute_sps,
                      bytes_up * 8 / (profile.up_mbps * MEGABIT), int(samples), int(units))


def units_within(budget_s: float, profile: DeviceProfile, n_train: int, batch_size: int, full: int,
                 by_steps: bool) -> int:
    """The most local epochs (steps) in ``[0, full]`` whose compute fits in ``budget_s`` seconds."""
    if budget_s <= 0:
        return 0
    if not by_steps:
        fit = math.floor(budget_s * profile.compute_sps / max(n_train, 1) + 1e-12)
        return max(0, min(int(full), fit))
    fit = 0
    for steps in range(1, int(full) + 1):  # few steps per round; planned_samples is not linear in them
        if planned_samples(n_train, batch_size, steps=steps) / profile.compute_sps > budget_s + 1e-12:
            break
        fit = steps
    return fit


@dataclass
class RoundPlan:
    """What the clock decides for one synchronous round."""

    start_s: float
    sampled: list[int]
    times: dict[int, ClientTime]
    """Every sampled client's planned time, with the work it would do (partial work included)."""
    send: list[int]
    """Clients sent the round (sorted): those whose replies the server will use, and simulated dropouts."""
    aggregated: list[int]
    """Clients whose replies arrive before the server stops waiting (sorted); the round loop aggregates them."""
    late: list[int] = field(default_factory=list)
    """Replies that would arrive after the server stopped (the deadline, or the K-th of an over-selected cohort)."""
    offline: list[int] = field(default_factory=list)
    """Clients whose online window ends before their reply is uploaded."""
    partial: dict[int, int] = field(default_factory=dict)
    """Late clients doing the partial work that fits before the deadline: partition -> local epochs (steps)."""
    round_s: float = 0.0
    bytes_down: dict[int, int] = field(default_factory=dict)
    """Every sampled client's download (array bytes), sent the round or not."""

    @property
    def end_s(self) -> float:
        return self.start_s + self.round_s


def plan_round(*, start_s: float, sampled: Sequence[int], devices: Devices, bytes_down: Mapping[int, int],
               bytes_up: Mapping[int, int], n_train: Mapping[int, int], batch_size: int, full_units: int,
               by_steps: bool, aggregate: int, deadline_s: float = 0.0, late_work: str = "drop",
               units: Mapping[int, int] | None = None, no_reply: Sequence[int] = (),
               discarded: Sequence[int] = ()) -> RoundPlan:
    """The clock's plan of one round.

    Parameters
    ----------
    start_s: the round's start on the clock (the previous round's end).
    sampled: the cohort (sorted partition ids), over-selected when ``aggregate`` < its size.
    bytes_down, bytes_up: each client's array bytes each way.
    n_train: each client's training samples; ``batch_size``, ``full_units`` (local epochs, or steps when
        ``by_steps``) give the work of a round.
    aggregate: K, the replies the server waits for (the cohort's size when not over-selecting).
    deadline_s: 0 = none; else replies later than this are late (``late_work``: "drop" or "partial").
    units: clients told to do other work than ``full_units`` (stragglers doing partial work).
    no_reply: simulated dropouts (sent, never reply); ``discarded``: simulated stragglers whose replies
        the round loop discards (the server does not wait for them).
    """
    units = dict(units or {})
    failing, ignored = set(no_reply), set(discarded)
    times: dict[int, ClientTime] = {}
    offline: list[int] = []
    late: list[int] = []
    partial: dict[int, int] = {}

    # The cohort's devices in one vectorised draw (Devices.profile per client costs ~30 us of NumPy calls).
    compute, down, up = (values.tolist() for values in devices.profiles(np.asarray(sampled, dtype=np.int64)))
    profiles = {p: DeviceProfile(compute[i], down[i], up[i]) for i, p in enumerate(sampled)}

    def timed(p: int, work: int) -> ClientTime:
        samples = work_samples(n_train[p], batch_size, work, by_steps)
        return client_time(p, bytes_down[p], bytes_up[p], samples, work, profiles[p])

    arriving: list[ClientTime] = []
    for p in sampled:
        time = timed(p, units.get(p, full_units))
        if deadline_s > 0 and time.total_s > deadline_s and p not in failing | ignored:
            fit = 0
            if late_work == "partial":
                budget = deadline_s - time.down_s - time.up_s
                fit = units_within(budget, profiles[p], n_train[p], batch_size, time.units, by_steps)
            if fit >= 1:
                time = timed(p, fit)
                partial[p] = fit
        times[p] = time
        if p in failing or p in ignored:
            continue
        if not devices.always_available and (not devices.available(p, start_s)
                                             or start_s + time.total_s > devices.online_until(p, start_s)):
            offline.append(p)
            continue
        if deadline_s > 0 and time.total_s > deadline_s:
            late.append(p)
            continue
        arriving.append(time)
    arriving.sort(key=lambda t: (t.total_s, t.partition))
    on_time, beyond = arriving[:aggregate], arriving[aggregate:]
    late.extend(t.partition for t in beyond)
    if len(on_time) >= aggregate:
        round_s = on_time[-1].total_s  # every reply waited for is in (with over-selection: the K-th)
    elif deadline_s > 0:
        round_s = deadline_s  # a reply is still missing: the server waits until the deadline
    elif on_time:
        round_s = on_time[-1].total_s
    else:  # nothing arrives: the server waits as long as the slowest sampled client would have taken
        round_s = max((t.total_s for t in times.values()), default=0.0)
    aggregated = sorted(t.partition for t in on_time)
    send = sorted(set(aggregated) | (failing & set(sampled)) | (ignored & set(sampled)))
    return RoundPlan(float(start_s), list(sampled), times, send, aggregated, sorted(late), sorted(offline),
                     {p: w for p, w in partial.items() if p in aggregated}, float(round_s),
                     {p: int(bytes_down[p]) for p in sampled})


def sample_available(seed: int, server_round: int, num_clients: int, count: int, devices: Devices,
                     at_s: float) -> tuple[float, list[int]]:
    """``count`` clients online at ``at_s`` (fewer if fewer are), sorted, and the time the round can start.

    Candidates are drawn keyed by (seed, round) in chunks of a few times ``count`` and kept when online
    and new, until ``count`` are found: O(count / online fraction), never the whole population. When no
    candidate of the first chunk is online, the round starts when the first of them comes online. Only
    when the online fraction is tiny (16 chunks did not find enough) is the whole population filtered,
    vectorised (:meth:`Devices.available_mask`).
    """
    rng = np.random.default_rng(derive_seed(seed, "sample-available", server_round))
    chunk = max(4 * count, 64)
    first = rng.integers(0, num_clients, size=chunk)
    start = at_s
    if not devices.available_mask(first, start).any():
        start = min(devices.next_online(int(p), at_s) for p in first)
        if not math.isfinite(start):
            raise RunFailedError(f"federated round {server_round}: none of {chunk} candidate clients is ever online "
                                 "(federated.system.availability / availability_trace)")
    chosen: dict[int, None] = {}  # insertion-ordered set: the draw order decides who is kept
    candidates = first
    for _ in range(16):
        for p in candidates[devices.available_mask(candidates, start)]:
            chosen.setdefault(int(p), None)
        if len(chosen) >= count:
            return start, sorted(list(chosen)[:count])
        candidates = rng.integers(0, num_clients, size=chunk)
    online = np.flatnonzero(devices.available_mask(np.arange(num_clients), start))
    rest = rng.permutation(np.setdiff1d(online, np.fromiter(chosen, dtype=np.int64)))
    return start, sorted([*chosen, *(int(p) for p in rest[:count - len(chosen)])])

"""Asynchronous buffered aggregation (FedBuff, Nguyen et al., AISTATS 2022) on the virtual clock.

``federated.system.server = "fedbuff"``: ``clients_per_round`` clients train concurrently; each replies
when its device would have finished (download + compute + upload, :mod:`fedsim.engines.federated.clock`);
every ``buffer_size`` (M) arrivals the server applies :func:`strategies.math.fedbuff_update` — the buffered
updates weighted by ``(1 + staleness) ** -a`` — and a freed slot is given to a new client, online and not
busy, with the model current at that moment. Flower's ``Strategy`` is round-synchronous, so this is a server
mode of fedsim's round loop: it sends messages through the same grid with the strategy's
``configure_train`` (FedAvg's or FedProx's client side), and one "round" is one server update.

Nothing waits for real: arrivals are events on the clock, and a client's training is computed when its
update is needed (its model version is kept until then), so results depend on the seed only. Dispatches
and arrivals are ordered by (simulated time, dispatch number); replacements are drawn keyed by
(seed, dispatch number).
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from fedsim.engines.federated.clock import client_time, record_bytes, sample_available, work_samples
from fedsim.engines.federated.rounds import (
    NO_REPLY,
    RoundLoop,
    RoundResult,
    SampledGrid,
    check_global_model,
    check_round_had_replies,
    sample_clients,
    short_reason,
)
from fedsim.errors import FedsimError, RunFailedError
from fedsim.seeding import derive_seed
from fedsim.wire.array_codec import arrays_to_record, record_to_numpy
from strategies.math import fedbuff_update

log = logging.getLogger("fedsim.federated")

__all__ = ["BufferedServer", "Job"]


@dataclass(order=True)
class Job:
    """A client at work on the clock: dispatched at ``dispatched_s`` with model ``version``; its update
    arrives at ``event_s`` (``lost``: its online window ended first, so nothing arrives; ``partition`` -1
    is a wake-up when nobody was online to dispatch to)."""

    event_s: float
    seq: int
    partition: int = field(compare=False)
    version: int = field(compare=False)
    dispatched_s: float = field(compare=False)
    lost: bool = field(default=False, compare=False)


@dataclass
class BufferedServer:
    """FedBuff's server over a :class:`RoundLoop`'s grid, nodes, strategy and clock."""

    loop: RoundLoop
    concurrency: int
    in_flight: list[Job] = field(default_factory=list)
    """A heap of jobs by (event time, dispatch number)."""
    bases: dict[int, ArrayRecord] = field(default_factory=dict)
    """Model versions that clients still at work started from."""
    version: int = 0
    clock_s: float = 0.0
    seq: int = 0

    # ---- dispatching ---------------------------------------------------------------------------
    def _busy(self, buffered: list[Job]) -> set[int]:
        return {j.partition for j in self.in_flight if j.partition >= 0} | {j.partition for j in buffered}

    def _dispatch(self, partition: int, at_s: float) -> None:
        clock = self.loop.clock
        assert clock is not None
        size = record_bytes(self.bases[self.version])
        full = self.loop.local_steps if self.loop.local_steps > 0 else self.loop.local_epochs
        samples = work_samples(clock.n_train(partition), clock.batch_size, full, self.loop.local_steps > 0)
        arrives = at_s + client_time(partition, size, size, samples, full, clock.devices.profile(partition)).total_s
        lost = False
        if not clock.devices.always_available:
            until = clock.devices.online_until(partition, at_s)
            if arrives > until:
                arrives, lost = until, True
        heapq.heappush(self.in_flight, Job(arrives, self.seq, partition, self.version, at_s, lost))
        self.seq += 1

    def _pick(self, at_s: float, busy: set[int]) -> int | None:
        """A client online at ``at_s`` and not busy, drawn keyed by (seed, dispatch number)."""
        clock, n = self.loop.clock, self.loop.num_clients
        assert clock is not None
        rng = np.random.default_rng(derive_seed(self.loop.seed, "fedbuff-dispatch", self.seq))
        for p in rng.integers(0, n, size=min(64, 4 * n)):
            if int(p) not in busy and clock.devices.available(int(p), at_s):
                return int(p)
        online = np.flatnonzero(clock.devices.available_mask(np.arange(n), at_s))  # few free clients online (rare)
        free = np.setdiff1d(online, np.fromiter(busy, dtype=np.int64))
        return int(rng.choice(free)) if len(free) else None

    def _top_up(self, at_s: float, buffered: list[Job]) -> None:
        """Keep ``concurrency`` clients at work; when nobody free is online, wake up when one comes online."""
        clock = self.loop.clock
        assert clock is not None
        while sum(1 for j in self.in_flight if j.partition >= 0) < self.concurrency:
            busy = self._busy(buffered)
            if len(busy) >= self.loop.num_clients:
                return
            partition = self._pick(at_s, busy)
            if partition is None:
                if any(j.partition < 0 for j in self.in_flight):
                    return
                # nobody free is online: wake up when the first free client of a seeded draw comes online
                draw = np.random.default_rng(derive_seed(self.loop.seed, "fedbuff-wake", self.seq)).integers(
                    0, self.loop.num_clients, size=min(256, 4 * self.loop.num_clients))
                wake = min((clock.devices.next_online(int(p), at_s) for p in draw if int(p) not in busy),
                           default=math.inf)
                if not math.isfinite(wake):
                    raise RunFailedError("FedBuff: no free client is ever online again "
                                         "(federated.system.availability / availability_trace)")
                heapq.heappush(self.in_flight, Job(max(wake, math.nextafter(at_s, math.inf)), self.seq, -1, self.version,
                                                   at_s))
                self.seq += 1
                return
            self._dispatch(partition, at_s)

    def _start(self, arrays: ArrayRecord) -> None:
        clock = self.loop.clock
        assert clock is not None
        self.bases[0] = arrays
        if clock.devices.always_available:  # the first cohort is the synchronous loop's round-1 cohort
            first = sample_clients(self.loop.seed, 1, self.loop.num_clients, self.concurrency)
        else:
            self.clock_s, first = sample_available(self.loop.seed, 1, self.loop.num_clients, self.concurrency,
                                                   clock.devices, 0.0)
        for partition in first:
            self._dispatch(partition, self.clock_s)
        self._top_up(self.clock_s, [])

    # ---- one server update -----------------------------------------------------------------------
    def step(self, grid: Any, server_round: int, arrays: ArrayRecord) -> RoundResult:
        """Wait on the clock for ``buffer_size`` arrivals, train them, apply the buffered update."""
        started = time.perf_counter()
        loop, clock = self.loop, self.loop.clock
        if clock is None:
            raise FedsimError("FedBuff needs the virtual clock")
        if not self.bases:
            self._start(arrays)
        start_s = self.clock_s
        buffered: list[Job] = []
        lost: list[int] = []
        while len(buffered) < clock.system.buffer_size:
            if not self.in_flight:
                raise RunFailedError(f"FedBuff update {server_round}: no client is at work "
                                     f"({len(buffered)} of {clock.system.buffer_size} updates buffered)")
            job = heapq.heappop(self.in_flight)
            self.clock_s = job.event_s
            if job.partition >= 0 and job.lost:
                lost.append(job.partition)
            elif job.partition >= 0:
                buffered.append(job)
            self._top_up(self.clock_s, buffered)
        staleness = {j.seq: self.version - j.version for j in buffered}  # versions applied since it started
        replies, errors = self._train(grid, buffered)
        for partition, reason in errors.items():
            log.warning("FedBuff update %d: client %d failed: %s", server_round, partition, short_reason(reason))
        used = [j for j in buffered if j.partition in replies]
        if not used:
            check_round_had_replies(server_round, [j.partition for j in buffered], errors, [], [])
            new_arrays = arrays
        else:
            current = record_to_numpy(arrays)
            deltas, weights = [], []
            for job in used:
                reply = replies[job.partition]
                base = record_to_numpy(self.bases[job.version])
                model = record_to_numpy(reply.content["arrays"])
                deltas.append({k: model[k] - base[k] for k in current})
                metrics = next(iter(reply.content.metric_records.values()), MetricRecord())
                weights.append(float(metrics.get("num-examples", 1)) if clock.system.buffer_weights == "examples"
                               else 1.0)
            new_arrays = arrays_to_record(fedbuff_update(current, deltas, weights, [staleness[j.seq] for j in used],
                                                         clock.system.staleness_exponent,
                                                         clock.system.server_learning_rate))
            self.version += 1
            self.bases[self.version] = new_arrays
        needed = {j.version for j in self.in_flight} | {self.version}
        self.bases = {v: a for v, a in self.bases.items() if v in needed}
        scores = loop.evaluate(new_arrays)
        if used:
            check_global_model(server_round, scores, len(used))
        samples = sum(int(next(iter(replies[j.partition].content.metric_records.values()),
                                MetricRecord()).get("samples", 0)) for j in used)
        size = record_bytes(arrays)
        loop.totals["bytes"] += 2 * size * len(buffered)
        loop.totals["samples"] += samples
        loop.totals["sim_time_s"] = self.clock_s
        record: dict[str, Any] = {"round": server_round}
        record.update({f"test_{k}": v for k, v in scores.items()})
        order = sorted(range(len(buffered)), key=lambda i: buffered[i].partition)
        record.update({
            "clients": [buffered[i].partition for i in order],
            "staleness": [staleness[buffered[i].seq] for i in order],
            "client_time_s": [round(buffered[i].event_s - buffered[i].dispatched_s, 9) for i in order],
            "aggregated": sorted(j.partition for j in used), "failed": sorted(errors), "offline": sorted(lost),
            "model_version": self.version,
            "bytes_down": size * len(buffered), "bytes_up": size * len(buffered),
            "bytes_total": loop.totals["bytes"], "samples_total": loop.totals["samples"],
            "sim_start_s": start_s, "sim_round_s": self.clock_s - start_s, "sim_time_s": self.clock_s,
            "round_time_s": time.perf_counter() - started,
        })
        return RoundResult(record, new_arrays)

    def _train(self, grid: Any, buffered: list[Job]) -> tuple[dict[int, Any], dict[int, str]]:
        """The buffered clients' local training, one grid call per model version they started from."""
        loop = self.loop
        replies: dict[int, Any] = {}
        errors: dict[int, str] = {}
        for version in sorted({j.version for j in buffered}):
            partitions = sorted(j.partition for j in buffered if j.version == version)
            view = SampledGrid(grid, [loop.nodes.node_of(p) for p in partitions])
            # "server-round" = version + 1: a client's seed is keyed by the model it started from
            configured = list(loop.strategy.configure_train(version + 1, self.bases[version], loop._config(), view))
            messages = [loop._per_client(m, loop._partition_of(m.metadata.dst_node_id), False, version + 1)
                        for m in configured]
            got = loop._by_partition(messages, grid.send_and_receive(messages, timeout=loop.timeout))
            for p in partitions:
                reply = got.get(p)
                if reply is None:
                    errors[p] = NO_REPLY
                elif reply.has_error():
                    errors[p] = reply.error.reason
                else:
                    replies[p] = reply
        return replies, errors

    # ---- checkpoint ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to continue after a checkpoint (jobs at work and the versions they started from)."""
        return {"version": self.version, "clock_s": self.clock_s, "seq": self.seq,
                "in_flight": [[j.event_s, j.seq, j.partition, j.version, j.dispatched_s, j.lost] for j in self.in_flight],
                "bases": {v: {k: np.array(a) for k, a in record_to_numpy(r).items()} for v, r in self.bases.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        self.version, self.clock_s, self.seq = int(state["version"]), float(state["clock_s"]), int(state["seq"])
        self.in_flight = [Job(float(e), int(s), int(p), int(v), float(d), bool(lost))
                          for e, s, p, v, d, lost in state["in_flight"]]
        heapq.heapify(self.in_flight)
        self.bases = {int(v): arrays_to_record(a) for v, a in state["bases"].items()}

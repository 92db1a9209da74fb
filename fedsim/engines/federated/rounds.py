"""fedsim's own federated round loop around a Flower strategy: reproducible, resumable rounds.

Flower's ``Strategy.start`` samples clients with ``random.sample`` over random node ids,
aggregates replies in arrival order and cannot start at round ``t > 1``. This loop keeps the
strategy's own ``configure_train`` / ``aggregate_train`` but decides the rest:

* which clients train in round ``t`` is :func:`sample_clients` ``(seed, t)`` over *partition*
  ids; the strategy sees a :class:`SampledGrid` that holds only those nodes;
* which of them fail (dropouts, told to raise) or are stragglers is :func:`simulated_faults`
  ``(seed, t)`` — deterministic, never timing-based. A straggler's reply comes "too late" and is
  discarded (``federated.straggler_work = "drop"``), or it does partial work — a seeded number of
  local epochs, :func:`partial_work` ``(seed, t, partition)``, sent under :data:`LOCAL_EPOCHS_KEY` —
  and its reply is aggregated like any other (``"partial"``, FedProx's systems heterogeneity);
* replies are aggregated in partition order, whatever order they arrive in;
* a round with nothing to aggregate because clients really failed (an error reply or none), or an
  aggregated model whose test loss is NaN or infinite, stops the run with
  :class:`fedsim.errors.RunFailedError` (exit code 1); rounds already done keep their metrics and
  checkpoint. Simulated dropouts and stragglers are the faults the user asked for: recorded, not fatal;
* after every round the global arrays, the strategy's state and per-partition client state
  (SCAFFOLD's ``c_i``) are checkpointed, so ``--resume`` continues where the run stopped.

It only talks to :class:`flwr.serverapp.Grid`, so Flower's simulation, a deployed SuperLink and
fedsim's in-process grid all run it unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.config import SystemConfig, over_selected
from fedsim.engines.federated import secagg
from fedsim.engines.federated.clock import RoundPlan, message_array_bytes, plan_round, sample_available
from fedsim.engines.federated.devices import Devices
from fedsim.engines.federated.grid_view import SampledGrid
from fedsim.errors import FedsimError, RunFailedError
from fedsim.train import derive_seed

log = logging.getLogger("fedsim.federated")

RUN_KEY = "fedsim-run"
"""ConfigRecord key holding the run's config as JSON (clients are stateless and build from it)."""
FAIL_KEY = "fedsim-fail"
"""ConfigRecord key: this client is a simulated dropout and must raise."""
LOCAL_EPOCHS_KEY = "fedsim-local-epochs"
"""ConfigRecord key: this client is a straggler doing partial work; train this many local epochs
instead of ``federated.local_epochs``."""
LOCAL_STEPS_KEY = "fedsim-local-steps"
"""ConfigRecord key: as :data:`LOCAL_EPOCHS_KEY`, in local steps (runs with ``federated.local_steps`` > 0)."""
CLIENT_STATE_KEY = "client-state"
"""RecordDict key of per-partition client state kept by the server (not counted as traffic)."""
QUERY_PARTITION = MessageType.QUERY
NO_REPLY = "no reply within the round timeout (federated.reply_timeout_s)"

__all__ = [
    "sample_clients", "simulated_faults", "SampledGrid", "discover_partitions", "payload_bytes", "RoundLoop",
    "NodeMap", "DiscoveredNodes", "connect_nodes", "evaluation_cohort",
    "RoundResult", "RUN_KEY", "FAIL_KEY", "CLIENT_STATE_KEY", "NO_REPLY", "num_sampled", "short_reason",
    "LOCAL_EPOCHS_KEY", "LOCAL_STEPS_KEY", "partial_work",
    "check_round_had_replies", "check_global_model", "ClockSetup",
]


# ---- seeded choices ------------------------------------------------------------------------------
def num_sampled(num_clients: int, clients_per_round: int, fraction_fit: float) -> int:
    """Clients per round: ``clients_per_round`` if set, else ``fraction_fit * N`` (at least one)."""
    k = clients_per_round if clients_per_round > 0 else max(1, int(fraction_fit * num_clients))
    if not 1 <= k <= num_clients:
        raise FedsimError(f"federated.clients_per_round = {k} must be in 1..num_clients ({num_clients})")
    return k


def sample_clients(seed: int, server_round: int, num_clients: int, k: int) -> list[int]:
    """The partition ids that train in ``server_round``: a function of (seed, round) only, sorted."""
    rng = np.random.default_rng(derive_seed(seed, "sample-clients", server_round))
    return sorted(int(p) for p in rng.choice(num_clients, size=k, replace=False))


def simulated_faults(
    seed: int, server_round: int, sampled: list[int], dropout_fraction: float, straggler_fraction: float
) -> tuple[list[int], list[int]]:
    """(dropouts, stragglers) among ``sampled``: ``round(f * k)`` of each (at least one when f > 0).

    Dropouts are told to raise in the ClientApp (exercising real failure replies); stragglers
    train but their replies are discarded as too slow, or they do partial work (:func:`partial_work`,
    ``federated.straggler_work``). Disjoint, sorted, keyed by (seed, round).
    """
    rng = np.random.default_rng(derive_seed(seed, "faults", server_round))
    order = [sampled[i] for i in rng.permutation(len(sampled))]

    def count(fraction: float) -> int:
        return 0 if fraction <= 0 else max(1, int(round(fraction * len(sampled))))

    n_drop = min(count(dropout_fraction), len(order))
    n_slow = min(count(straggler_fraction), len(order) - n_drop)
    return sorted(order[:n_drop]), sorted(order[n_drop:n_drop + n_slow])


def partial_work(seed: int, server_round: int, partition_id: int, full: int) -> int:
    """The local epochs (or steps) a straggler doing partial work trains: uniform in ``[1, full]``,
    keyed by (seed, round, partition) only (FedProx: "a random number of local epochs between 1 and E")."""
    rng = np.random.default_rng(derive_seed(seed, "partial-work", server_round, partition_id))
    return int(rng.integers(1, max(int(full), 1) + 1))


def discover_partitions(grid: Grid, num_clients: int, timeout: float = 300.0) -> dict[int, int]:
    """Wait for ``num_clients`` nodes, ask each for its partition id; return partition -> node id.

    The node owns its partition (``node_config["partition-id"]``); the server only learns it.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise FedsimError(f"only {len(nodes)} of federated.num_clients = {num_clients} nodes connected "
                              f"within {timeout:.0f} s")
        time.sleep(0.05)
    messages = [Message(RecordDict({"config": ConfigRecord({})}), node, QUERY_PARTITION, group_id="discover")
                for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    mapping: dict[int, int] = {}
    for reply in replies:
        if reply.has_error():
            raise FedsimError(f"node {reply.metadata.src_node_id} failed to report its partition: "
                              f"{reply.error.reason}")
        metrics = reply.content["metrics"]
        partition_id, count = int(metrics["partition-id"]), int(metrics["num-partitions"])
        if count != num_clients:
            raise FedsimError(f"the nodes hold {count} partitions but federated.num_clients = {num_clients}; "
                              "start as many SuperNodes as clients (flwr: options.num-supernodes)")
        mapping[partition_id] = reply.metadata.src_node_id
    missing = sorted(set(range(num_clients)) - set(mapping))
    if missing:
        raise FedsimError(f"no node reported partition(s) {missing[:10]}")
    return dict(sorted(mapping.items()))


class NodeMap:
    """Which node holds which partition (``num_partitions`` of them). From a discovery round on grids
    with real nodes (Flower's simulation, a SuperLink); fedsim's in-process grid computes it
    (``LocalGrid.node_map``) and creates a node only when it is first sent a message, so nothing here
    is of size N."""

    num_partitions: int

    def node_of(self, partition_id: int) -> int:
        raise NotImplementedError

    def partition_of(self, node_id: int) -> int | None:
        raise NotImplementedError


class DiscoveredNodes(NodeMap):
    def __init__(self, nodes: dict[int, int]) -> None:
        self.nodes = nodes
        self.partitions = {node: p for p, node in nodes.items()}
        self.num_partitions = len(nodes)

    def node_of(self, partition_id: int) -> int:
        return self.nodes[partition_id]

    def partition_of(self, node_id: int) -> int | None:
        return self.partitions.get(node_id)


def connect_nodes(grid: Grid, num_clients: int, timeout: float) -> NodeMap:
    """The grid's own map when it has one (no message), else a discovery round over every node."""
    node_map = getattr(grid, "node_map", None)
    if callable(node_map):
        mapped = node_map()
        if mapped.num_partitions != num_clients:
            raise FedsimError(f"the grid holds {mapped.num_partitions} partitions but federated.num_clients = "
                              f"{num_clients}")
        return mapped
    return DiscoveredNodes(discover_partitions(grid, num_clients, timeout))


def evaluation_cohort(seed: int, server_round: int, num_clients: int, size: int | float) -> list[int]:
    """The clients that score the global model: all of them when ``size`` (an integer count, or a float
    fraction of the population) covers it, else a seeded sample keyed by (seed, round), sorted."""
    count = max(1, int(size * num_clients)) if isinstance(size, float) else int(size)
    if count >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, "evaluate-clients", server_round))
    return sorted(int(p) for p in rng.choice(num_clients, size=count, replace=False))


def payload_bytes(content: RecordDict) -> int:
    """Bytes of model-related arrays in a message (server-kept client state is not traffic), from each array's
    dtype and shape: reading ``data`` would make a LazyArray write its ``np.save`` bytes, a second copy."""
    return message_array_bytes(content, skip=(CLIENT_STATE_KEY,))


def _message(content: RecordDict, node_id: int, message_type: str, server_round: int) -> Message:
    return Message(content, node_id, message_type, group_id=str(server_round))


# ---- failures that must not pass as success ------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WRAPPED = re.compile(r"^<class '([^']*)'>:<'(.*)'>$", re.DOTALL)
_RAISED = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Dropout)): (.+)$")


def short_reason(reason: str, limit: int = 300) -> str:
    """One line of a client's error reply.

    Flower writes ``<class 'pkg.Error'>:<'message'>``: that becomes ``Error: message``. Under Ray the
    message is the actor's whole traceback; its first ``SomeError: message`` line (at the start of a
    line, as Python prints the exception) is the exception the ClientApp raised.
    """
    text = _ANSI.sub("", reason).strip()
    match = _WRAPPED.match(text)
    kind, body = (match.group(1).rsplit(".", 1)[-1], match.group(2)) if match else ("", text)
    lines = [line for line in body.splitlines() if line.strip()]
    raised = next((found for line in lines if (found := _RAISED.match(line.rstrip()))), None) if len(lines) > 1 else None
    if raised:
        line = f"{raised.group(1)}: {raised.group(2)}"
    else:
        first = lines[0].strip() if lines else ""
        line = f"{kind}: {first}" if kind else first
    return line if len(line) <= limit else line[:limit - 1] + "…"


def check_round_had_replies(server_round: int, sampled: list[int], errors: dict[int, str], dropouts: list[int],
                            stragglers: list[int]) -> None:
    """Stop the run when a round produced no usable reply because clients really failed.

    Called when nothing can be aggregated. A round whose sampled clients were all discarded or failed
    *on purpose* — simulated stragglers (``federated.straggler_fraction``) and simulated dropouts
    (``federated.dropout_fraction``, the failure the user asked to simulate) — is recorded and the
    global model carries over unchanged; one in which at least one client failed for real (an error
    reply, or no reply within ``federated.reply_timeout_s``) means the clients cannot train at all
    (empty partitions, a ClientApp that raises, diverging local training), and going on would report
    the untrained model as a result.
    """
    real = {p: reason for p, reason in errors.items() if p not in dropouts}
    discarded = [p for p in stragglers if p not in errors]
    if not real:
        log.warning("round %d: no client update to aggregate (%d simulated dropout(s), %d straggler(s)); "
                    "the global model is unchanged", server_round, len(errors), len(discarded))
        return
    no_reply = sum(1 for reason in real.values() if reason == NO_REPLY)
    first, reason = next(iter(sorted(real.items())))
    parts = [f"{len(real) - no_reply} with an error reply" if len(real) > no_reply else "",
             f"{no_reply} did not reply" if no_reply else "",
             f"{len(errors) - len(real)} simulated dropout(s)" if len(errors) > len(real) else "",
             f"{len(discarded)} straggler(s) discarded" if discarded else ""]
    raise RunFailedError(
        f"federated round {server_round}: no client update to aggregate: {len(real)} of {len(sampled)} sampled "
        f"clients failed ({', '.join(p for p in parts if p)}); first error (client {first}): {short_reason(reason)}")


def check_global_model(server_round: int, scores: dict[str, float], aggregated: int) -> None:
    """Stop the run when the aggregated global model's test loss is NaN or infinite."""
    for key, value in scores.items():
        if key.endswith("loss") and not math.isfinite(value):
            raise RunFailedError(
                f"federated round {server_round}: the global model's test {key} is {value} after aggregating "
                f"{aggregated} client update(s); lower train.lr (or the server learning rate) or check the data")


# ---- the loop ------------------------------------------------------------------------------------
@dataclass
class ClockSetup:
    """What the virtual clock needs (:mod:`fedsim.engines.federated.clock`): the devices, the waiting policy,
    and each client's training-sample count (the server knows its clients' data sizes, as FedScale's does)."""

    devices: Devices
    system: SystemConfig
    n_train: Callable[[int], int]
    batch_size: int


@dataclass
class RoundResult:
    """What one round did (one line of metrics.jsonl)."""

    record: dict[str, Any]
    arrays: ArrayRecord


@dataclass
class RoundLoop:
    """Rounds of one federated run over a grid.

    Attributes
    ----------
    strategy: a Flower strategy built with ``fraction_train = 1`` (see :mod:`strategies`).
    num_clients, clients_per_round: N and k.
    seed: keys sampling and faults.
    run_json: the run config clients build from (sent in every ConfigRecord).
    evaluate: server-side metrics of the global arrays on the test split (``test_`` prefixed).
    dropout_fraction, straggler_fraction: simulated faults per round.
    straggler_work: ``"drop"`` (stragglers' replies discarded) or ``"partial"`` (stragglers train
        :func:`partial_work` epochs — steps when ``local_steps`` > 0 — and are aggregated).
    local_epochs, local_steps: the run's full local work (``federated.local_epochs`` / ``local_steps``),
        the upper bound of a straggler's partial work.
    timeout: seconds to wait for a round's replies.
    """

    strategy: Strategy
    num_clients: int
    clients_per_round: int
    seed: int
    run_json: str
    evaluate: Callable[[ArrayRecord], dict[str, float]]
    dropout_fraction: float = 0.0
    straggler_fraction: float = 0.0
    timeout: float = 600.0
    straggler_work: str = "drop"
    local_epochs: int = 1
    local_steps: int = 0
    uses_client_state: bool = False
    client_state: dict[int, ArrayRecord] = field(default_factory=dict)
    nodes: NodeMap = field(default_factory=lambda: DiscoveredNodes({}))
    """partition id <-> node id (learned by :meth:`connect`)."""
    totals: dict[str, float] = field(default_factory=lambda: {"bytes": 0.0, "samples": 0.0, "sim_time_s": 0.0})
    clock: ClockSetup | None = None
    """The virtual clock (None: rounds are not timed; fedsim's server always sets one)."""
    secure_aggregation: bool = False
    """Training rounds go through Flower's SecAgg+ (:mod:`fedsim.engines.federated.secagg`)."""

    def connect(self, grid: Grid) -> None:
        """Learn which node holds which partition (before the first round)."""
        # Start-up, not a round: SuperNodes may still be connecting and each query starts a ClientApp
        # process, so a short reply timeout (federated.reply_timeout_s) must not apply here.
        self.nodes = connect_nodes(grid, self.num_clients, max(self.timeout, 300.0))

    def _partition_of(self, node_id: int) -> int:
        partition_id = self.nodes.partition_of(node_id)
        if partition_id is None:
            raise FedsimError(f"node {node_id} holds no partition of this run")
        return partition_id

    def _config(self, extra: dict[str, Any] | None = None) -> ConfigRecord:
        return ConfigRecord({RUN_KEY: self.run_json, **(extra or {})})

    def _partial(self, server_round: int, stragglers: list[int]) -> dict[int, int]:
        """Straggler -> its local epochs (steps when ``local_steps`` > 0) when stragglers do partial work."""
        if self.straggler_work != "partial":
            return {}
        full = self.local_steps if self.local_steps > 0 else self.local_epochs
        return {p: partial_work(self.seed, server_round, p, full) for p in stragglers}

    def _per_client(self, message: Message, partition_id: int, fail: bool, server_round: int,
                    work: int | None = None) -> Message:
        """A message of its own for one client: a fresh RecordDict/ConfigRecord (strategies share one)."""
        content = RecordDict(dict(message.content.items()))
        config_key = getattr(self.strategy, "configrecord_key", "config")
        config = ConfigRecord(dict(content[config_key].items())) if config_key in content else self._config()
        config[FAIL_KEY] = fail
        if work is not None:
            config[LOCAL_STEPS_KEY if self.local_steps > 0 else LOCAL_EPOCHS_KEY] = int(work)
        content[config_key] = config
        if self.uses_client_state:
            content[CLIENT_STATE_KEY] = self.client_state.get(partition_id, ArrayRecord())
        return _message(content, message.metadata.dst_node_id, message.metadata.message_type, server_round)

    def _by_partition(self, sent: list[Message], replies: Iterable[Message]) -> dict[int, Message]:
        """Replies keyed by the partition they answer for.

        A reply normally comes from the client's node; an error reply the SuperLink writes itself for
        a node it found offline (a dead SuperNode) carries the SuperLink's id instead, so it is
        matched to the message it answers.
        """
        replies = list(replies)  # the messages' ids are set once they were pushed
        asked = {m.metadata.message_id: self._partition_of(m.metadata.dst_node_id) for m in sent if m.metadata.message_id}
        out: dict[int, Message] = {}
        for reply in replies:
            partition_id = self.nodes.partition_of(reply.metadata.src_node_id)
            if partition_id is None:
                partition_id = asked.get(reply.metadata.reply_to_message_id)
            if partition_id is not None:
                out[partition_id] = reply
        return out

    def round(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> RoundResult:
        """Configure, send, collect in partition order, aggregate, evaluate."""
        started = time.perf_counter()
        start_s = float(self.totals.get("sim_time_s", 0.0))
        sampled, start_s = self._sample(server_round, start_s)
        dropouts, stragglers = simulated_faults(self.seed, server_round, sampled, self.dropout_fraction,
                                                self.straggler_fraction)
        partial = self._partial(server_round, stragglers)
        discarded = [] if partial else stragglers  # stragglers whose replies come "too late"
        view = SampledGrid(grid, [self.nodes.node_of(p) for p in sampled])
        configured = {self._partition_of(m.metadata.dst_node_id): m
                      for m in self.strategy.configure_train(server_round, arrays, self._config(), view)}
        plan = self._plan(start_s, sampled, configured, partial, dropouts, discarded)
        work = {**partial, **(plan.partial if plan else {})}
        messages = [self._per_client(configured[p], p, p in dropouts, server_round, work.get(p))
                    for p in (plan.send if plan else sorted(configured))]
        bytes_down = sum(payload_bytes(m.content) for m in messages)
        if plan is not None:  # late clients downloaded the model too (they were not sent it only to save time here)
            bytes_down += sum(plan.bytes_down[p] for p in plan.late)
        if self.secure_aggregation:  # SecAgg+: stand-in replies carrying the unmasked mean (secagg.py)
            replies = secagg.secure_round(grid, messages, server_round, self._partition_of, self.strategy,
                                          timeout=self.timeout, late=discarded,
                                          n_train=self.clock.n_train if self.clock is not None else None)
        else:
            replies = self._by_partition(messages, grid.send_and_receive(messages, timeout=self.timeout))
        ordered, failed, errors = [], [], {}
        bytes_up, samples = 0, 0
        for partition_id in sorted(self._partition_of(m.metadata.dst_node_id) for m in messages):
            reply = replies.get(partition_id)
            if reply is None:
                failed.append(partition_id)
                errors[partition_id] = NO_REPLY
            elif reply.has_error():
                failed.append(partition_id)
                errors[partition_id] = reply.error.reason
            elif partition_id in discarded:
                continue  # arrived "too late": discarded, not aggregated, not counted as received
            else:
                bytes_up += payload_bytes(reply.content)
                metrics = next(iter(reply.content.metric_records.values()), MetricRecord())
                samples += int(metrics.get("samples", 0))
                if self.uses_client_state and CLIENT_STATE_KEY in reply.content:
                    self.client_state[partition_id] = reply.content.pop(CLIENT_STATE_KEY)
                ordered.append(reply)
        for partition_id, reason in errors.items():
            log.warning("round %d: client %d failed: %s", server_round, partition_id, short_reason(reason))
        if not ordered:
            if plan is not None and (plan.late or plan.offline):
                log.warning("round %d: %d sampled client(s) would reply after the server stopped waiting and %d went "
                            "offline", server_round, len(plan.late), len(plan.offline))
            check_round_had_replies(server_round, sampled, errors, dropouts, discarded)
        new_arrays, train_metrics = self.strategy.aggregate_train(server_round, ordered) if ordered else (None, None)
        if new_arrays is not None:
            arrays = new_arrays
        scores = self.evaluate(arrays)
        if new_arrays is not None:
            check_global_model(server_round, scores, len(ordered))
        self.totals["bytes"] += bytes_down + bytes_up
        self.totals["samples"] += samples
        record: dict[str, Any] = {"round": server_round}
        record.update({f"test_{k}": v for k, v in scores.items()})
        for key, value in (train_metrics or {}).items():
            if key not in ("samples", "local-steps") and isinstance(value, (int, float)):
                record[f"train_{key}"] = float(value)
        record.update({
            "clients": sampled, "aggregated": [self._partition_of(r.metadata.src_node_id) for r in ordered],
            "failed": failed, "dropouts": [p for p in failed if p in dropouts], "stragglers": stragglers,
            # stragglers doing partial work: their local epochs (steps), in the order of "stragglers"
            **({"partial_steps" if self.local_steps > 0 else "partial_epochs": [partial[p] for p in stragglers]}
               if partial else {}),
            "bytes_down": bytes_down, "bytes_up": bytes_up,
            "bytes_total": self.totals["bytes"], "samples_total": self.totals["samples"],
            "round_time_s": time.perf_counter() - started,
        })
        if plan is not None:
            self.totals["sim_time_s"] = plan.end_s
            record.update(clock_record(plan))
        return RoundResult(record, arrays)

    def _sample(self, server_round: int, start_s: float) -> tuple[list[int], float]:
        """This round's cohort (over-selected when asked) among the clients online at its start."""
        count = self.clients_per_round
        if self.clock is not None and self.clock.system.over_selection > 0:
            count = over_selected(count, self.clock.system.over_selection)
        if self.clock is None or self.clock.devices.always_available:
            return sample_clients(self.seed, server_round, self.num_clients, count), start_s
        start_s, sampled = sample_available(self.seed, server_round, self.num_clients, count, self.clock.devices,
                                            start_s)
        return sampled, start_s

    def _plan(self, start_s: float, sampled: list[int], configured: dict[int, Message], partial: dict[int, int],
              dropouts: list[int], discarded: list[int]) -> RoundPlan | None:
        """The clock's plan: who is sent the round, with how much work, and when the server stops waiting."""
        if self.clock is None:
            return None
        clock, system = self.clock, self.clock.system
        sizes = {p: message_array_bytes(configured[p].content, skip=(CLIENT_STATE_KEY,)) for p in sampled}
        return plan_round(
            start_s=start_s, sampled=sampled, devices=clock.devices, bytes_down=sizes, bytes_up=sizes,
            n_train={p: clock.n_train(p) for p in sampled}, batch_size=clock.batch_size,
            full_units=self.local_steps if self.local_steps > 0 else self.local_epochs, by_steps=self.local_steps > 0,
            aggregate=self.clients_per_round if system.over_selection > 0 else len(sampled),
            deadline_s=system.deadline_s, late_work=system.late_work, units=partial, no_reply=dropouts,
            discarded=discarded)

    def evaluate_clients(self, grid: Grid, arrays: ArrayRecord, server_round: int,
                         cohort: list[int] | None = None) -> dict[int, dict[str, float]]:
        """The clients of ``cohort`` (default: every client) score ``arrays`` on their own held-out
        data; partition -> metrics."""
        cohort = list(range(self.num_clients)) if cohort is None else cohort
        messages = [_message(RecordDict({"arrays": arrays, "config": self._config({FAIL_KEY: False})}),
                             self.nodes.node_of(p), MessageType.EVALUATE, server_round) for p in cohort]
        out: dict[int, dict[str, float]] = {}
        for partition_id, reply in self._by_partition(
                messages, grid.send_and_receive(messages, timeout=self.timeout)).items():
            if reply.has_error():
                log.warning("client %d failed to evaluate: %s", partition_id, reply.error.reason.splitlines()[0])
                continue
            metrics = reply.content["metrics"]
            out[partition_id] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        return dict(sorted(out.items()))


def clock_record(plan: RoundPlan) -> dict[str, Any]:
    """The clock's part of a round's metrics line: when it started and ended, and every sampled client's
    planned seconds (in the order of ``clients``)."""
    return {
        "sim_start_s": plan.start_s, "sim_round_s": plan.round_s, "sim_time_s": plan.end_s,
        "client_time_s": [round(plan.times[p].total_s, 9) for p in plan.sampled],
        "late": plan.late, "offline": plan.offline,
        **({"deadline_partial": [[p, w] for p, w in sorted(plan.partial.items())]} if plan.partial else {}),
    }


def run_json(run_dict: dict[str, Any]) -> str:
    """The run config as clients receive it (stable key order: same text, same cache key)."""
    return json.dumps(run_dict, sort_keys=True, default=str)

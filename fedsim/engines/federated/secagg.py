"""Flower's SecAgg+ in fedsim's rounds (``federated.secure_aggregation = true``): the server learns only the
weighted mean of the clients' updates.

Flower 1.42's protocol speaks the legacy layout: ``secaggplus_mod`` (client) reads the ``fitins.*`` records and
the ``fitres.*`` reply of the ClientApp it wraps, and ``SecAggPlusWorkflow`` (server) takes a ``LegacyContext``
whose legacy strategy's ``configure_fit(round, parameters, client_manager)`` names the clients, then hands
``aggregate_fit`` every client's ``FitRes`` with its parameters *replaced by the unmasked aggregate*. fedsim's
apps speak ``arrays``/``config``/``metrics``. This module adapts the two, keeping fedsim's own round loop:

* server, :func:`secure_round`: the round loop's per-client messages (already configured by the strategy, with
  fedsim's keys: the run, simulated dropouts, partial work) become the ``FitIns`` a small legacy adapter
  returns from ``configure_fit``; the workflow runs its four stages (setup, share keys, collect masked
  vectors, unmask) over the grid; the unmasked mean comes back as one *stand-in reply* per contributing
  client — the client's own metrics, the mean as its arrays — which the strategy's ``aggregate_train``
  then averages as usual (the mean of equal arrays is that array; FedAvgM/FedOpt take their server step
  on it). Which clients contributed, failed or were too late is read off the protocol's replies;
* client, :func:`secagg_client_mod` (registered on fedsim's ``train`` handler): a message without SecAgg+
  records is passed on untouched (non-SecAgg runs are byte-for-byte what they were); a SecAgg+ message
  goes through Flower's ``secaggplus_mod``, which calls fedsim's ``train`` at the collect-masked-vectors
  stage through a layout adapter: ``fitins.*`` -> ``arrays``/``config``, and the reply's
  ``arrays``/``metrics`` -> ``fitres.*``.

Weighting. Each client uploads the masked, quantised ``[q_i, q_i/Q * Δ_i]`` with ``q_i = round(n_i /
max_weight * Q)``, ``n_i`` its weight (the strategy's ``weighted_by_key``, fedsim's ``num-examples``) and
``Δ_i`` its *update* (trained arrays minus the arrays it received); the server unmasks the sums and divides:
``Σ q_i Δ_i / Σ q_i`` — FedAvg's weighted mean of the updates, and ``global + mean update`` is FedAvg's
weighted mean of the models. Updates rather than models are summed because quantisation clips to
``±clipping_range`` (8): updates are small where weights need not be. ``max_weight`` is the largest
training-set size among the round's clients (the server's clock knows them), so no weight exceeds it. A
strategy without ``weighted_by_key`` gets uniform weights (``n_i = max_weight = 1``).

Quantisation tolerance. Stochastic rounding moves each client's weighted update by less than one step
``2 c / Q`` (c = 8, Q = 2**22: 3.8e-6); unmasking divides the sum by ``Σ q_i ≈ Q Σ n_i / max_weight``, so
one round's aggregate is within ``m · (2c/Q) · max_weight / Σ n_i`` of FedAvg's (m contributing clients;
:func:`aggregate_tolerance`), plus float32 rounding of the result and the weights' rounding to ``q_i``
(relative ``≤ max_weight / (2 n_i Q)``). The masks are random (``os.urandom``) but cancel exactly: on the
local engine the aggregate is even reproducible, as the rounding draws come from the client's seeded NumPy
generator. Sums stay below the modulus 2**32 for up to :data:`MAX_CLIENTS` clients a round.

Dropouts. Every sampled client is every other's neighbour (``num_shares`` = all, i.e. SecAgg with Flower's
SecAgg+ machinery) and a key is rebuilt from :func:`reconstruction_threshold` ``(k) = k // 2 + 1`` shares
(an honest majority), so up to ``k - threshold`` clients may be lost *after sharing keys* — at the
collect-masked-vectors stage (their pairwise masks are rebuilt from their neighbours' shares) or at
unmask. fedsim's simulated dropouts (``federated.dropout_fraction``) raise in ``train``, which the mod
calls only at the collect-masked-vectors stage: exactly the tolerated kind. A straggler whose reply would be
discarded (``straggler_work = "drop"``) trains, but its masked vector is held back from the workflow ("too
late"): it counts as lost at that stage, and is recorded as a straggler, as without SecAgg+. Flower 1.42
cannot recover from a client lost at setup or share-keys (no neighbour holds its shares), nor from more
losses than the threshold allows: such a round stops the run with :class:`fedsim.errors.RunFailedError`.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, SimpleClientManager
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedsim.engines.federated.grid_view import SampledGrid
from fedsim.errors import FedsimError, RunFailedError
from fedsim.wire import flower_private as fp
from fedsim.wire.array_codec import arrays_to_record, record_to_numpy

__all__ = [
    "secure_round", "secagg_client_mod", "aggregate_tolerance", "reconstruction_threshold", "LAYOUT_KEY",
    "CLIPPING_RANGE", "QUANTIZATION_RANGE", "MODULUS_RANGE", "MAX_CLIENTS", "DEFAULT_MAX_WEIGHT",
]

log = logging.getLogger("fedsim.federated")

CLIPPING_RANGE = 8.0
"""Weighted update entries are clipped to ``±CLIPPING_RANGE`` before quantisation (Flower's default)."""
QUANTIZATION_RANGE = 2**22
"""Quantisation levels over ``[-c, c]`` (Flower's default): one step is ``2 c / Q`` = 3.8e-6."""
MODULUS_RANGE = 2**32
"""Masks and sums live modulo this (Flower's default; the largest it allows)."""
MAX_CLIENTS = MODULUS_RANGE // QUANTIZATION_RANGE - 1
"""The most clients a round whose quantised sum (each client < Q) cannot wrap around the modulus."""
DEFAULT_MAX_WEIGHT = 1000.0
"""``max_weight`` when the server does not know its clients' data sizes (Flower's default)."""
LAYOUT_KEY = "fedsim-secagg-layout"
"""FitIns config key (JSON): the record keys and array names of fedsim's layout, and the weight's metric."""

_SCALARS = (bool, bytes, float, int, str)


def reconstruction_threshold(num_clients: int) -> int:
    """Shares needed to rebuild a client's key among ``num_clients`` all-neighbour clients: a majority
    (``k // 2 + 1``, at least 2); ``k - threshold`` clients may be lost after sharing keys."""
    return max(2, num_clients // 2 + 1)


def aggregate_tolerance(num_clients: int, max_weight: float, total_weight: float, *,
                        clipping_range: float = CLIPPING_RANGE, quantization_range: int = QUANTIZATION_RANGE) -> float:
    """Largest difference, entry by entry, between one round's SecAgg+ aggregate and FedAvg's weighted mean of
    the same ``num_clients`` updates with weights summing to ``total_weight`` (float32 rounding of the result
    and the weights' rounding to integers aside; see the module docstring)."""
    return num_clients * (2.0 * clipping_range / quantization_range) * max_weight / total_weight


# ---- server -------------------------------------------------------------------------------------------
class _NodeProxy(fp.ClientProxy):
    """What a legacy ``configure_fit`` names a client by: the workflow reads only ``node_id``."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def _unused(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("SecAggPlusWorkflow talks to the grid, never to a client proxy")

    get_properties = get_parameters = fit = evaluate = reconnect = _unused


class _FitAdapter(LegacyStrategy):
    """The legacy strategy the workflow drives: ``configure_fit`` returns the round loop's messages as FitIns,
    ``aggregate_fit`` keeps the results (each carrying the unmasked mean). fedsim's strategy aggregates later."""

    def __init__(self, instructions: list[tuple[_NodeProxy, FitIns]]) -> None:
        self.instructions = instructions
        self.results: list[tuple[Any, FitRes]] | None = None

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        return list(self.instructions)

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[Any, dict[str, Any]]:
        self.results = list(results)
        return (self.results[0][1].parameters if self.results else None), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[Any, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> Any:
        return None


class _StageGrid(SampledGrid):
    """The real grid as the workflow sees it (only the round's nodes): records each stage's error replies and
    masked-vector replies by node, and holds back the masked vectors of the clients whose replies come too
    late."""

    def __init__(self, grid: Grid, nodes: Iterable[int], late: Iterable[int]) -> None:
        super().__init__(grid, sorted(set(nodes)))
        self.nodes, self.late = set(nodes), set(late)
        self.stage = ""
        self.active: dict[str, int] = {}
        """Stage -> clients that answered it (what the workflow went on with)."""
        self.errors: dict[int, Message] = {}
        """Node -> its first error reply."""
        self.masked: dict[int, Message] = {}
        """Node -> its collect-masked-vectors reply (the workflow summed it)."""
        self.withheld: dict[int, Message] = {}
        """Node -> its collect-masked-vectors reply, held back as too late."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if messages:
            self.stage = str(messages[0].content[fp.SECAGG_CONFIGS_RECORD][fp.SECAGG_STAGE_KEY])
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        collecting = self.stage == fp.SECAGG_COLLECT_MASKED_VECTORS
        kept = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in self.nodes:  # an error the SuperLink wrote for an offline node carries its own id
                node = asked.get(reply.metadata.reply_to_message_id, node)
            if reply.has_error():
                self.errors.setdefault(node, reply)
            elif collecting and node in self.late:
                self.withheld[node] = reply
                continue
            elif collecting:
                self.masked[node] = reply
            kept.append(reply)
        self.active[self.stage] = sum(1 for r in kept if not r.has_error())
        return kept


def _fit_ins(message: Message, weight_key: str | None) -> tuple[FitIns, list[str]]:
    """A round loop message (one ArrayRecord, one ConfigRecord) as legacy FitIns; also its array names."""
    content = message.content
    arrays, configs = list(content.array_records.items()), list(content.config_records.items())
    if len(arrays) != 1 or len(configs) != 1 or len(content) != 2:
        raise FedsimError(f"SecAgg+ carries one ArrayRecord and one ConfigRecord to each client; this strategy "
                          f"sends {sorted(content.keys())}")
    (array_key, record), (config_key, config_record) = arrays[0], configs[0]
    config = dict(config_record.items())
    lists = sorted(k for k, v in config.items() if not isinstance(v, _SCALARS))
    if lists:
        raise FedsimError(f"SecAgg+'s legacy FitIns config holds scalars only; this round's config has lists {lists}")
    names = list(record.keys())
    config[LAYOUT_KEY] = json.dumps({"arrays": array_key, "config": config_key, "names": names, "weight": weight_key})
    tensors = [a.data if a.stype == "numpy.ndarray" else ndarray_to_bytes(a.numpy()) for a in record.values()]
    return FitIns(Parameters(tensors=tensors, tensor_type="numpy.ndarray"), config), names


def _same_arrays(first: ArrayRecord, other: ArrayRecord) -> bool:
    return other is first or (list(other.keys()) == list(first.keys())
                              and all(other[k].data == first[k].data for k in first.keys()))


def _plus_update(base: ArrayRecord, names: Sequence[str], update: Sequence[np.ndarray]) -> ArrayRecord:
    """``base + update`` in float64, each array back in its own dtype (integers rounded)."""
    current = record_to_numpy(base)
    out: dict[str, np.ndarray] = {}
    for name, delta in zip(names, update, strict=True):
        value = np.asarray(current[name], dtype=np.float64) + np.asarray(delta, dtype=np.float64).reshape(
            current[name].shape)
        dtype = current[name].dtype
        out[name] = (value if np.issubdtype(dtype, np.floating) else np.rint(value)).astype(dtype)
    return arrays_to_record(out)


def secure_round(grid: Grid, messages: Sequence[Message], server_round: int, partition_of: Callable[[int], int],
                 strategy: Any, *, timeout: float | None = None, n_train: Callable[[int], int] | None = None,
                 late: Iterable[int] = ()) -> dict[int, Message]:
    """Send one training round's per-client ``messages`` through Flower's SecAgg+ workflow; return the
    replies by partition, as the round loop reads them.

    A client whose masked vector was aggregated gets a stand-in reply: its own metrics and, as its arrays,
    the unmasked weighted mean (so ``strategy.aggregate_train`` returns that mean and takes its server step
    on it). A client that failed gets its error reply; one that did not answer, nothing. ``late`` are the
    partitions whose replies come too late (discarded stragglers): their masked vectors are held back from
    the protocol and they get a stand-in with their metrics only, which the round loop discards.
    ``n_train(partition)`` is a client's training-set size (the weights' bound ``max_weight``).

    Raises :class:`RunFailedError` when the protocol cannot finish (fewer than two clients, or more lost
    than the reconstruction threshold tolerates).
    """
    if not messages:
        return {}
    nodes = {m.metadata.dst_node_id: partition_of(m.metadata.dst_node_id) for m in messages}
    count = len(nodes)
    if count < 2:
        raise RunFailedError(f"round {server_round}: SecAgg+ sums at least two clients' updates; this round sends "
                             f"the model to {count} (raise federated.clients_per_round)")
    if count > MAX_CLIENTS:
        raise FedsimError(f"round {server_round}: SecAgg+ sums at most {MAX_CLIENTS} clients a round (its "
                          f"quantised sum would exceed the modulus 2**32); this round has {count}")
    threshold = reconstruction_threshold(count)
    # FedAvg family: weighted by the strategy's weighted_by_key; a strategy without one (fedsim's DP-FedAvg
    # wrapper, whose mean is uniform) gets uniform weights.
    weight_key = getattr(strategy, "weighted_by_key", None)
    if weight_key is None:
        max_weight = 1.0
    else:
        max_weight = float(max(n_train(p) for p in nodes.values())) if n_train is not None else DEFAULT_MAX_WEIGHT
    instructions, names = [], []
    base = next(iter(messages[0].content.array_records.values()), ArrayRecord())
    for message in messages:
        fitins, names = _fit_ins(message, weight_key)
        if not _same_arrays(base, next(iter(message.content.array_records.values()))):
            raise FedsimError("SecAgg+ sums updates of one global model: every client of a round must be sent the "
                              "same arrays")
        instructions.append((_NodeProxy(message.metadata.dst_node_id), fitins))
    adapter = _FitAdapter(instructions)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=adapter, client_manager=SimpleClientManager())
    context.state[fp.WORKFLOW_CONFIGS_RECORD] = ConfigRecord({fp.WORKFLOW_ROUND_KEY: server_round})
    context.state[fp.WORKFLOW_PARAMS_RECORD] = base
    too_late = set(late)
    stages = _StageGrid(grid, nodes, (node for node, p in nodes.items() if p in too_late))
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=threshold, max_weight=max_weight,
                                  clipping_range=CLIPPING_RANGE, quantization_range=QUANTIZATION_RANGE,
                                  modulus_range=MODULUS_RANGE, timeout=timeout)
    log.debug("round %d: SecAgg+ over %d clients (threshold %d, max_weight %g)", server_round, count, threshold,
              max_weight)
    saved = random.getstate()  # the workflow shuffles its clients with the server's global generator
    try:
        workflow(stages, context)
    finally:
        random.setstate(saved)
    if not adapter.results:
        raise RunFailedError(_halted(server_round, stages, nodes, threshold))
    mean = _plus_update(base, names, parameters_to_ndarrays(adapter.results[0][1].parameters))
    replies: dict[int, Message] = {nodes[node]: reply for node, reply in stages.errors.items() if node in nodes}
    for node, reply in stages.withheld.items():
        metrics = MetricRecord(dict(fp.recorddict_to_fitres(reply.content, keep_input=True).metrics))
        replies[nodes[node]] = fp.clone_message(reply, RecordDict({"metrics": metrics}))
    for proxy, fitres in adapter.results:
        reply = stages.masked[proxy.node_id]
        replies[nodes[proxy.node_id]] = fp.clone_message(
            reply, RecordDict({"arrays": mean, "metrics": MetricRecord(dict(fitres.metrics))}))
    return replies


_WRAPPED = re.compile(r"^<class '(?:[\w.]*\.)?(\w+)'>:<'(.*)'>$", re.DOTALL)


def _reason(reply: Message) -> str:
    """An error reply's reason on one line (``<class 'pkg.Error'>:<'message'>`` as ``Error: message``)."""
    text = reply.error.reason.strip()
    match = _WRAPPED.match(text)
    line = (f"{match.group(1)}: {match.group(2)}" if match else text).strip().splitlines()
    return line[0][:200] if line else ""


def _halted(server_round: int, stages: _StageGrid, nodes: dict[int, int], threshold: int) -> str:
    reasons = "; ".join(f"client {nodes.get(node, node)}: {_reason(reply)}"
                        for node, reply in sorted(stages.errors.items(), key=lambda item: nodes.get(item[0], -1)))
    left = stages.active.get(stages.stage, 0)
    return (f"round {server_round}: SecAgg+ stopped at its '{stages.stage}' stage with {left} of {len(nodes)} "
            f"clients; a client's key is rebuilt from {threshold} shares, so at most {len(nodes) - threshold} may be "
            f"lost, and only after sharing keys (lower federated.dropout_fraction / straggler_fraction or raise "
            f"federated.clients_per_round){': ' + reasons if reasons else ''}")


# ---- client -------------------------------------------------------------------------------------------
def secagg_client_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: a SecAgg+ message goes through Flower's ``secaggplus_mod``, which trains (``call_next``,
    in fedsim's layout) at its collect-masked-vectors stage; any other message is passed on untouched."""
    if fp.SECAGG_CONFIGS_RECORD not in msg.content:
        return call_next(msg, ctxt)
    stage = msg.content[fp.SECAGG_CONFIGS_RECORD].get(fp.SECAGG_STAGE_KEY)
    if stage == fp.SECAGG_SETUP:  # a new round: whatever a lost round left (a dropout's keys) is forgotten, as
        ctxt.state.pop(fp.SECAGG_STATE_RECORD, None)  # the mod's own restart does, without its warning

    def train_in_legacy_layout(message: Message, context: Context) -> Message:
        return _train_in_legacy_layout(message, context, call_next)

    reply = secaggplus_mod(msg, ctxt, train_in_legacy_layout)
    if stage == fp.SECAGG_UNMASK:  # the round's keys are done with; no state is the state after a round
        ctxt.state.pop(fp.SECAGG_STATE_RECORD, None)
    return reply


def _train_in_legacy_layout(msg: Message, ctxt: Context, train: Callable[[Message, Context], Message]) -> Message:
    """``fitins.*`` -> fedsim's ``arrays``/``config``; train; the reply's update and metrics -> ``fitres.*``."""
    fitins = fp.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    layout = json.loads(str(config.pop(LAYOUT_KEY)))
    names: list[str] = list(layout["names"])
    received = parameters_to_ndarrays(fitins.parameters)
    if len(received) != len(names):
        raise FedsimError(f"SecAgg+: {len(received)} arrays received for {len(names)} names")
    content = RecordDict({str(layout["arrays"]): arrays_to_record(dict(zip(names, received, strict=True))),
                          str(layout["config"]): ConfigRecord(config)})
    reply = train(fp.clone_message(msg, content), ctxt)
    if reply.has_error():
        raise FedsimError(f"SecAgg+: the ClientApp replied with an error: {reply.error.reason}")
    out = reply.content
    arrays, metrics = list(out.array_records.values()), list(out.metric_records.values())
    if len(arrays) != 1 or len(metrics) != 1 or len(out) != 2:
        raise FedsimError(f"SecAgg+ sums one ArrayRecord per client with one MetricRecord; the reply carries "
                          f"{sorted(out.keys())}")
    trained = record_to_numpy(arrays[0])
    if sorted(trained) != sorted(names):
        raise FedsimError("SecAgg+: the trained arrays are not the ones received")
    update = [np.asarray(trained[name], dtype=np.float64) - np.asarray(value, dtype=np.float64)
              for name, value in zip(names, received, strict=True)]
    values = dict(metrics[0].items())
    lists = sorted(k for k, v in values.items() if not isinstance(v, (int, float)))
    if lists:
        raise FedsimError(f"SecAgg+'s legacy FitRes metrics are scalars; the reply has lists {lists}")
    weight = 1 if layout["weight"] is None else values.get(str(layout["weight"]))
    if weight is None:
        raise FedsimError(f"SecAgg+: the reply's metrics have no weight '{layout['weight']}'")
    _warn_if_clipped(ctxt, update, float(weight))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), weight, values)  # type: ignore[arg-type]
    return Message(fp.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def _warn_if_clipped(ctxt: Context, update: list[np.ndarray], weight: float) -> None:
    """Warn when the weighted update leaves the clipping range: the aggregate is then no longer FedAvg's."""
    state = ctxt.state[fp.SECAGG_STATE_RECORD] if fp.SECAGG_STATE_RECORD in ctxt.state else {}
    max_weight, clip = (float(state.get(key, 0.0)) for key in fp.SECAGG_STATE_FIELDS)
    peak = max((float(np.abs(u).max()) for u in update if u.size), default=0.0)
    if max_weight > 0 and clip > 0 and peak * weight / max_weight > clip:
        log.warning("SecAgg+: an update entry of %.4g (weighted: %.4g) exceeds the clipping range ±%g and is clipped; "
                    "the aggregate differs from FedAvg's", peak, peak * weight / max_weight, clip)

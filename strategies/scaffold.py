"""SCAFFOLD (Karimireddy et al., 2020) as a Flower strategy: server and client control variates.

Round ``t``: the server sends the global model ``x`` and its control ``c``; client ``i`` runs
``K`` local steps of ``y <- y - lr (g_i(y) + c - c_i)`` (the correction enters the shared
training loop as a linear extra loss, see :mod:`strategies.client`), then replies with ``y``
and ``dc_i = c_i+ - c_i`` where ``c_i+ = c_i - c + (x - y) / (K lr)``. The server applies
:func:`strategies.math.scaffold_server_update`.

The client's own ``c_i`` is per-partition state: fedsim's round loop keeps it (and checkpoints
it) and ships it with the client's message under ``client-state``, because simulated clients
are stateless processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedsim.wire.array_codec import arrays_to_record, record_to_numpy
from strategies import math as fm

CONTROL_KEY = "scaffold-control"
"""RecordDict key of the server control variate ``c`` in train messages."""
DELTA_CONTROL_KEY = "scaffold-delta-control"
"""RecordDict key of ``c_i+ - c_i`` in train replies."""

__all__ = ["Scaffold", "CONTROL_KEY", "DELTA_CONTROL_KEY", "to_numpy", "to_record"]


# Records <-> NumPy through fedsim's codec (read-only views in, np.save's bytes out).
to_numpy = record_to_numpy
to_record = arrays_to_record


class Scaffold(FedAvg):
    """SCAFFOLD: stochastic controlled averaging.

    Parameters
    ----------
    num_clients: N, the number of all clients (the control update is scaled by ``1/N``).
    trainable_keys: names of the arrays that gradients update; the others (BatchNorm running
        statistics) are averaged with example-count weights.
    server_learning_rate: global step size ``lr_g`` on the mean client delta.
    **kwargs: :class:`flwr.serverapp.strategy.FedAvg` arguments (sampling is fedsim's job).
    """

    uses_client_state = True

    def __init__(
        self,
        *,
        num_clients: int,
        trainable_keys: Sequence[str] = (),
        server_learning_rate: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_clients < 1:
            raise ValueError(f"Scaffold needs num_clients >= 1, got {num_clients}")
        self.num_clients = num_clients
        self.trainable_keys = tuple(trainable_keys)
        self.server_learning_rate = server_learning_rate
        self.control: dict[str, np.ndarray] | None = None
        self.current_arrays: dict[str, np.ndarray] | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> SCAFFOLD settings:")
        log(INFO, "\t│\t├── clients (N): %d", self.num_clients)
        log(INFO, "\t│\t└── server learning rate: %s", self.server_learning_rate)
        super().summary()

    def _trainable(self, arrays: dict[str, np.ndarray]) -> list[str]:
        return [k for k in arrays if k in self.trainable_keys] if self.trainable_keys else list(arrays)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages plus the server control ``c`` (one record shared by every message)."""
        self.current_arrays = to_numpy(arrays)
        if self.control is None:
            keys = self._trainable(self.current_arrays)
            self.control = fm.zeros_like({k: self.current_arrays[k] for k in keys})
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = to_record(self.control)
        for message in messages:
            message.content[CONTROL_KEY] = control
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply :func:`strategies.math.scaffold_server_update` to the replies, in the order given."""
        # Replies carry two ArrayRecords (y and dc), so FedAvg's one-record validation is skipped
        # and replaced by the checks below.
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        if self.current_arrays is None or self.control is None:
            raise InconsistentMessageReplies("Scaffold.aggregate_train called before configure_train")
        contents = [m.content for m in valid]
        for content in contents:
            if self.arrayrecord_key not in content or DELTA_CONTROL_KEY not in content:
                raise InconsistentMessageReplies(
                    f"SCAFFOLD replies need '{self.arrayrecord_key}' and '{DELTA_CONTROL_KEY}' ArrayRecords")
        x = self.current_arrays
        trainable = list(self.control)
        local = [to_numpy(c[self.arrayrecord_key]) for c in contents]
        delta_y = [{k: y[k] - x[k] for k in trainable} for y in local]
        delta_c = [to_numpy(c[DELTA_CONTROL_KEY]) for c in contents]
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        new_x, self.control = fm.scaffold_server_update(
            {k: x[k] for k in trainable}, self.control, delta_y, delta_c, self.num_clients, self.server_learning_rate)
        buffers = [k for k in x if k not in self.control]
        if buffers:
            new_x.update(fm.weighted_mean([{k: y[k] for k in buffers} for y in local], weights))
        ordered = {k: new_x[k] for k in x}
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return to_record(ordered), metrics

"""FedNova (Wang et al., 2020) as a Flower strategy: normalised averaging of local updates.

Clients that take more local steps (more data, more epochs) move further; plain FedAvg then
drifts towards their objective. FedNova divides each client's update by its number of
effective steps before averaging (:func:`strategies.math.fednova_aggregate`). Clients report
their step count as ``local-steps`` in the reply's MetricRecord (fedsim clients always do).
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

from strategies import math as fm
from strategies.scaffold import to_numpy, to_record

STEPS_KEY = "local-steps"

__all__ = ["FedNova", "STEPS_KEY"]


class FedNova(FedAvg):
    """FedNova: FedAvg with updates normalised by each client's local step count.

    Parameters
    ----------
    trainable_keys: arrays that gradient steps update; the others (BatchNorm running
        statistics) are averaged with example-count weights.
    client_momentum: the clients' SGD momentum (it changes the effective step count).
    server_learning_rate: global step size on the normalised update.
    **kwargs: :class:`flwr.serverapp.strategy.FedAvg` arguments.
    """

    def __init__(
        self,
        *,
        trainable_keys: Sequence[str] = (),
        client_momentum: float = 0.0,
        server_learning_rate: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.trainable_keys = tuple(trainable_keys)
        self.client_momentum = client_momentum
        self.server_learning_rate = server_learning_rate
        self.current_arrays: dict[str, np.ndarray] | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> FedNova settings:")
        log(INFO, "\t│\t├── client momentum: %s", self.client_momentum)
        log(INFO, "\t│\t└── server learning rate: %s", self.server_learning_rate)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_arrays = to_numpy(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Normalised average of the replies' arrays, in the order given."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if self.current_arrays is None:
            raise InconsistentMessageReplies("FedNova.aggregate_train called before configure_train")
        contents = [m.content for m in valid]
        metrics = [next(iter(c.metric_records.values())) for c in contents]
        if any(STEPS_KEY not in m for m in metrics):
            raise InconsistentMessageReplies(f"FedNova replies need '{STEPS_KEY}' in their MetricRecord")
        x = self.current_arrays
        local = [to_numpy(next(iter(c.array_records.values()))) for c in contents]
        weights = [float(m[self.weighted_by_key]) for m in metrics]
        steps = [int(m[STEPS_KEY]) for m in metrics]
        trainable = [k for k in x if k in self.trainable_keys] if self.trainable_keys else list(x)
        new_x = fm.fednova_aggregate({k: x[k] for k in trainable}, local, steps, weights,
                                     self.client_momentum, self.server_learning_rate)
        buffers = [k for k in x if k not in new_x]
        if buffers:
            new_x.update(fm.weighted_mean([{k: y[k] for k in buffers} for y in local], weights))
        return to_record({k: new_x[k] for k in x}), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

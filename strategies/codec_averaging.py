"""Flower's FedAvg-family strategies with the weighted average read through fedsim's array codec.

``FedAvg.aggregate_train`` (reached by FedProx, FedAvgM and the FedOpt family through ``super()``)
decodes every reply's ``.npy`` payloads with ``Array.numpy()``, which parses each header with
``ast.literal_eval``: for a small model that is most of the server's time per round. The classes
built here are the Flower classes themselves with one method placed in front of
``FedAvg.aggregate_train`` in the MRO; it does what that method does, operation for operation,
with :func:`fedsim.wire.array_codec.weighted_average` in place of ``aggregate_arrayrecords``
(bit-identical results: ``tests/test_array_codec.py``). Everything else is Flower's.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedsim.wire.array_codec import weighted_average

__all__ = ["CodecAveraging", "with_codec_averaging"]


class CodecAveraging(FedAvg):
    """``FedAvg.aggregate_train`` with the arrays decoded and encoded by fedsim's codec."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True)
        arrays, metrics = None, None
        if valid_replies:
            contents = [message.content for message in valid_replies]
            arrays = weighted_average(contents, self.weighted_by_key)
            metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return arrays, metrics


def with_codec_averaging(cls: type[FedAvg]) -> type[FedAvg]:
    """``cls`` (FedAvg or a subclass) with :class:`CodecAveraging` just before ``FedAvg`` in its MRO.

    The new class keeps the Flower class's name, docstring, constructor and every override, so a
    subclass's own ``aggregate_train`` still runs and reaches the codec only through ``super()``.
    """
    if cls is FedAvg:
        bases: tuple[type, ...] = (CodecAveraging,)
    else:
        bases = (cls, CodecAveraging)
    return type(cls.__name__, bases, {"__doc__": cls.__doc__})

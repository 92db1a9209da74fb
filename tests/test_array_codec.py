"""fedsim's array codec gives exactly Flower's bytes and values, and the codec strategies Flower's aggregates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower_strategies
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedsim.wire import flower_private as fp
from fedsim.wire.array_codec import (
    record_to_numpy,
    record_to_tensors,
    tensors_to_record,
    weighted_average,
)
from strategies import STRATEGIES, make_strategy

TENSORS = {
    "conv.weight": torch.randn(4, 3, 3, 3),
    "bn.num_batches_tracked": torch.tensor(7),
    "transposed": torch.randn(3, 5).t(),  # Fortran order in np.save: left to Flower
    "empty": torch.zeros(0, 3),
    "double": torch.randn(6, dtype=torch.float64),
    "ints": torch.arange(5, dtype=torch.int32),
    "flags": torch.tensor([True, False]),
}


def test_encoding_is_byte_for_byte_flowers() -> None:
    ours, flowers = tensors_to_record(TENSORS), ArrayRecord(TENSORS)
    assert list(ours.keys()) == list(flowers.keys())
    for name in TENSORS:
        if TENSORS[name].is_contiguous():  # no bytes until asked for; the rest is Flower's own np.save
            assert isinstance(ours[name], fp.LazyArray) and "data" not in ours[name].__dict__, name
        fields = ("dtype", "shape", "stype", "data")
        assert [getattr(ours[name], f) for f in fields] == [getattr(flowers[name], f) for f in fields], name
        assert ours[name] == flowers[name] and flowers[name] == ours[name], name
        assert ours[name].object_id == flowers[name].object_id, name


def test_decoding_gives_flowers_values_without_copying() -> None:
    record = ArrayRecord(TENSORS)
    decoded = record_to_numpy(record)
    for name, array in record.items():
        expected = array.numpy()
        assert decoded[name].dtype == expected.dtype and decoded[name].shape == expected.shape, name
        assert np.array_equal(decoded[name], expected), name
    assert not decoded["conv.weight"].flags.writeable  # a view of the message's bytes
    tensors = record_to_tensors(record)
    assert torch.equal(tensors["conv.weight"], TENSORS["conv.weight"])
    assert tensors["bn.num_batches_tracked"].dtype == torch.int64 and tensors["bn.num_batches_tracked"].item() == 7


def _reply(seed: int, examples: int) -> RecordDict:
    generator = torch.Generator().manual_seed(seed)
    state = {"w": torch.randn(5, 4, generator=generator), "b": torch.randn(4, generator=generator),
             "bn.num_batches_tracked": torch.tensor(seed + 3)}
    return RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": examples})})


def test_weighted_average_is_bit_identical_to_flowers() -> None:
    replies = [_reply(seed, examples) for seed, examples in enumerate((13, 7, 29, 1))]
    ours, flowers = weighted_average(replies, "num-examples"), aggregate_arrayrecords(replies, "num-examples")
    for name, array in flowers.items():
        assert ours[name].data == array.data and ours[name].dtype == array.dtype, name


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_codec_strategies_aggregate_exactly_as_flowers(name: str) -> None:
    ours = make_strategy(name)
    flower_class = getattr(flower_strategies, type(ours).__name__)
    assert type(ours) is not flower_class and isinstance(ours, flower_class)
    theirs = flower_class(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    start = _reply(99, 1)["arrays"]
    with fp.task_identity(run_id=1):
        for strategy in (ours, theirs):  # the server-side optimizers keep the current arrays
            list(strategy.configure_train(1, start, ConfigRecord(), _OneNodeGrid()))
        replies = [Message(_reply(seed, examples), 11 + seed, "train", group_id="1")
                   for seed, examples in enumerate((13, 7, 29))]
        for server_round in (1, 2):
            a, _ = ours.aggregate_train(server_round, replies)
            b, _ = theirs.aggregate_train(server_round, replies)
            assert a is not None and b is not None
            for key, array in b.items():
                assert np.array_equal(a[key].numpy(), array.numpy()), (name, server_round, key)
                assert a[key].numpy().dtype == array.numpy().dtype


class _OneNodeGrid:
    """Just enough of a Grid for ``configure_train`` (node ids; messages are not sent)."""

    def get_node_ids(self) -> list[int]:
        return [11]



def test_registry_wraps_only_the_averaging_family() -> None:
    for name in ("fedmedian", "fedtrimmedavg", "krum"):
        assert STRATEGIES[name] is getattr(flower_strategies, STRATEGIES[name].__name__)

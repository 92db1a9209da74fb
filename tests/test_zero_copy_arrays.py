"""The local engine's array path: LazyArrays equal Flower's Arrays for every reader, and no bytes are made."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedsim.engines.federated.local.delivery import copy_records
from fedsim.wire import flower_private as fp
from fedsim.wire import npy_header

VALUES = {
    "matrix": np.arange(12, dtype=np.float32).reshape(3, 4),
    "scalar": np.array(3.5),
    "empty": np.zeros((0, 3), dtype=np.float64),
    "ints": np.arange(5, dtype=np.int64),
    "flags": np.array([True, False]),
    "big-endian": np.arange(4, dtype=">i4"),
    "complex": np.array([1 + 2j], dtype=np.complex64),
}


@pytest.mark.parametrize("name", sorted(VALUES))
def test_lazy_array_is_flowers_array_for_every_reader(name: str) -> None:
    value = VALUES[name]
    flowers = Array(value)
    lazy = fp.lazy_array(value)
    assert type(lazy) is fp.LazyArray and "data" not in lazy.__dict__
    assert (lazy.dtype, lazy.shape, lazy.stype) == (flowers.dtype, flowers.shape, flowers.stype)
    decoded = lazy.numpy()
    assert decoded.dtype == flowers.numpy().dtype and np.array_equal(decoded, flowers.numpy())
    decoded[...] = 0  # a new array, as np.load gives: writing to it changes nothing
    assert np.array_equal(lazy.numpy(), value)
    assert lazy.object_id == flowers.object_id  # made the bytes: np.save's own
    assert lazy.data == flowers.data and lazy == flowers and flowers == lazy
    assert Array.inflate(lazy.deflate(), lazy.children) == flowers
    assert pickle.loads(pickle.dumps(lazy)) == flowers
    assert repr(lazy) == repr(flowers)


def test_the_copy_is_private_and_read_only() -> None:
    source = np.ones(4, dtype=np.float32)
    lazy = fp.lazy_array(source)
    source[:] = 7  # the sender goes on training its model
    assert np.array_equal(lazy.numpy(), np.ones(4))
    snapshot = lazy.snapshot()
    assert snapshot is not None and not snapshot.flags.writeable
    with pytest.raises(ValueError):
        snapshot[0] = 2
    lazy.data = Array(np.zeros(4, dtype=np.float32)).data  # replacing the bytes drops the copy
    assert lazy.snapshot() is None and np.array_equal(lazy.numpy(), np.zeros(4))


def test_arrays_numpy_cannot_take_stay_flowers() -> None:
    for value in (np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.arange(6.0)[::2], np.array(["a", "b"])):
        made = fp.lazy_array(value)
        assert type(made) is Array and made.data == Array(value).data
    with fp.zero_copy_arrays():
        assert type(Array(np.arange(6.0)[::2])) is Array
        with pytest.raises(TypeError):  # Flower's own error for a tensor NumPy cannot hold
            Array(torch.zeros(2, dtype=torch.bfloat16))


def test_installed_constructors_and_restore() -> None:
    state = {"w": torch.randn(3, 2), "b": torch.zeros(2), "n": torch.tensor(4)}
    assert not fp.zero_copy_installed()
    with fp.zero_copy_arrays():
        with fp.zero_copy_arrays():  # re-entrant
            record = ArrayRecord(state)
            from_tensor = Array(torch_tensor=state["w"])
        assert fp.zero_copy_installed()
        bytes_array = ArrayRecord(state, keep_input=True)["w"]
        bytes_array = fp.make_array(bytes_array.dtype, tuple(bytes_array.shape), bytes_array.data)
        assert type(bytes_array) is Array and np.array_equal(bytes_array.numpy(), state["w"].numpy())
    assert not fp.zero_copy_installed()
    assert type(Array(np.zeros(2))) is Array  # Flower's own constructor again
    reference = ArrayRecord(state)
    assert all(type(a) is fp.LazyArray for a in record.values()) and type(from_tensor) is fp.LazyArray
    assert record == reference and from_tensor == reference["w"]
    for name, tensor in record.to_torch_state_dict().items():  # LazyArrays outlive the block
        assert torch.equal(tensor, state[name])


def test_stock_aggregation_is_flowers_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(0)
    replies = [RecordDict({"arrays": ArrayRecord({"w": torch.randn(5, 4, generator=generator)}),
                           "metrics": MetricRecord({"num-examples": n})}) for n in (3, 5, 11)]
    expected = aggregate_arrayrecords(replies, "num-examples")
    with fp.zero_copy_arrays():
        lazy_replies = [copy_records(r) for r in replies]
        for reply in lazy_replies:
            reply["arrays"] = ArrayRecord(reply["arrays"].to_torch_state_dict())
        ours = aggregate_arrayrecords(lazy_replies, "num-examples")
    assert type(ours["w"]) is fp.LazyArray and ours["w"].data == expected["w"].data


def test_a_local_run_makes_npy_bytes_only_for_flowers_size_logs(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Flower's strategy logs the model's size in MB (``len(array.data)``) when it starts and in its
    result: those bytes are made once per run; no client call or aggregation makes any."""
    from fedsim.engines.federated.flower_run import flower_run
    from tests.test_local_grid import APP_DIR

    made: list[tuple[str, tuple[int, ...]]] = []
    real = npy_header.payload_bytes

    def counting(value: np.ndarray) -> bytes:
        made.append((str(value.dtype), value.shape))
        return real(value)

    monkeypatch.setattr(npy_header, "payload_bytes", counting)
    monkeypatch.chdir(tmp_path)
    counts = []
    for nodes, rounds in ((2, 1), (5, 3)):
        made.clear()
        result = flower_run(APP_DIR, nodes, run_config=[f"num-server-rounds={rounds}", "output=run.pt"],
                            client_threads=1)
        counts.append(len(made))
        final = [a for record in result["context"].state.array_records.values() for a in record.values()]
        assert all(isinstance(a, fp.LazyArray) for a in final)
    model_arrays = len(torch.load(tmp_path / "run.pt")["state_dict"])
    assert counts[0] == counts[1] <= 2 * model_arrays, f"np.save bytes made per run: {counts}"


def test_fedsims_own_run_makes_no_npy_bytes(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """fedsim's ClientApp, strategies, traffic accounting and checkpoints read arrays, never their bytes."""
    from fedsim.config import RunConfig, from_dict
    from fedsim.engines.common import RunContext
    from fedsim.engines.federated.engine import run_federated
    from fedsim.results import RunDir

    made: list[tuple[int, ...]] = []
    real = npy_header.payload_bytes
    monkeypatch.setattr(npy_header, "payload_bytes", lambda value: made.append(value.shape) or real(value))
    run = from_dict(RunConfig, {"name": "lazy", "task": "bn_cnn", "mode": "federated",
                                "train": {"threads": 1, "progress": False, "lr": 0.05, "batch_size": 32},
                                "federated": {"num_clients": 6, "clients_per_round": 3, "rounds": 2,
                                              "strategy": "fedavg", "partition": "iid"}})
    summary = run_federated(run, RunContext(out=RunDir(str(tmp_path))))
    assert made == [] and summary["metrics"]["accuracy"] > 0
    history = [r for r in RunDir(str(tmp_path)).read_metrics() if r.get("round", 0) >= 1]
    assert history and all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in history)

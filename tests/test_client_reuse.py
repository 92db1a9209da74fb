"""What a federated client keeps between calls must not change what it computes: optimizers built once and
reset (``fedsim.train.ReusedOptimizers``), and the heap frozen for the rounds (``fedsim.engines.common.WarmHeap``)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fedsim
from fedsim.config import TrainConfig
from fedsim.engines.common import WarmHeap
from fedsim.engines.federated import flower_app
from fedsim.tasks.base import make_optimizer
from fedsim.train import ReusedOptimizers, build_schedulers

TRAIN = {"epochs": 1, "batch_size": 16, "progress": False, "checkpoint": False, "threads": 1}


def _client_calls(train: TrainConfig, reused: ReusedOptimizers | None, calls: int = 3) -> list[torch.Tensor]:
    """``calls`` clients in a row on one model (as a federated client process does): each loads the same
    starting point, trains 2 epochs of 3 steps with a fresh (or reset) optimizer and a new scheduler; float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    finals = []
    for call in range(calls):
        model.load_state_dict(start)
        build = lambda: {"model": make_optimizer(model.parameters(), train)}  # noqa: E731
        optimizers = build() if reused is None else reused.get(train, build)
        schedulers = build_schedulers(optimizers, train)
        data = torch.Generator().manual_seed(call)
        for _ in range(train.epochs):
            for _ in range(3):
                x, y = torch.randn(8, 5, generator=data, dtype=torch.float64), torch.randint(0, 3, (8,), generator=data)
                optimizers["model"].zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                optimizers["model"].step()
            for scheduler in schedulers.values():
                scheduler.step()
        finals.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
    return finals


@pytest.mark.parametrize("settings", [
    {"optimizer": "sgd", "lr": 0.1},
    {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "schedule": "step", "step_size": 1,
     "gamma": 0.5},
    {"optimizer": "adam", "lr": 0.01, "schedule": "cosine"},
])
def test_a_reset_optimizer_trains_exactly_as_a_new_one(settings: dict[str, Any]) -> None:
    train = TrainConfig(epochs=2, **settings)
    reused = ReusedOptimizers()
    fresh, again = _client_calls(train, None), _client_calls(train, reused)
    for a, b in zip(fresh, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(fresh[0], fresh[1])  # the calls did differ (their batches)
    assert reused._kept is not None  # and the optimizer was kept, not rebuilt


def test_optimizers_with_state_at_construction_or_other_settings_are_built_anew() -> None:
    model = nn.Linear(3, 2)
    reused = ReusedOptimizers()
    adagrad = TrainConfig(optimizer="adagrad", lr=0.1)  # fills its sums when built: a cleared state would differ
    first = reused.get(adagrad, lambda: {"model": make_optimizer(model.parameters(), adagrad)})
    second = reused.get(adagrad, lambda: {"model": make_optimizer(model.parameters(), adagrad)})
    assert first["model"] is not second["model"]
    sgd, other = TrainConfig(lr=0.1), TrainConfig(lr=0.2)
    kept = reused.get(sgd, lambda: {"model": make_optimizer(model.parameters(), sgd)})
    assert reused.get(sgd, lambda: {"model": make_optimizer(model.parameters(), sgd)}) is kept
    rebuilt = reused.get(other, lambda: {"model": make_optimizer(model.parameters(), other)})
    assert rebuilt is not kept and rebuilt["model"].param_groups[0]["lr"] == 0.2


def _federated(tmp_path: Path, name: str) -> dict[str, Any]:
    return fedsim.run({"name": name, "task": "tests.helpers.tiny_task:TinyTask", "mode": "federated",
                       "train": {**TRAIN, "lr": 0.05, "momentum": 0.9, "schedule": "step", "step_size": 1,
                                 "gamma": 0.5, "dtype": "float64"},
                       "federated": {"engine": "local", "num_clients": 6, "clients_per_round": 3, "rounds": 3,
                                     "local_epochs": 2, "evaluate_clients": 2}},
                      out=tmp_path, quiet=True)[0]


def test_federated_clients_reusing_optimizers_equal_clients_building_them(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole run (momentum, a step schedule, float64) is the same with the optimizers kept between calls as
    with new ones in every call (the ClientApp's behaviour before they were kept)."""
    kept = _federated(tmp_path, "kept")
    monkeypatch.setattr(flower_app.ReusedOptimizers, "get", lambda self, train, build: build())
    flower_app._CACHE.clear()  # the client's cached model and optimizers of the first run
    built = _federated(tmp_path, "built")
    for a, b in zip(kept["model"].parameters(), built["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    assert [h["test_loss"] for h in kept["history"]] == [h["test_loss"] for h in built["history"]]


def test_the_heap_is_frozen_only_for_the_rounds_and_only_when_nobody_else_froze_it(tmp_path: Path) -> None:
    assert gc.get_freeze_count() == 0
    heap = WarmHeap()
    heap.round_done()
    frozen = gc.get_freeze_count()
    assert heap.frozen and frozen > 0
    heap.round_done()  # frozen once: later rounds only collect
    assert gc.get_freeze_count() == frozen
    heap.release()
    assert not heap.frozen and gc.get_freeze_count() == 0
    _federated(tmp_path, "released")
    assert gc.get_freeze_count() == 0  # a run gives back what it froze
    gc.freeze()  # someone else's freeze is left alone
    try:
        frozen = gc.get_freeze_count()
        other = WarmHeap()
        other.round_done()
        other.release()
        assert not other.frozen and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


class _Cycle:
    """A reply-sized payload kept alive only by a reference cycle, as Flower's record views keep records."""

    def __init__(self) -> None:
        self.payload = bytearray(1 << 20)
        self.me = self


def test_a_rounds_cyclic_garbage_is_freed_when_the_round_ends() -> None:
    import weakref

    heap = WarmHeap()
    try:
        for _ in range(2):  # before the heap is frozen and after
            gc.disable()  # no automatic collection in between: only round_done may free it
            try:
                garbage = _Cycle()
                alive = weakref.ref(garbage)
                del garbage
                assert alive() is not None
                heap.round_done()
                assert alive() is None
            finally:
                gc.enable()
        assert heap.frozen
    finally:
        heap.release()

"""Every registered strategy against hand-computed aggregates (Prepare / Execute / Assert)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from fedsim.errors import ConfigError
from strategies import STRATEGIES, StrategyContext, get_strategy_state, make_strategy, set_strategy_state
from strategies import math as fm
from strategies.client import client_algorithm, linear_term, proximal_term
from strategies.scaffold import CONTROL_KEY, DELTA_CONTROL_KEY


def reply(arrays: dict[str, list[float]], num_examples: int, extra: dict[str, dict[str, list[float]]] | None = None,
          **metrics: float):
    """A train reply as a ClientApp would send it (built with Flower's own helper, no run context)."""
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v, dtype=np.float64)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": num_examples, **metrics}),
    })
    for key, record in (extra or {}).items():
        content[key] = ArrayRecord({k: Array(np.asarray(v, dtype=np.float64)) for k, v in record.items()})
    meta = Metadata(run_id=1, message_id="m", src_node_id=1, dst_node_id=0, reply_to_message_id="r",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    return make_message(meta, content)


def record(values: dict[str, list[float]]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float64)) for k, v in values.items()})


def arrays_of(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


def test_registry_names_every_strategy_of_the_issue() -> None:
    assert set(STRATEGIES) == {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedmedian",
                               "fedtrimmedavg", "krum", "scaffold", "fednova"}


def test_fedavg_weights_by_examples() -> None:
    strategy = make_strategy("fedavg")
    arrays, metrics = strategy.aggregate_train(1, [reply({"w": [1.0, 2.0]}, 1, loss=1.0),
                                                   reply({"w": [3.0, 4.0]}, 3, loss=3.0)])
    np.testing.assert_allclose(arrays_of(arrays)["w"], [2.5, 3.5])  # (1*1 + 3*3)/4, (2 + 12)/4
    assert metrics["loss"] == pytest.approx(2.5)


def test_fedprox_sends_mu_and_aggregates_like_fedavg() -> None:
    strategy = make_strategy("fedprox", {"proximal_mu": 0.5})
    assert strategy.proximal_mu == 0.5
    arrays, _ = strategy.aggregate_train(1, [reply({"w": [0.0]}, 1), reply({"w": [4.0]}, 1)])
    np.testing.assert_allclose(arrays_of(arrays)["w"], [2.0])


def test_fedprox_client_term_gradient_is_mu_times_distance() -> None:
    model = torch.nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 3.0]]))
    extra = proximal_term({"weight": np.array([[0.0, 1.0]])}, 0.5, model)
    loss = extra(model)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.25 * (1.0 + 4.0))  # mu/2 * ||(1, 2)||^2
    np.testing.assert_allclose(model.weight.grad.numpy(), [[0.5, 1.0]])  # mu * (w - w_g)


def test_fedavgm_server_momentum() -> None:
    strategy = make_strategy("fedavgm", {"server_learning_rate": 1.0, "server_momentum": 0.9})
    strategy.current_arrays = record({"w": [0.0]})
    a1, _ = strategy.aggregate_train(1, [reply({"w": [1.0]}, 1)])
    np.testing.assert_allclose(arrays_of(a1)["w"], [1.0])  # pg = -1, m = -1, x = 0 + 1
    a2, _ = strategy.aggregate_train(2, [reply({"w": [2.0]}, 1)])
    np.testing.assert_allclose(arrays_of(a2)["w"], [2.9])  # pg = -1, m = 0.9*-1 - 1 = -1.9, x = 1 + 1.9


def test_fedadam() -> None:
    strategy = make_strategy("fedadam", {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3})
    strategy.current_arrays = {"w": np.array([0.0])}
    arrays, _ = strategy.aggregate_train(1, [reply({"w": [1.0]}, 1)])
    m, v = 0.1 * 1.0, 0.01 * 1.0  # (1 - b1) * delta, (1 - b2) * delta^2
    eta_norm = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)  # Flower's bias correction at round 1
    np.testing.assert_allclose(arrays_of(arrays)["w"], [eta_norm * m / (np.sqrt(v) + 1e-3)])
    assert arrays_of(arrays)["w"][0] == pytest.approx(0.0735107, rel=1e-5)


def test_fedyogi() -> None:
    strategy = make_strategy("fedyogi", {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3})
    strategy.current_arrays = {"w": np.array([0.0])}
    arrays, _ = strategy.aggregate_train(1, [reply({"w": [1.0]}, 1)])
    # v = 0 - 0.01 * 1 * sign(0 - 1) = 0.01; m = 0.1; x = 0.01 * 0.1 / (0.1 + 0.001)
    np.testing.assert_allclose(arrays_of(arrays)["w"], [0.01 * 0.1 / 0.101])


def test_fedadagrad() -> None:
    strategy = make_strategy("fedadagrad", {"eta": 0.1, "tau": 1e-3})
    strategy.current_arrays = {"w": np.array([0.0])}
    arrays, _ = strategy.aggregate_train(1, [reply({"w": [1.0]}, 1)])
    np.testing.assert_allclose(arrays_of(arrays)["w"], [0.1 * 1.0 / (1.0 + 1e-3)])  # m = 1, v = 1


def test_fedmedian() -> None:
    strategy = make_strategy("fedmedian")
    arrays, _ = strategy.aggregate_train(1, [reply({"w": [1.0, 9.0]}, 1), reply({"w": [5.0, 7.0]}, 100),
                                             reply({"w": [2.0, 8.0]}, 1)])
    np.testing.assert_allclose(arrays_of(arrays)["w"], [2.0, 8.0])  # coordinate-wise, weights ignored


def test_fedtrimmedavg() -> None:
    strategy = make_strategy("fedtrimmedavg", {"beta": 0.2})
    replies = [reply({"w": [v]}, 1) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays_of(arrays)["w"], [3.0])  # drop 1 and 100, mean(2, 3, 4)


def test_krum_picks_the_most_central_update() -> None:
    strategy = make_strategy("krum", {"num_malicious_nodes": 0})
    replies = [reply({"w": [v]}, 1) for v in (0.0, 1.0, 1.4, 10.0)]
    # n - f - 2 = 2 closest: scores 1 + 1.96, 0.16 + 1, 0.16 + 1.96, 81 + 74 -> client 1
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays_of(arrays)["w"], [1.0])


def test_scaffold_pure_functions() -> None:
    new = fm.scaffold_client_control({"w": np.array([0.1])}, {"w": np.array([0.3])}, {"w": np.array([1.0])},
                                     {"w": np.array([0.4])}, steps=3, lr=0.1)
    np.testing.assert_allclose(new["w"], [0.1 - 0.3 + 0.6 / 0.3])
    x, c = fm.scaffold_server_update({"w": np.array([1.0])}, {"w": np.array([0.5])},
                                     [{"w": np.array([-1.0])}, {"w": np.array([3.0])}],
                                     [{"w": np.array([0.4])}, {"w": np.array([0.8])}], num_clients=4, server_lr=0.5)
    np.testing.assert_allclose(x["w"], [1.0 + 0.5 * 1.0])
    np.testing.assert_allclose(c["w"], [0.5 + 1.2 / 4])


def test_scaffold_strategy_round() -> None:
    strategy = make_strategy("scaffold", context=StrategyContext(num_clients=4, trainable_keys=("w",)))
    strategy.current_arrays = {"w": np.array([1.0, 2.0]), "b": np.array([10.0])}
    strategy.control = {"w": np.array([0.0, 0.0])}
    replies = [
        reply({"w": [0.5, 1.5], "b": [20.0]}, 1, {DELTA_CONTROL_KEY: {"w": [0.2, 0.4]}}),
        reply({"w": [1.5, 3.0], "b": [40.0]}, 3, {DELTA_CONTROL_KEY: {"w": [-0.2, 0.0]}}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    out = arrays_of(arrays)
    np.testing.assert_allclose(out["w"], [1.0, 2.25])  # x + mean((-0.5, -0.5), (0.5, 1.0))
    np.testing.assert_allclose(out["b"], [35.0])  # buffer: (20*1 + 40*3) / 4
    np.testing.assert_allclose(strategy.control["w"], [0.0, 0.1])  # sum(dc) / N
    assert list(out) == ["w", "b"]


def test_scaffold_client_step_is_corrected_sgd() -> None:
    """One SGD step with SCAFFOLD's extra loss = y - lr (g + c - c_i); then c_i+ = (x - y)/(K lr) - c + c_i."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False).double()
    x = {"weight": model.weight.detach().numpy().copy()}
    c, ci = np.array([[0.3, -0.2, 0.1]]), np.array([[0.05, 0.0, -0.1]])
    content = RecordDict({"arrays": record({"weight": x["weight"].tolist()}), "config": ConfigRecord({}),
                          CONTROL_KEY: record({"weight": c.tolist()})})
    algo = client_algorithm(content, model, x, record({"weight": ci.tolist()}))
    assert algo.name == "scaffold"
    inputs, target = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.mse_loss(model(inputs), target)
    grad = torch.autograd.grad(loss, model.weight)[0].numpy()
    opt.zero_grad()
    (torch.nn.functional.mse_loss(model(inputs), target) + algo.extra_loss(model)).backward()
    opt.step()
    np.testing.assert_allclose(model.weight.detach().numpy(), x["weight"] - 0.1 * (grad + c - ci))
    records, state = algo.finish(steps=1, lr=0.1)
    new_ci = arrays_of(state)["weight"]
    np.testing.assert_allclose(new_ci, ci - c + (x["weight"] - model.weight.detach().numpy()) / 0.1)
    np.testing.assert_allclose(arrays_of(records[DELTA_CONTROL_KEY])["weight"], new_ci - ci)
    np.testing.assert_allclose(new_ci, grad, atol=1e-12)  # option II recovers the local gradient


def test_linear_term_gradient() -> None:
    model = torch.nn.Linear(2, 1, bias=False).double()
    linear_term({"weight": np.array([[2.0, -1.0]])}, model)(model).backward()
    np.testing.assert_allclose(model.weight.grad.numpy(), [[2.0, -1.0]])


def test_fednova_normalises_by_steps() -> None:
    strategy = make_strategy("fednova")
    strategy.current_arrays = {"w": np.array([0.0])}
    arrays, _ = strategy.aggregate_train(1, [reply({"w": [-1.0]}, 1, **{"local-steps": 1}),
                                             reply({"w": [-4.0]}, 1, **{"local-steps": 2})])
    # d = (1/1, 4/2), tau_eff = 1.5, x = 0 - 1.5 * (0.5 + 1.0); FedAvg would give -2.5
    np.testing.assert_allclose(arrays_of(arrays)["w"], [-2.25])
    assert fm.fednova_norm(2, 0.5) == pytest.approx((2 - 0.5 * 0.75 / 0.5) / 0.5)


def test_fednova_equal_steps_is_fedavg() -> None:
    out = fm.fednova_aggregate({"w": np.array([1.0])}, [{"w": np.array([0.0])}, {"w": np.array([3.0])}],
                               steps=[5, 5], weights=[1, 3])
    np.testing.assert_allclose(out["w"], [2.25])


def test_weighted_mean_order_and_values() -> None:
    out = fm.weighted_mean([{"a": np.array([1.0])}, {"a": np.array([4.0])}], [2, 1])
    np.testing.assert_allclose(out["a"], [2.0])


def test_state_round_trip_continues_identically() -> None:
    """A FedAdam restored from its state computes the same round 2 as one that never stopped."""
    first = make_strategy("fedadam", {"eta": 0.1})
    first.current_arrays = {"w": np.array([0.0, 1.0])}
    first.aggregate_train(1, [reply({"w": [1.0, 0.0]}, 1)])
    state = get_strategy_state(first)
    second = make_strategy("fedadam", {"eta": 0.1})
    set_strategy_state(second, state)
    for strategy in (first, second):
        strategy.current_arrays = {"w": np.array([0.5, 0.5])}
    a, _ = first.aggregate_train(2, [reply({"w": [2.0, -1.0]}, 1)])
    b, _ = second.aggregate_train(2, [reply({"w": [2.0, -1.0]}, 1)])
    np.testing.assert_array_equal(arrays_of(a)["w"], arrays_of(b)["w"])


def test_bad_options_name_the_key() -> None:
    with pytest.raises(ConfigError, match="federated.strategy_options.mu"):
        make_strategy("fedprox", {"mu": 0.1}, file="x.toml")
    with pytest.raises(ConfigError, match="federated.strategy"):
        make_strategy("fedsgd")
    with pytest.raises(ConfigError, match="fraction_train"):
        make_strategy("fedavg", {"fraction_train": 0.5})

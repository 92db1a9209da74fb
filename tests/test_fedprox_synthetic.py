"""FedProx's Synthetic(alpha, beta) population (``fedsim.data.fedprox_synthetic``) and the ``logreg`` task.

Every statistical check is seeded (it gives the same answer on every run); the tolerances are several
standard errors of the estimate, stated at each check.
"""

from __future__ import annotations

import math
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fedsim
from fedsim.data import load_dataset
from fedsim.data.fedprox_synthetic import (
    client_parameters,
    feature_variances,
    generate_client,
    load_fedprox_synthetic_split,
)
from fedsim.errors import FedsimError
from fedsim.tasks import make_task

MANY = 2000  # clients for the distribution checks


def _params(n: int = MANY, **options: object) -> list:
    return [client_parameters(3, k, **options) for k in range(n)]  # type: ignore[arg-type]


@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 0.5), (1.0, 2.0)])
def test_client_priors_have_the_stated_spreads(alpha: float, beta: float) -> None:
    """u_k ~ N(0, alpha), B_k ~ N(0, beta) (standard deviations); W_k, b_k ~ N(u_k, 1), v_k ~ N(B_k, 1).
    The std of 2,000 normal draws has a relative standard error of 1.6 %: tolerance 6 %."""
    params = _params(alpha=alpha, beta=beta)
    u = np.array([p.u for p in params])
    B = np.array([p.B for p in params])
    assert abs(u.std() / alpha - 1) < 0.06 and abs(u.mean()) < 4 * alpha / math.sqrt(MANY)
    assert abs(B.std() / beta - 1) < 0.06 and abs(B.mean()) < 4 * beta / math.sqrt(MANY)
    W_dev = np.concatenate([(p.W - p.u).ravel() for p in params[:200]])  # 120,000 draws
    b_dev = np.concatenate([p.b - p.u for p in params])  # 20,000 draws
    v_dev = np.concatenate([p.v - p.B for p in params[:500]])  # 30,000 draws
    for dev in (W_dev, b_dev, v_dev):
        assert abs(dev.std() - 1) < 0.03 and abs(dev.mean()) < 0.03
    first = params[0]
    assert first.W.shape == (60, 10) and first.b.shape == (10,) and first.v.shape == (60,)


def test_zero_alpha_beta_share_the_priors_only() -> None:
    """alpha = beta = 0: u_k = B_k = 0 for every client; W_k, b_k, v_k still differ (their unit-variance draws)."""
    params = _params(50)
    assert {p.u for p in params} == {0.0} and {p.B for p in params} == {0.0}
    assert not np.array_equal(params[0].W, params[1].W) and not np.array_equal(params[0].v, params[1].v)


def test_the_iid_variant_shares_one_model_and_zero_means() -> None:
    params = _params(20, iid=True)
    for p in params:
        assert np.array_equal(p.W, params[0].W) and np.array_equal(p.b, params[0].b)
        assert np.array_equal(p.v, np.zeros(60)) and p.u == 0.0 and p.B == 0.0
    # the shared model is N(0, 1): 610 draws, std within 15 %
    assert abs(np.concatenate([params[0].W.ravel(), params[0].b]).std() - 1) < 0.15
    # sizes (and noise) are the non-IID client's: common random numbers
    assert [p.size for p in params] == [p.size for p in _params(20)]
    with pytest.raises(FedsimError, match="alpha"):
        client_parameters(0, 0, alpha=1.0, iid=True)


def test_inputs_have_the_stated_covariance_and_labels_are_the_client_model() -> None:
    """x - v_k ~ N(0, diag(j^-1.2)): per-feature variance over ~40,000 pooled samples has a relative
    standard error of 0.7 %: tolerance 10 %; off-diagonal correlations below 0.05 (se 0.005)."""
    residuals = []
    for k in range(200):
        p = client_parameters(5, k, 1.0, 1.0)
        x, y = generate_client(5, k, 1.0, 1.0)
        assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (p.size, 60) and y.shape == (p.size,)
        np.testing.assert_array_equal(y, np.argmax(x.astype(np.float64) @ p.W + p.b, axis=1))
        residuals.append(x.astype(np.float64) - p.v)
    r = np.concatenate(residuals)
    assert len(r) > 20_000
    ratio = r.var(axis=0) / feature_variances(60)
    assert np.all(np.abs(ratio - 1) < 0.10), ratio
    assert np.all(np.abs(r.mean(axis=0)) < 5 * np.sqrt(feature_variances(60) / len(r)))
    corr = np.corrcoef(r.T)
    assert np.abs(corr[~np.eye(60, dtype=bool)]).max() < 0.05
    assert feature_variances(3).tolist() == [1.0, 2 ** -1.2, 3 ** -1.2]


def test_sizes_are_lognormal_plus_50_capped() -> None:
    """n_k = int(lognormal(4, 2)) + 50, capped at size_cap. Median int(e^4) + 50 = 104 (capping leaves the
    median alone): the sample median of 2,000 is within +-12 (about 3 standard errors). The capped share
    is P(lognormal >= 951) = 7.7 % (se 0.6 %): tolerance 2 points."""
    capped = np.array([p.size for p in _params(size_cap=1000)])
    assert capped.min() >= 50 and capped.max() == 1000
    assert abs(np.median(capped) - (int(math.exp(4)) + 50)) <= 12
    expected_share = 0.5 * math.erfc((math.log(951) - 4) / (2 * math.sqrt(2)))
    assert abs((capped == 1000).mean() - expected_share) < 0.02
    uncapped = np.array([p.size for p in _params(size_cap=0)])
    assert uncapped.max() > 1000 and np.array_equal(np.minimum(uncapped, 1000), capped)


def _client_data(split_or_shard: object) -> tuple[torch.Tensor, torch.Tensor]:
    shard = split_or_shard
    x = torch.cat([shard.train.tensors[0], shard.held.tensors[0]])  # type: ignore[attr-defined]
    y = torch.cat([shard.train.tensors[1], shard.held.tensors[1]])  # type: ignore[attr-defined]
    return x, y


@pytest.mark.parametrize("num_clients", [30, 10**6])
def test_a_client_is_the_same_alone_or_in_any_population(num_clients: int) -> None:
    options = {"alpha": 1.0, "beta": 1.0, "seed": 11}
    x, y = generate_client(11, 7, 1.0, 1.0)
    split = load_dataset("fedprox_synthetic", test_fraction=0.1, num_clients=num_clients, **options)
    population = split.population
    assert population is not None and population.num_clients == num_clients and split.clients is None
    shard = population.client(7)
    got_x, got_y = _client_data(shard)
    assert torch.equal(got_x, torch.from_numpy(x)) and torch.equal(got_y, torch.from_numpy(y))
    assert len(shard.train) == max(1, int(0.9 * len(y))) and len(shard.held) == len(y) - len(shard.train)
    assert np.array_equal(shard.train_idx, np.arange(len(shard.train)))
    assert np.array_equal(shard.held_idx, np.arange(len(shard.held)))
    # across calls and loads, and after pickling the population (the cache does not travel)
    again = load_fedprox_synthetic_split(0.1, 0, num_clients=num_clients, **options).population
    copied = pickle.loads(pickle.dumps(population))
    for other in (population.client(7), again.client(7), copied.client(7)):
        ox, oy = _client_data(other)
        assert torch.equal(ox, got_x) and torch.equal(oy, got_y)
    # another seed: other data
    assert not torch.equal(_client_data(load_dataset("fedprox_synthetic", seed=12).population.client(7))[0][:50],
                           got_x[:50])


def test_the_central_view_of_a_small_population_is_the_union_of_its_clients() -> None:
    split = load_dataset("fedprox_synthetic", alpha=0.5, beta=0.5)  # the paper's 30 clients
    population = split.population
    assert split.info.name == "fedprox_synthetic" and split.info.input_shape == (60,) and split.info.num_classes == 10
    shards = [population.client(k) for k in range(30)]
    assert np.array_equal(population.central_ids, np.arange(30))
    for part, central in (("train", split.train), ("held", split.test)):
        xs = torch.cat([getattr(s, part).tensors[0] for s in shards])
        ys = torch.cat([getattr(s, part).tensors[1] for s in shards])
        assert torch.equal(central.tensors[0], xs) and torch.equal(central.tensors[1], ys)
    assert central.tensors[0].dtype == torch.float32 and central.tensors[1].dtype == torch.int64
    sizes = [client_parameters(0, k, 0.5, 0.5).size for k in range(30)]
    assert len(split.train) + len(split.test) == sum(sizes)


def test_a_million_clients_load_fast_with_a_sample_as_central_view() -> None:
    """Only the central sample is generated at load time (measured: ~0.3 s, ~64 MB on 2 busy cores;
    the bound here leaves room for a loaded test machine)."""
    started = time.perf_counter()
    split = load_dataset("fedprox_synthetic", alpha=1.0, beta=1.0, num_clients=10**6, central_clients=200)
    elapsed = time.perf_counter() - started
    population = split.population
    ids = population.central_ids
    assert elapsed < 3.0
    assert len(ids) == 200 and len(set(ids.tolist())) == 200 and ids.max() < 10**6 and np.all(np.diff(ids) > 0)
    assert ids.max() > 10**5  # a sample of the whole population, not its first clients
    sizes = [population.parameters(k).size for k in ids]
    assert len(split.train) + len(split.test) == sum(sizes)
    first = population.client(int(ids[0]))
    assert torch.equal(split.train.tensors[0][:len(first.train)], first.train.tensors[0])
    assert torch.equal(split.test.tensors[1][:len(first.held)], first.held.tensors[1])
    same = load_dataset("fedprox_synthetic", alpha=1.0, beta=1.0, num_clients=10**6, central_clients=200)
    assert np.array_equal(same.population.central_ids, ids) and torch.equal(same.test.tensors[0], split.test.tensors[0])
    last = population.client(10**6 - 1)
    assert 50 <= len(last.train) + len(last.held) <= 1000


@pytest.mark.parametrize(("options", "message"), [
    ({"alpha": -1.0}, "alpha"),
    ({"beta": float("nan")}, "beta"),
    ({"num_clients": 0}, "num_clients"),
    ({"central_clients": 0}, "central_clients"),
    ({"size_cap": 20}, "size_cap"),
    ({"classes": 1}, "classes"),
    ({"iid": "yes"}, "iid"),
    ({"colour": 1}, "unknown option"),
    ({"test_fraction": 1.0}, "test_fraction"),
])
def test_bad_options_are_one_line_errors_naming_the_option(options: dict, message: str) -> None:
    with pytest.raises(FedsimError, match=message) as info:
        load_dataset("fedprox_synthetic", **options)
    assert "\n" not in str(info.value)


def test_client_ids_out_of_range_are_refused() -> None:
    population = load_dataset("fedprox_synthetic", num_clients=5).population
    for bad in (5, -1):
        with pytest.raises(FedsimError, match="client id"):
            population.client(bad)


def test_logreg_is_the_papers_model_and_trains_centrally(tmp_path: Path) -> None:
    task = make_task("logreg")
    assert task.default_dataset == "fedprox_synthetic" and task.primary_metric == "accuracy"
    assert task.vectorisable and task.has_separable_loss() and not task.pipeline_split_points
    split = load_dataset("fedprox_synthetic")
    model = task.build_model(split.info)
    assert sum(p.numel() for p in model.parameters()) == 60 * 10 + 10
    assert [name for name, _ in model.named_children()] == ["flatten", "linear"]
    mlp = make_task("logreg", {"hidden": [32]}).build_model(split.info)
    assert sum(p.numel() for p in mlp.parameters()) == 60 * 32 + 32 + 32 * 10 + 10
    summary = fedsim.run({"name": "logreg", "task": "logreg",
                          "data": {"options": {"alpha": 0.5, "beta": 0.5}},
                          "train": {"epochs": 2, "max_steps": 40, "lr": 0.05, "progress": False,
                                    "checkpoint": False, "threads": 1}},
                         out=tmp_path, quiet=True)[0]
    losses = [record["train_loss"] for record in summary["history"]]
    assert losses[1] < losses[0]
    assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0 and summary["metrics"]["loss"] > 0

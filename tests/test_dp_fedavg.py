"""User-level DP-FedAvg with Flower's DP wrappers: the accountant, clipping, the noise, the order of noise and
server step, runs (determinism, recorded privacy) and bad input refused at load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam

from fedsim.cli import main
from fedsim.config import FederatedDPConfig, experiment_from_dict
from fedsim.engines.common import RunContext
from fedsim.engines.federated.engine import run_federated
from fedsim.privacy.dp_fedavg import epsilon_after, make_private, noise_for_epsilon
from fedsim.results import RunDir
from strategies import make_strategy


def dp_accounting_epsilon(n: int, k: int, sigma: float, rounds: int, delta: float) -> float:
    """The library's own answer, called directly: K of N without replacement, replace-one, RDP."""
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, k, dp_accounting.GaussianDpEvent(sigma)),
                       rounds)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize("n,k,sigma,rounds,delta", [(1000, 100, 1.0, 10, 1e-3), (20, 5, 0.8, 3, 0.05),
                                                    (10**6, 100, 1.2, 500, 1e-6)])
def test_epsilon_is_the_accountant_librarys(n: int, k: int, sigma: float, rounds: int, delta: float) -> None:
    assert epsilon_after(n, k, sigma, rounds, delta) == dp_accounting_epsilon(n, k, sigma, rounds, delta)


def test_a_target_epsilon_resolves_to_the_least_noise_that_meets_it() -> None:
    sigma = noise_for_epsilon(1000, 50, 20, 1e-3, 3.0)
    assert epsilon_after(1000, 50, sigma, 20, 1e-3) <= 3.0
    assert epsilon_after(1000, 50, sigma * 0.99, 20, 1e-3) > 3.0  # 1 % less noise would overspend
    assert noise_for_epsilon(1000, 50, 20, 1e-3, 1.0) > noise_for_epsilon(1000, 50, 20, 1e-3, 8.0)


# ---- the wrappers on hand-made replies ---------------------------------------------------------------
@pytest.fixture()
def server_identity() -> Any:
    """Messages are created by a ServerApp, which always runs under a Flower task identity."""
    from fedsim.wire import flower_private as fp

    with fp.task_identity(run_id=1):
        yield


SHAPES = {"w": (400, 250), "b": (50,)}  # 100,050 coordinates: enough to measure the noise's std


def record_of(values: dict[str, np.ndarray]) -> ArrayRecord:
    from fedsim.wire.array_codec import arrays_to_record

    return arrays_to_record(values)


def reply(values: dict[str, np.ndarray], examples: int) -> Message:
    return Message(RecordDict({"arrays": record_of(values), "metrics": MetricRecord({"num-examples": examples})}),
                   0, MessageType.TRAIN)


def private(name: str, clipping: str, sigma: float, norm: float, k: int, current: dict[str, np.ndarray]) -> Any:
    strategy = make_private(make_strategy(name, {}), FederatedDPConfig(clipping=clipping, clipping_norm=norm,
                                                                       noise_multiplier=sigma), k, sigma, seed=0)
    # what configure_train would have recorded: the global model the updates are relative to
    strategy.wrapper.current_arrays = record_of(current)
    if hasattr(strategy.strategy, "current_arrays"):
        strategy.strategy.current_arrays = record_of(current)
    return strategy


def norm_of(update: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.values())))


def test_every_update_is_clipped_to_the_bound(server_identity: None) -> None:
    rng = np.random.default_rng(0)
    current = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    models = [{k: v + rng.normal(scale=scale, size=v.shape).astype(np.float32) for k, v in current.items()}
              for scale in (1e-4, 0.01, 0.5, 3.0)]
    strategy = private("fedavg", "server", 1e-9, 1.0, 4, current)
    replies = [reply(m, n) for m, n in zip(models, (5, 50, 7, 100), strict=True)]
    strategy.aggregate_train(1, replies)
    for message, original in zip(replies, models, strict=True):
        clipped = {k: a.numpy() - current[k] for k, a in message.content["arrays"].items()}
        assert norm_of(clipped) <= 1.0 * (1 + 1e-5)
        if norm_of({k: original[k] - current[k] for k in current}) < 1.0:  # small updates pass unchanged
            np.testing.assert_allclose(clipped["w"], original["w"] - current["w"], atol=1e-6)


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_server_noise_std_is_sigma_c_over_k(clipping: str, server_identity: None) -> None:
    """Zero updates from K = 8 clients: the aggregate is the global model plus the server's noise only. Its
    sample std over 100,050 coordinates must be sigma C / K within 1 % (the std of a sample std is
    s / sqrt(2n) = 0.22 % here: 1 % is 4.5 of those)."""
    sigma, norm, k = 1.3, 0.7, 8
    current = {name: np.zeros(shape, dtype=np.float32) for name, shape in SHAPES.items()}
    # every client moves every coordinate by 1e-6 (Flower's clipping divides by the update's norm: not 0)
    moved = {name: np.full(shape, 1e-6, dtype=np.float32) for name, shape in SHAPES.items()}
    strategy = private("fedavg", clipping, sigma, norm, k, current)
    aggregated, _ = strategy.aggregate_train(1, [reply(moved, 10 + i) for i in range(k)])
    noise = np.concatenate([a.numpy().ravel() for a in aggregated.values()]).astype(np.float64) - 1e-6
    assert abs(noise.std() / (sigma * norm / k) - 1) < 0.01
    assert abs(noise.mean()) < 5 * sigma * norm / k / np.sqrt(noise.size)


def test_uniform_weights_and_noise_before_the_server_step(server_identity: None) -> None:
    """FedAdam under DP: its server step reads the noised, uniformly weighted mean of the clipped updates
    (post-processing), not the example-weighted mean. With tiny noise and a bound no update reaches, the
    result is FedAdam applied to the uniform mean."""
    rng = np.random.default_rng(1)
    current = {k: rng.normal(size=s).astype(np.float32) for k, s in {"w": (6, 3), "b": (3,)}.items()}
    models = [{k: v + rng.normal(scale=0.1, size=v.shape).astype(np.float32) for k, v in current.items()}
              for _ in range(3)]
    dp = private("fedadam", "server", 1e-12, 100.0, 3, current)
    dp.strategy.current_arrays = dict(current)  # as FedOpt.configure_train keeps it
    got, _ = dp.aggregate_train(1, [reply(m, n) for m, n in zip(models, (1, 10, 100), strict=True)])
    reference = FedAdam(fraction_train=1.0)
    reference.current_arrays = dict(current)
    uniform = [reply(m, 1) for m in models]
    expected, _ = reference.aggregate_train(1, uniform)
    for key in current:
        np.testing.assert_allclose(got[key].numpy(), expected[key].numpy(), rtol=0, atol=1e-5)


# ---- runs ------------------------------------------------------------------------------------------------
def dp_run(**dp: Any) -> dict[str, Any]:
    return {
        "name": "dp", "task": "logreg", "mode": "federated",
        "data": {"name": "fedprox_synthetic", "test_fraction": 0.1,
                 "options": {"alpha": 0.0, "beta": 0.0, "num_clients": 20, "size_cap": 60}},
        "train": {"lr": 0.05, "batch_size": 10, "progress": False, "threads": 1, "checkpoint": False},
        "federated": {"engine": "local", "partition": "natural", "num_clients": 20, "clients_per_round": 5,
                      "rounds": 3, "local_epochs": 1, "dp": dp},
    }


def run(config: dict[str, Any], out: Path) -> dict[str, Any]:
    return run_federated(experiment_from_dict(config).runs[0], RunContext(out=RunDir(out)))


def test_a_dp_run_records_its_privacy_and_is_reproducible(tmp_path: Path) -> None:
    a = run(dp_run(clipping="server", epsilon=3.0), tmp_path / "a")
    b = run(dp_run(clipping="server", epsilon=3.0), tmp_path / "b")
    for name, value in a["model"].state_dict().items():
        assert torch.equal(value, b["model"].state_dict()[name])
    privacy = a["privacy"]
    assert privacy["sampling"] == "without-replacement" and privacy["neighbouring"] == "replace-one"
    assert (privacy["population"], privacy["cohort"], privacy["rounds"], privacy["delta"]) == (20, 5, 3, 1 / 20)
    sigma = privacy["noise_multiplier"]
    assert sigma == pytest.approx(noise_for_epsilon(20, 5, 3, 0.05, 3.0))
    epsilons = [h["dp_epsilon"] for h in a["history"][1:]]
    assert epsilons == [dp_accounting_epsilon(20, 5, sigma, r, 0.05) for r in (1, 2, 3)]
    assert a["metrics"]["dp_epsilon"] == privacy["epsilon"] == epsilons[-1] <= 3.0
    plain = run(dp_run(), tmp_path / "plain")
    assert "privacy" not in plain and "dp_epsilon" not in plain["history"][1]
    assert any(not torch.equal(v, plain["model"].state_dict()[k]) for k, v in a["model"].state_dict().items())


def test_client_side_clipping_clips_on_the_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsim.engines.federated import flower_app

    seen: list[float] = []
    original = flower_app.RoundLoop._by_partition

    def recording(self: Any, sent: Any, got: Any) -> Any:
        out = original(self, sent, got)
        by_node = {m.metadata.dst_node_id: m for m in sent}
        for reply_message in out.values():
            request = by_node.get(reply_message.metadata.src_node_id)
            if request is None or reply_message.has_error() or "arrays" not in reply_message.content:
                continue  # evaluation replies carry metrics only
            sent_arrays = {k: a.numpy() for k, a in request.content["arrays"].items()}
            update = {k: a.numpy() - sent_arrays[k] for k, a in reply_message.content["arrays"].items()}
            seen.append(norm_of(update))
        return out

    monkeypatch.setattr(flower_app.RoundLoop, "_by_partition", recording)
    summary = run(dp_run(clipping="client", noise_multiplier=0.5, clipping_norm=0.05), tmp_path / "c")
    assert len(seen) == 15 and max(seen) <= 0.05 * (1 + 1e-5)
    assert summary["privacy"]["mechanism"].startswith("dp-fedavg (client")


def test_adaptive_clipping_moves_the_bound(tmp_path: Path) -> None:
    summary = run(dp_run(clipping="adaptive", noise_multiplier=0.5, clipping_norm=0.01, clipped_count_stddev=0.3),
                  tmp_path / "ad")
    bounds = [h["dp_clipping_norm"] for h in summary["history"][1:]]
    assert bounds[-1] > 0.01  # every update is above 0.01: the bound grows towards the median norm


@pytest.mark.parametrize("text,key,value", [
    ("[federated.dp]\nclipping = \"server\"\nepsilon = 0.0\n", "federated.dp.epsilon", "0.0"),
    ("[federated.dp]\nclipping = \"server\"\nepsilon = -1.0\n", "federated.dp.epsilon", "-1.0"),
    ("[federated.dp]\nclipping = \"server\"\nepsilon = 1.0\ndelta = 1.0\n", "federated.dp.delta", "1.0"),
    ("[federated.dp]\nclipping = \"server\"\nepsilon = 1.0\nnoise_multiplier = 1.0\n",
     "federated.dp.noise_multiplier", "1.0"),
    ("[train.dp]\nepsilon = 0.0\n", "train.dp.epsilon", "0.0"),
    ("[train.dp]\nepsilon = 2.0\ndelta = 2.0\n", "train.dp.delta", "2.0"),
    ("[train.dp]\nepsilon = 2.0\nnoise_multiplier = 1.0\n", "train.dp.noise_multiplier", "1.0"),
])
def test_bad_privacy_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str,
                                   value: str) -> None:
    mode = "central" if text.startswith("[train") else "federated"
    path = tmp_path / "exp.toml"
    path.write_text(f'task = "logreg"\nmode = "{mode}"\n[data]\nname = "digits"\n[federated]\nrounds = 1\n' + text)
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and f"key '{key}' = {value}:" in lines[0], lines


@pytest.mark.parametrize("text,key,words", [
    ('task = "bn_cnn"\n[federated.dp]\nclipping = "server"\nnoise_multiplier = 1.0\n', "federated.dp.clipping",
     "BatchNorm"),
    ('task = "logreg"\n[data]\nname = "digits"\n[federated]\nstrategy = "scaffold"\n[federated.dp]\n'
     'clipping = "server"\nnoise_multiplier = 1.0\n', "federated.strategy", "mean of client updates"),
    ('task = "logreg"\n[data]\nname = "digits"\n[federated]\ndropout_fraction = 0.1\n[federated.dp]\n'
     'clipping = "server"\nnoise_multiplier = 1.0\n', "federated.dropout_fraction", "fixed denominator"),
])
def test_dp_that_cannot_be_honest_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                             key: str, words: str) -> None:
    path = tmp_path / "exp.toml"
    path.write_text('mode = "federated"\n' + text.replace("[federated]\n", "[federated]\nrounds = 1\n"))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"key '{key}'" in lines[0] and words in lines[0], lines


def test_adaptive_rounds_are_accounted_at_their_real_noise(tmp_path: Path) -> None:
    """The adaptive wrapper noises with the bound it just updated; each round is composed at the multiplier
    it really had against the bound it clipped with, and the total is the accountant's for those rounds."""
    summary = run(dp_run(clipping="adaptive", noise_multiplier=0.5, clipping_norm=0.01, clipped_count_stddev=0.3),
                  tmp_path / "ad")
    rounds = summary["history"][1:]
    bounds = [0.01] + [h["dp_clipping_norm"] for h in rounds]
    update = (0.5 ** -2 - 0.6 ** -2) ** -0.5  # Flower's raised update multiplier for sigma_b = 0.3
    for h, before, after in zip(rounds, bounds[:-1], bounds[1:], strict=True):
        expected = ((update * after / before) ** -2 + 0.6 ** -2) ** -0.5
        assert h["dp_round_noise_multiplier"] == pytest.approx(expected, rel=1e-12)
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for h in rounds:
        accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(
            20, 5, dp_accounting.GaussianDpEvent(h["dp_round_noise_multiplier"])))
    assert summary["metrics"]["dp_epsilon"] == pytest.approx(accountant.get_epsilon(0.05), rel=1e-12)


def test_client_side_dp_under_secure_aggregation_is_the_same_mechanism(tmp_path: Path) -> None:
    """Clients clip, SecAgg+ reveals only the (uniform) sum, the server adds the same seeded noise: the model
    equals the plain client-side DP run's up to SecAgg+'s quantisation."""
    plain = run(dp_run(clipping="client", noise_multiplier=0.5, clipping_norm=0.05), tmp_path / "plain")
    config = dp_run(clipping="client", noise_multiplier=0.5, clipping_norm=0.05)
    config["federated"]["secure_aggregation"] = True
    secure = run(config, tmp_path / "secure")
    assert secure["metrics"]["dp_epsilon"] == plain["metrics"]["dp_epsilon"]
    for name, value in plain["model"].state_dict().items():
        torch.testing.assert_close(secure["model"].state_dict()[name], value, rtol=0, atol=1e-4)
    with pytest.raises(Exception, match="clip on the clients"):
        config["federated"]["dp"]["clipping"] = "server"
        experiment_from_dict(config)


def test_the_privacy_experiment_runs_cut_short(tmp_path: Path) -> None:
    from fedsim.config import load_experiment

    path = Path(__file__).resolve().parents[1] / "experiments" / "privacy.toml"
    runs = {r.name: r for r in load_experiment(path).runs}
    assert {r.train.dp.epsilon for r in runs.values() if r.mode == "central"} == {None, 1.0, 3.0, 8.0}
    assert {r.federated.dp.epsilon for r in runs.values() if r.mode == "federated"} == {None, 1.0, 3.0, 8.0}
    only = [a for name in ("central", "central-dpsgd-eps8", "fedavg", "dp-fedavg-eps8") for a in ("--only", name)]
    code = main(["run", str(path), "--out", str(tmp_path), "--set", "seeds=[0]", "--set", "federated.rounds=2",
                 "--set", "train.epochs=1", *only])
    assert code == 0
    table = (tmp_path / "privacy" / "comparison.md").read_text()
    assert table.splitlines()[0].endswith("| ε |") and "- (no DP)" in table
    assert (tmp_path / "privacy" / "comparison.png").stat().st_size > 0

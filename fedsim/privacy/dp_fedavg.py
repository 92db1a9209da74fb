"""User-level DP-FedAvg (McMahan et al., ICLR 2018) with Flower's DP strategy wrappers, and its accounting.

Flower's wrappers (``DifferentialPrivacyServerSideFixedClipping``, ``...ClientSideFixedClipping`` with
``fixedclipping_mod``, ``DifferentialPrivacyServerSideAdaptiveClipping``) clip each client's update to L2
norm C, let the wrapped strategy aggregate the clipped replies, and add Gaussian noise of std
``sigma * C / K`` to what it returns. Two of their assumptions do not hold for fedsim as it is:

* **The mean must be uniform with denominator K.** fedsim's FedAvg weights replies by example counts
  (``num-examples``); one client's example count would change the sensitivity. fedsim's server gives
  every reply the same weight (:data:`UNIFORM_KEY` = 1, set on the server's copy of the reply: the clients
  are unchanged) and the wrapped strategy averages by it; the config refuses anything that would drop a
  sampled client's update (dropouts, stragglers, deadlines, over-selection), so the denominator is K.
* **Noise must come before any server step.** Wrapping FedAvgM or FedAdam/Yogi/Adagrad directly would add
  noise *after* their server optimizer, which read the un-noised mean: not the mechanism the accountant
  prices. So the wrapper's inner strategy is a uniform mean (:class:`_UniformMean`, which configures
  messages through the user's strategy, e.g. FedProx's ``proximal-mu``), and the user's strategy then
  takes the noised mean as a single reply and applies its server step (post-processing, free of privacy
  cost). For FedAvg and FedProx the noised mean is the new model.

The wrappers accept an accountant only without sampling amplification; fedsim samples a fixed-size
cohort of K of N clients **without replacement** each round (keyed by seed and round), so fedsim keeps
its own accountant: Flower's :class:`flwr.serverapp.RdpAccountant` (Google's ``dp-accounting`` RDP) with
``SamplingMethod.WITHOUT_REPLACEMENT`` and replace-one neighbours, composed once per aggregated round.
A target epsilon is turned into the noise multiplier that spends it in ``federated.rounds`` rounds
(:func:`noise_for_epsilon`) before the first round.

The noise is numpy's global generator (Flower's ``add_gaussian_noise_inplace``); the round loop seeds it
with (seed, round) right before aggregating, so runs are reproducible.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, PrivacyConfig, RdpAccountant
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, SamplingMethod

from fedsim.config import FederatedDPConfig
from fedsim.seeding import derive_seed

__all__ = ["UNIFORM_KEY", "PrivateStrategy", "PrivacyLedger", "accountant", "epsilon_after", "noise_for_epsilon", "mechanism_inputs",
           "make_private"]

UNIFORM_KEY = "dp-uniform-weight"
"""The metric every reply carries on the server side under DP (value 1): the wrapped mean weights by it."""


def accountant(num_clients: int, delta: float) -> RdpAccountant:
    """Flower's RDP accountant for K-of-N sampling without replacement, replace-one neighbours."""
    return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=num_clients,
                                       neighboring_relation=NeighboringRelation.REPLACE_ONE,
                                       sampling_method=SamplingMethod.WITHOUT_REPLACEMENT))


def epsilon_after(num_clients: int, cohort: int, noise_multiplier: float, rounds: int, delta: float) -> float:
    """epsilon at ``delta`` after ``rounds`` rounds of K-of-N sampled Gaussian releases."""
    if rounds <= 0:
        return 0.0
    spent = accountant(num_clients, delta)
    spent.compose(GaussianPrivacyEvent(noise_multiplier, cohort, num_clients), rounds)
    return float(spent.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def noise_for_epsilon(num_clients: int, cohort: int, rounds: int, delta: float, epsilon: float,
                      rel_tol: float = 1e-3) -> float:
    """The smallest noise multiplier (to ``rel_tol``) whose ``rounds`` releases spend at most ``epsilon``.

    Bisection on sigma (epsilon falls as sigma grows), in log space.
    """
    low, high = 1e-2, 1.0
    while epsilon_after(num_clients, cohort, high, rounds, delta) > epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier below 1e6 spends epsilon <= {epsilon:g} in {rounds} rounds")
    while high / low > 1 + rel_tol:
        middle = math.sqrt(low * high)
        if epsilon_after(num_clients, cohort, middle, rounds, delta) > epsilon:
            low = middle
        else:
            high = middle
    return high


class _UniformMean(FedAvg):
    """FedAvg's mean with equal weights (:data:`UNIFORM_KEY`), configuring messages through ``configure``
    (the user's strategy, whose client-side settings such as FedProx's ``proximal-mu`` must reach the clients)."""

    def __init__(self, configure: Strategy) -> None:
        super().__init__(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1, weighted_by_key=UNIFORM_KEY)
        self._configure = configure

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self._configure.configure_train(server_round, arrays, config, grid)


@dataclass
class PrivateStrategy(Strategy):
    """The user's FedAvg-family strategy behind one of Flower's DP wrappers (see the module docstring)."""

    strategy: Strategy
    wrapper: Strategy
    seed: int
    noise_multiplier: float
    cohort: int

    def __post_init__(self) -> None:
        super().__init__()

    # the per-round choices and checkpoints of the user's strategy
    def __getattr__(self, name: str) -> Any:
        if name in ("strategy", "wrapper"):
            raise AttributeError(name)
        return getattr(self.strategy, name)

    @property
    def weighted_by_key(self) -> None:
        """None: DP-FedAvg's mean is uniform (secure aggregation reads this to weight the masked sum)."""
        return None

    @property
    def clipping_norm(self) -> float:
        """The current bound (it moves under adaptive clipping)."""
        return float(self.wrapper.clipping_norm)  # type: ignore[attr-defined]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.wrapper.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:  # equal weights on the server's copy: the clients still report their counts
            if not reply.has_error():
                next(iter(reply.content.metric_records.values()))[UNIFORM_KEY] = 1
        saved = np.random.get_state()  # Flower draws the noise from numpy's global generator: key it, then restore
        np.random.seed(derive_seed(self.seed, "dp-noise", server_round) % 2**32)
        try:
            mean, metrics = self.wrapper.aggregate_train(server_round, replies)
        finally:
            np.random.set_state(saved)
        if mean is None or type(self.strategy).__name__ in ("FedAvg", "FedProx"):
            return mean, metrics
        # The server step of FedAvgM / FedAdam / FedYogi / FedAdagrad on the noised mean (post-processing).
        single = Message(RecordDict({"arrays": mean, "metrics": MetricRecord({UNIFORM_KEY: 1})}), 0,
                         MessageType.TRAIN)
        weighted = getattr(self.strategy, "weighted_by_key", None)
        if weighted is not None:
            single.content["metrics"][weighted] = 1
        stepped, _ = self.strategy.aggregate_train(server_round, [single])
        return stepped, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.wrapper.summary()


def make_private(strategy: Strategy, dp: FederatedDPConfig, cohort: int, noise_multiplier: float,
                 seed: int) -> PrivateStrategy:
    """``strategy`` behind the Flower DP wrapper ``dp.clipping`` names, noise ``noise_multiplier``."""
    mean = _UniformMean(strategy)
    wrapper: Strategy
    if dp.clipping == "server":
        wrapper = DifferentialPrivacyServerSideFixedClipping(mean, noise_multiplier, dp.clipping_norm, cohort)
    elif dp.clipping == "client":
        wrapper = DifferentialPrivacyClientSideFixedClipping(mean, noise_multiplier, dp.clipping_norm, cohort)
    elif dp.clipping == "adaptive":
        # Flower 1.42 counts *clipped* updates (norm bit = scaling < 1) but applies Andrew et al.'s update for
        # the *unclipped* fraction, C <- C exp(-lr (fraction - target)), so its bound shrinks when every update
        # is clipped. With target 1 - q and step -lr the same line is the paper's rule for unclipped fraction
        # q: C <- C exp(-lr (unclipped - q)) (tests/test_dp_fedavg.py checks the direction).
        wrapper = DifferentialPrivacyServerSideAdaptiveClipping(
            mean, noise_multiplier, cohort, initial_clipping_norm=dp.clipping_norm,
            target_clipped_quantile=1.0 - dp.target_quantile, clip_norm_lr=dp.clip_learning_rate,
            clipped_count_stddev=dp.clipped_count_stddev)
        wrapper.clip_norm_lr = -dp.clip_learning_rate
    else:
        raise ValueError(f"federated.dp.clipping = {dp.clipping!r} is not a DP mechanism")
    return PrivateStrategy(strategy, wrapper, seed, noise_multiplier, cohort)


def mechanism_inputs(dp: FederatedDPConfig, num_clients: int, cohort: int, noise_multiplier: float, rounds: int,
                     delta: float, epsilon: float) -> dict[str, Any]:
    """What ``summary.json`` records beside epsilon: the mechanism and everything its accounting read."""
    return {"mechanism": f"dp-fedavg ({dp.clipping} clipping)", "sampling": "without-replacement",
            "neighbouring": "replace-one", "population": num_clients, "cohort": cohort,
            "noise_multiplier": noise_multiplier, "clipping_norm": dp.clipping_norm, "rounds": rounds,
            "delta": delta, "epsilon": epsilon, "accountant": "rdp (dp-accounting, via flwr.serverapp.RdpAccountant)"}


@dataclass
class PrivacyLedger:
    """A DP-FedAvg run's privacy: the resolved noise multiplier and epsilon after each aggregated round,
    recomputed from the rounds' own noise multipliers in the history (a resumed run's ledger is the
    uninterrupted run's).

    With fixed clipping every round releases a Gaussian of multiplier sigma. With adaptive clipping Flower's
    wrapper clips with this round's bound C but scales the noise with the bound it has just updated, C';
    the round is accounted at what it really is: update noise multiplier sigma_u C' / C (sigma_u: the
    wrapper's raised update multiplier) combined with the clipped-count release (std sigma_b), as in
    Andrew et al. 2021, Theorem 1: sigma_round = ((sigma_u C' / C) ** -2 + (2 sigma_b) ** -2) ** -1/2.
    """

    dp: FederatedDPConfig
    num_clients: int
    cohort: int
    rounds: int
    delta: float
    noise_multiplier: float
    _spent: Any = field(default=None, repr=False)
    _composed: list[float] = field(default_factory=list, repr=False)
    """The rounds' multipliers composed into ``_spent`` so far: one RDP computation per new round (each
    costs ~0.2 s for K of N without replacement), not one per round per round."""

    @classmethod
    def resolve(cls, dp: FederatedDPConfig, num_clients: int, cohort: int, rounds: int) -> PrivacyLedger:
        """Before the first round: delta (default 1/N) and sigma (given, or the one spending ``dp.epsilon``)."""
        delta = dp.delta if dp.delta is not None else 1.0 / num_clients
        sigma = dp.noise_multiplier if dp.noise_multiplier is not None else \
            noise_for_epsilon(num_clients, cohort, rounds, delta, float(dp.epsilon))  # type: ignore[arg-type]
        return cls(dp, num_clients, cohort, rounds, delta, float(sigma))

    def epsilon(self, history: list[dict[str, Any]]) -> float:
        """epsilon after the released rounds of ``history``, each composed with its own noise multiplier."""
        sigmas = [float(h["dp_round_noise_multiplier"]) for h in history if h.get("dp_round_noise_multiplier")]
        if not sigmas:
            return 0.0
        if self._spent is None or sigmas[:len(self._composed)] != self._composed:
            self._spent, self._composed = accountant(self.num_clients, self.delta), []
        new = sigmas[len(self._composed):]
        for sigma in sorted(set(new)):  # identical rounds in one call: the RDP of an event is computed once
            self._spent.compose(GaussianPrivacyEvent(sigma, self.cohort, self.num_clients), new.count(sigma))
        self._composed = sigmas
        return float(self._spent.get_epsilon(self.delta))

    def round_noise_multiplier(self, strategy: PrivateStrategy, bound_before: float) -> float:
        """The noise multiplier of the round just aggregated, relative to the bound it clipped with."""
        if self.dp.clipping != "adaptive":
            return self.noise_multiplier
        wrapper: Any = strategy.wrapper
        update = wrapper.noise_multiplier * wrapper.clipping_norm / bound_before
        return float((update ** -2 + (2 * wrapper.clipped_count_stddev) ** -2) ** -0.5)

    def record(self, record: dict[str, Any], history: list[dict[str, Any]], strategy: PrivateStrategy,
               bound_before: float) -> None:
        """Add this round's noise multiplier, cumulative epsilon and the (next) clipping bound to its line."""
        if record.get("aggregated"):
            record["dp_round_noise_multiplier"] = self.round_noise_multiplier(strategy, bound_before)
        record["dp_epsilon"] = self.epsilon([*history, record])
        record["dp_clipping_norm"] = strategy.clipping_norm

    def summary(self, history: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, Any]]:
        epsilon = self.epsilon(history)
        released = sum(1 for h in history if h.get("dp_round_noise_multiplier"))
        inputs = mechanism_inputs(self.dp, self.num_clients, self.cohort, self.noise_multiplier, released,
                                  self.delta, epsilon)
        if self.dp.clipping == "adaptive":
            inputs["round_noise_multipliers"] = [h["dp_round_noise_multiplier"] for h in history
                                                 if h.get("dp_round_noise_multiplier")]
        return ({"dp_epsilon": epsilon, "dp_delta": self.delta, "dp_noise_multiplier": self.noise_multiplier}, inputs)

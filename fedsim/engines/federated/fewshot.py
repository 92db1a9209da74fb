"""Federated distribution calibration: base-class statistics from per-client sufficient statistics.

After the backbone has trained federated on the base classes, each client extracts features of
its own base-class samples with the final backbone and replies with per-class counts, sums and
sums of outer products (:func:`fedsim.models.fewshot.class_sufficient_statistics`); no feature
leaves a client. The server adds them up in partition order and turns them into means and
covariances (:func:`fedsim.models.fewshot.statistics_from_sufficient`), which calibrate the
novel-class episodes. Because every training sample sits in exactly one partition, the result
equals the central statistics; the run reports the largest difference it measured.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsim.data import DatasetSplit
from fedsim.data.episodes import accuracy_ci, sample_episodes
from fedsim.data.features import backbone_encoder, extract_features, features_by_class
from fedsim.engines.federated.rounds import FAIL_KEY, RoundLoop
from fedsim.errors import FedsimError
from fedsim.models.fewshot import (
    BaseStatistics,
    SufficientStatistics,
    base_statistics,
    class_sufficient_statistics,
    evaluate_episodes,
    merge_sufficient_statistics,
    statistics_from_sufficient,
    tukey,
)
from fedsim.tasks import Task

ACTION = "base_statistics"
MESSAGE_TYPE = f"{MessageType.QUERY}.{ACTION}"

__all__ = ["client_sufficient_statistics", "federated_base_statistics", "federated_fewshot_metrics", "ACTION",
           "applies"]


def applies(task: Task) -> bool:
    """Tasks whose final metrics need base-class statistics from a trained backbone."""
    return task.name == "fewshot_dc" and getattr(task.options, "features", "") == "backbone"


def _lam(task: Task) -> float | None:
    config = task.dc_config()  # type: ignore[attr-defined]
    return config.lam if (config.generate and config.tukey and config.tukey_base) else None


def client_sufficient_statistics(task: Task, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                                 num_classes: int) -> SufficientStatistics:
    """One client's statistics of its own base-class features (Tukey-transformed if the config says so)."""
    encoder = backbone_encoder(model, task.options.head)
    features = torch.as_tensor(extract_features(encoder, x), dtype=torch.float64)
    lam = _lam(task)
    if lam is not None:
        features = tukey(features, lam)
    return class_sufficient_statistics(features, y, list(range(num_classes)))


def to_records(stats: SufficientStatistics) -> ArrayRecord:
    return ArrayRecord({name: Array(getattr(stats, name).numpy()) for name in ("counts", "sums", "outer")})


def from_records(record: ArrayRecord) -> SufficientStatistics:
    return SufficientStatistics(*(torch.as_tensor(record[name].numpy()) for name in ("counts", "sums", "outer")))


def federated_base_statistics(grid: Grid, loop: RoundLoop, arrays: ArrayRecord, server_round: int,
                              timeout: float = 600.0) -> tuple[SufficientStatistics, int]:
    """Ask every client for its sufficient statistics; merge them in partition order."""
    messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({**_run_config(loop), FAIL_KEY: False})}),
                        loop.nodes.node_of(p), MESSAGE_TYPE, group_id=str(server_round))
                for p in range(loop.num_clients)]
    by_partition: dict[int, SufficientStatistics] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        partition_id = loop.nodes.partition_of(reply.metadata.src_node_id)
        if reply.has_error():
            raise FedsimError(f"client {partition_id} could not compute its base statistics: {reply.error.reason}")
        by_partition[partition_id] = from_records(reply.content["statistics"])
    missing = sorted(set(range(loop.num_clients)) - set(by_partition))
    if missing:
        raise FedsimError(f"no base statistics from clients {missing}")
    return merge_sufficient_statistics([by_partition[p] for p in sorted(by_partition)]), len(by_partition)


def _run_config(loop: RoundLoop) -> dict[str, Any]:
    from fedsim.engines.federated.rounds import RUN_KEY

    return {RUN_KEY: loop.run_json}


def federated_fewshot_metrics(grid: Grid, loop: RoundLoop, task: Task, model: torch.nn.Module, split: DatasetSplit,
                              arrays: ArrayRecord, server_round: int) -> dict[str, float]:
    """Few-shot metrics with base statistics merged from the clients (plus their gap to central ones)."""
    started = time.perf_counter()
    merged, clients = federated_base_statistics(grid, loop, arrays, server_round)
    stats = statistics_from_sufficient(merged)
    features = task.feature_set(model, split)  # type: ignore[attr-defined]
    central = base_statistics(features.base, _lam(task))
    gap = max(float((stats.means - central.means).abs().max()), float((stats.covs - central.covs).abs().max()))
    scale = max(float(central.means.abs().max()), float(central.covs.abs().max()), 1e-12)
    metrics = episode_metrics(task, features.novel, stats)
    metrics.update({"fed_stats_max_abs_diff": gap, "fed_stats_max_rel_diff": gap / scale,
                    "fed_stats_clients": float(clients), "fed_stats_time_s": time.perf_counter() - started,
                    "feature_dim": float(features.dim)})
    return metrics


def episode_metrics(task: Task, novel: dict[int, np.ndarray], stats: BaseStatistics) -> dict[str, float]:
    """N-way K-shot accuracy (mean, 95% CI) on the novel classes with the given base statistics.

    The same episodes and settings as the task's own ``final_metrics`` (seeded by episode_seed and K).
    """
    o = task.options
    config = task.dc_config()  # type: ignore[attr-defined]
    device = torch.device("cuda" if o.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if o.device == "auto" else o.device))
    metrics: dict[str, float] = {}
    for shot in o.shots:
        episodes = sample_episodes(novel, o.n_way, shot, o.queries, o.episodes,
                                   seed=o.episode_seed * 1000 + shot).to(device)
        acc = evaluate_episodes(episodes.support, episodes.support_labels, episodes.query, episodes.query_labels,
                                stats.to(device) if config.generate else None, config)
        metrics[f"acc_{shot}shot"], metrics[f"ci95_{shot}shot"] = accuracy_ci(acc)
        if o.baseline:  # plain logistic regression on the same episodes (no statistics involved)
            plain = dataclasses.replace(config, tukey=False, generate=False)
            acc_plain = evaluate_episodes(episodes.support, episodes.support_labels, episodes.query,
                                          episodes.query_labels, None, plain)
            metrics[f"plain_acc_{shot}shot"] = accuracy_ci(acc_plain)[0]
            metrics[f"gain_{shot}shot"] = float(np.mean(acc - acc_plain))
    return metrics


def client_reply(msg: Message, task: Task, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 num_classes: int) -> Message:
    stats = client_sufficient_statistics(task, model, x, y, num_classes)
    content = RecordDict({"statistics": to_records(stats), "metrics": MetricRecord({"num-examples": int(len(y))})})
    return Message(content, reply_to=msg)


def central_statistics(task: Task, model: torch.nn.Module, split: DatasetSplit) -> BaseStatistics:
    """The central computation the federated one must equal (pooled base-class features)."""
    encoder = backbone_encoder(model, task.options.head)
    x, y = split.train.tensors  # type: ignore[attr-defined]
    return base_statistics(features_by_class(extract_features(encoder, x), y.numpy()), _lam(task))

"""Task ``fewshot_dc``: few-shot classification of novel classes by distribution calibration.

With ``features = "backbone"`` the task is an ordinary classifier of the *base* classes (the
backbone task's model, loss and metrics; ``prepare_data`` keeps the base classes, e.g. digits
0-4), trained by whatever engine runs it. At the end, :meth:`FewShotDCTask.final_metrics` takes
the backbone's penultimate features (its children up to the head), computes base-class
statistics, and scores N-way K-shot episodes on the novel classes (digits 5-9).

With ``features = "synthetic"`` or ``"file"`` nothing needs training (``train.epochs = 0``): the
features come from :func:`fedsim.data.features.synthetic_features` or from the reference
code's pickle / ``.npz`` files.

Metrics per shot K: ``acc_{K}shot`` and ``ci95_{K}shot`` (the configured cell of the paper's
Table 4: Tukey on/off x generated features on/off), and, on the same episodes,
``plain_acc_{K}shot`` (logistic regression on the raw support features) and
``gain_{K}shot`` (the paired difference).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedsim.data import DataInfo, DatasetSplit
from fedsim.data.episodes import accuracy_ci, sample_episodes
from fedsim.data.features import (
    FeatureSet,
    backbone_encoder,
    extract_features,
    features_by_class,
    load_feature_files,
    synthetic_features,
)
from fedsim.errors import ConfigError, FedsimError
from fedsim.models.fewshot import DCConfig, base_statistics, evaluate_episodes
from fedsim.tasks import Batch, Task, TaskContext, make_task

__all__ = ["FewShotDCOptions", "FewShotDCTask", "fewshot_metrics"]


@dataclass(frozen=True)
class FewShotDCOptions:
    """Options of the ``fewshot_dc`` task."""

    features: Literal["backbone", "synthetic", "file"] = "backbone"
    """Where features come from: a backbone trained on the base classes, a generator, or files."""
    backbone: str = "bn_cnn"
    """Task whose model is the backbone (trained on the base classes; features before its head)."""
    backbone_options: dict[str, Any] = field(default_factory=dict)
    """Options of the backbone task."""
    head: str = ""
    """Child module where the head starts (features = outputs of the children before it); empty = last."""
    base_classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """Dataset classes the backbone trains on; every other class is novel."""
    path: str = ""
    """``features = "file"``: base-class features (pickle or .npz, class -> [n, D])."""
    novel_path: str = ""
    """``features = "file"``: novel-class features."""
    synthetic: dict[str, Any] = field(default_factory=dict)
    """``features = "synthetic"``: arguments of ``synthetic_features`` (n_base, n_novel, dim, ...)."""
    n_way: int = 5
    """Classes per episode."""
    shots: list[int] = field(default_factory=lambda: [1, 5])
    """K values to evaluate."""
    queries: int = 15
    """Query features per class and episode."""
    episodes: int = 100
    """Episodes per K (accuracy is mean ± 95% CI over them)."""
    episode_seed: int = 0
    """Seed of the episodes (fixed across runs so that every Table 4 cell sees the same episodes)."""
    dc: DCConfig = field(default_factory=DCConfig)
    """Distribution calibration settings (``task_options.dc = { tukey = false, generate = true, ... }``);
    see :class:`fedsim.models.fewshot.DCConfig`. Its ``seed`` keys the drawn features per episode."""
    baseline: bool = True
    """Also score plain logistic regression (no Tukey, no generated features) on the same episodes."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device of the few-shot evaluation (auto: CUDA when available)."""


def fewshot_metrics(
    features: FeatureSet,
    config: DCConfig,
    *,
    n_way: int = 5,
    shots: tuple[int, ...] | list[int] = (1, 5),
    queries: int = 15,
    episodes: int = 100,
    episode_seed: int = 0,
    baseline: bool = True,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Accuracy (mean and 95% CI) of ``config`` on N-way K-shot episodes of the novel classes.

    Base statistics are computed once, in the space the config asks for; the episodes of each K
    are seeded by ``(episode_seed, K)`` and shared with the plain-LR baseline (a paired comparison).
    """
    device = torch.device(device)
    started = time.perf_counter()
    stats = None
    if config.generate:
        lam = config.lam if (config.tukey and config.tukey_base) else None
        stats = base_statistics(features.base, lam).to(device)
    metrics: dict[str, float] = {}
    for shot in shots:
        ep = sample_episodes(features.novel, n_way, shot, queries, episodes, seed=episode_seed * 1000 + shot).to(device)
        acc = evaluate_episodes(ep.support, ep.support_labels, ep.query, ep.query_labels, stats, config)
        mean, ci = accuracy_ci(acc)
        metrics[f"acc_{shot}shot"], metrics[f"ci95_{shot}shot"] = mean, ci
        if baseline:
            plain = dataclasses.replace(config, tukey=False, generate=False)
            acc_plain = acc if plain == config else evaluate_episodes(
                ep.support, ep.support_labels, ep.query, ep.query_labels, None, plain)
            metrics[f"plain_acc_{shot}shot"] = accuracy_ci(acc_plain)[0]
            metrics[f"gain_{shot}shot"] = float(np.mean(acc - acc_plain))
    metrics["fewshot_time_s"] = time.perf_counter() - started
    return metrics


def _xy(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(dataset, TensorDataset) or len(dataset.tensors) != 2:
        raise FedsimError(f"fewshot_dc expects TensorDataset(x, y) data, got {type(dataset).__name__}")
    x, y = dataset.tensors
    return x, y


class FewShotDCTask(Task):
    """A backbone trained on base classes, scored by distribution calibration on novel classes."""

    name: ClassVar[str] = "fewshot_dc"
    description: ClassVar[str] = "few-shot distribution calibration (Tukey + sampled features + LR) on novel classes"
    Options: ClassVar[type] = FewShotDCOptions
    pipeline_reason: ClassVar[str] = "the few-shot task wraps another task's model; pipeline the backbone task"

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        opts: FewShotDCOptions = self.options
        if opts.features == "backbone":
            self.backbone = make_task(opts.backbone, opts.backbone_options, "<task_options.backbone_options>")
        if opts.features == "file" and not (opts.path and opts.novel_path):
            raise ConfigError("<task_options>", "task_options.path", opts.path,
                              "features = 'file' needs 'path' (base) and 'novel_path' (novel) feature files")
        if opts.n_way < 2 or not opts.shots or min(opts.shots) < 1:
            raise ConfigError("<task_options>", "task_options.shots", list(opts.shots), "need n_way >= 2, shots >= 1")
        self._novel: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- config of the calibration -------------------------------------------------------------
    def dc_config(self) -> DCConfig:
        return self.options.dc

    # ---- data: base classes for the backbone, novel classes kept aside ---------------------------
    def prepare_data(self, split: DatasetSplit) -> DatasetSplit:
        if self.options.features != "backbone":
            return split  # the backbone is not used; features come from the generator or files
        base = list(self.options.base_classes)
        x_tr, y_tr = _xy(split.train)
        x_te, y_te = _xy(split.test)
        unknown = sorted(set(base) - set(y_tr.unique().tolist()))
        if unknown or len(set(base)) != len(base):
            raise ConfigError("<task_options>", "task_options.base_classes", base,
                              f"must be distinct classes of '{split.info.name}' (absent: {unknown})")
        remap = torch.full((int(max(y_tr.max(), y_te.max())) + 1,), -1, dtype=torch.long)
        remap[torch.tensor(base)] = torch.arange(len(base))

        def keep(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
            mask = remap[y] >= 0
            return TensorDataset(x[mask], remap[y[mask]])

        # Novel images from both splits: the backbone never sees any novel class.
        novel_mask_tr, novel_mask_te = remap[y_tr] < 0, remap[y_te] < 0
        self._novel = (torch.cat([x_tr[novel_mask_tr], x_te[novel_mask_te]]),
                       torch.cat([y_tr[novel_mask_tr], y_te[novel_mask_te]]))
        if len(self._novel[1].unique()) < self.options.n_way:
            raise ConfigError("<task_options>", "task_options.n_way", self.options.n_way,
                              f"only {len(self._novel[1].unique())} novel classes outside base_classes")
        info = DataInfo(split.info.name, split.info.input_shape, len(base))
        return DatasetSplit(keep(x_tr, y_tr), keep(x_te, y_te), info)

    # ---- the backbone is an ordinary classification task -------------------------------------------
    def build_model(self, info: DataInfo) -> nn.Module:
        if self.options.features != "backbone":
            # Nothing to train (features come from elsewhere); one parameter keeps the engines'
            # optimizer and checkpoint machinery uniform.
            return nn.Sequential(nn.Linear(1, 1))
        return self.backbone.build_model(info)

    def model_inputs(self, model: nn.Module, batch: Batch, context: TaskContext) -> tuple[Any, ...]:
        self._need_backbone("train")
        return self.backbone.model_inputs(model, batch, context)

    def output_loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        self._need_backbone("train")
        return self.backbone.output_loss(output, target)

    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int = 512) -> dict[str, float]:
        if self.options.features != "backbone":
            return {}
        return self.backbone.evaluate(model, dataset, batch_size)

    def _need_backbone(self, what: str) -> None:
        if self.options.features != "backbone":
            raise FedsimError(f"fewshot_dc with features = '{self.options.features}' has no backbone to {what}; "
                              "set train.epochs = 0")

    # ---- features and the few-shot evaluation ---------------------------------------------------------
    def feature_set(self, model: nn.Module, split: DatasetSplit) -> FeatureSet:
        o: FewShotDCOptions = self.options
        if o.features == "synthetic":
            allowed = set(inspect.signature(synthetic_features).parameters)
            unknown = sorted(set(o.synthetic) - allowed)
            if unknown:
                raise ConfigError("<task_options>", f"task_options.synthetic.{unknown[0]}", o.synthetic[unknown[0]],
                                  f"unknown key; allowed keys: {', '.join(sorted(allowed))}")
            return synthetic_features(**o.synthetic)
        if o.features == "file":
            return load_feature_files(o.path, o.novel_path)
        if self._novel is None:
            raise FedsimError("fewshot_dc: prepare_data was not called on this task instance (no novel images)")
        encoder = backbone_encoder(model, o.head)
        x_base, y_base = _xy(split.train)
        base = features_by_class(extract_features(encoder, x_base), y_base.numpy())
        novel = features_by_class(extract_features(encoder, self._novel[0]), self._novel[1].numpy())
        return FeatureSet(base, novel)

    def final_metrics(self, model: nn.Module, split: DatasetSplit, *, context: TaskContext) -> dict[str, float]:
        o: FewShotDCOptions = self.options
        device = torch.device("cuda" if o.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if o.device == "auto" else o.device))
        features = self.feature_set(model, split)
        metrics = fewshot_metrics(features, self.dc_config(), n_way=o.n_way, shots=o.shots, queries=o.queries,
                                  episodes=o.episodes, episode_seed=o.episode_seed, baseline=o.baseline,
                                  device=device)
        metrics["feature_dim"] = float(features.dim)
        return metrics

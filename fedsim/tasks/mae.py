"""Task ``mae``: masked-autoencoder pre-training, then linear probe and fine-tuning.

Pre-training minimises the MAE's masked-patch loss. Masks are drawn per sample from keys
``(seed, sample index, draw)`` (:mod:`fedsim.models.masking`): :meth:`MAETask.prepare_data` packs
``y = [label, global sample index]`` (``[N, 2]`` long) so the loss knows each sample's index, and
``draw`` is the epoch the shared loop is in (:attr:`Task.epoch`: a fresh mask each epoch).
Hence a sample's mask never depends on the rank, client, batch or restart that holds it.

At the end (:meth:`MAETask.final_metrics`): a linear probe on the frozen encoder (BatchNorm
without affine before a linear head, as the paper) and a fine-tune of the encoder with a
classification head, both trained with the shared loop :func:`fedsim.train.fit`; plus a PNG of
original / masked / reconstructed test images in the run folder.

Reference rows of the experiment: ``reference = "raw_pixels"`` reports logistic regression on
raw pixels; a run with ``train.epochs = 0`` probes and fine-tunes a randomly initialised encoder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedsim.config import TrainConfig
from fedsim.data import DataInfo, DatasetSplit
from fedsim.errors import FedsimError
from fedsim.models.mae import MAE, PRESETS, MAEConfig, masked_patch_loss
from fedsim.models.masking import draw_masks, num_masked, sample_keys
from fedsim.results import save_figure
from fedsim.tasks import (
    Batch,
    Task,
    TaskContext,
    eval_loader,
    make_optimizer,
    model_device,
    model_dtype,
    move_batch,
)
from fedsim.train import TrainState, fit, make_loader

__all__ = ["MAEOptions", "MAETask"]


@dataclass(frozen=True)
class MAEOptions:
    """Options of the ``mae`` task (``[runs.task_options]`` in an experiment file)."""

    mask: Literal["random", "block", "grid"] = "random"
    """Masking strategy: per-sample random, BEiT block-wise, or one kept patch per 2x2 cell."""
    mask_ratio: float = 0.75
    """Fraction of patches masked (exactly ``L - int(L * (1 - r))``); grid is always 0.75."""
    grid_random_offset: bool = False
    """Grid masking: draw the kept corner of the 2x2 cells per sample instead of top-left."""
    preset: Literal["digits", "vit_tiny"] = "digits"
    """Model sizes to start from; image size and channels always come from the data."""
    patch_size: int = 0
    """Patch side in pixels (0 = the preset's)."""
    embed_dim: int = 0
    """Encoder width (0 = the preset's)."""
    depth: int = 0
    """Encoder blocks (0 = the preset's)."""
    num_heads: int = 0
    """Encoder heads (0 = the preset's)."""
    decoder_embed_dim: int = 0
    """Decoder width (0 = the preset's)."""
    decoder_depth: int = 0
    """Decoder blocks (0 = the preset's)."""
    decoder_num_heads: int = 0
    """Decoder heads (0 = the preset's)."""
    norm_pix_loss: bool = False
    """Regress per-patch normalised pixels."""
    mask_seed: int = -1
    """Seed of the masks; -1 = the run's ``train.seed``."""
    pool: Literal["mean", "cls"] = "mean"
    """Encoder feature for probe and fine-tune: mean of patch tokens, or the cls token."""
    probe_epochs: int = 100
    """Linear-probe epochs (on frozen, precomputed features)."""
    probe_lr: float = 0.1
    """Linear-probe SGD learning rate (momentum 0.9)."""
    probe_batch_size: int = 128
    """Linear-probe batch size."""
    finetune_epochs: int = 5
    """Fine-tuning epochs (0 = skip)."""
    finetune_lr: float = 1e-3
    """Fine-tuning Adam learning rate."""
    finetune_batch_size: int = 64
    """Fine-tuning batch size."""
    reference: Literal["none", "raw_pixels"] = "none"
    """``raw_pixels``: final metrics are logistic regression on raw pixels (a reference row)."""
    plot_images: int = 8
    """Test images in the reconstruction PNG (0 = no PNG)."""


class _Classify(Task):
    """Cross-entropy of a classifier on ``(x, label)`` batches: lets probe and fine-tune use ``fit``."""

    name = "mae_classify"

    def output_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(output, target)

    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int = 512) -> dict[str, float]:
        correct = total = 0
        with torch.no_grad():
            for batch in eval_loader(dataset, batch_size):
                x, y = move_batch(batch, model)
                correct += int((model(x).argmax(1) == y).sum())
                total += len(y)
        return {"accuracy": correct / max(total, 1)}


class EncoderClassifier(nn.Module):
    """The MAE encoder (all patches visible) + LayerNorm + linear head, for fine-tuning."""

    def __init__(self, mae: MAE, num_classes: int, pool: str) -> None:
        super().__init__()
        self.mae, self.pool = mae, pool
        self.fc_norm = nn.LayerNorm(mae.cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(mae.cfg.embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(self.mae.encode(x, self.pool)))


class MAETask(Task):
    name = "mae"
    description = "Masked autoencoder (random/block/grid masks); linear probe + fine-tune accuracy"
    Options = MAEOptions
    primary_metric = "probe_accuracy"
    lower_is_better = frozenset({"loss", "test_loss", "loss_random75", "recon_mse"})
    # Any child but the first may start a stage (default sizes; __init__ follows the options).
    pipeline_split_points = ("enc0", "enc1", "enc2", "enc3", "enc_norm", "decoder_embed", "dec0", "dec1", "head")
    pipeline_reason = (
        "MAE children run in order on a state tuple: embed (imgs, mask) -> (tokens, ids_restore, target); "
        "enc*/enc_norm carry it; decoder_embed -> (tokens, mask, target); dec*; head -> (pred, target, mask). "
        "A stage may start at any child but 'embed'; stage 0 takes two inputs, MAETask.model_inputs(batch) = "
        "(imgs, mask), and the last stage's loss is MAETask.output_loss((pred, target, mask), y). Stages pass "
        "ids_restore (long, no grad) and target (float, no grad) along with the activations."
    )

    def __init__(self, options: MAEOptions | None = None) -> None:
        super().__init__(options)
        opts: MAEOptions = self.options
        if not 0.0 <= opts.mask_ratio < 1.0:
            raise FedsimError(f"task 'mae': key 'task_options.mask_ratio' = {opts.mask_ratio!r}: must be in [0, 1)")
        if opts.mask == "grid" and abs(opts.mask_ratio - 0.75) > 1e-9:
            raise FedsimError(f"task 'mae': key 'task_options.mask_ratio' = {opts.mask_ratio!r}: grid masking "
                              "keeps one patch per 2x2 cell, so the ratio is 0.75")
        self.cfg: MAEConfig | None = None
        self.mask_seed = opts.mask_seed
        # Split points follow the encoder/decoder depths, which are options: an instance attribute.
        preset = PRESETS[opts.preset]
        depth, dec_depth = opts.depth or preset.depth, opts.decoder_depth or preset.decoder_depth
        self.pipeline_split_points = (*(f"enc{i}" for i in range(depth)), "enc_norm", "decoder_embed",
                                      *(f"dec{i}" for i in range(dec_depth)), "head")

    # ---- data and model ------------------------------------------------------------------------
    def prepare_data(self, split: DatasetSplit) -> DatasetSplit:
        """``y`` becomes ``[label, sample index]``: masks are keyed by the index (see module doc)."""
        def with_index(ds: TensorDataset) -> TensorDataset:
            x, y = ds.tensors
            if y.ndim == 2:  # already packed
                return ds
            return TensorDataset(x, torch.stack([y.long(), torch.arange(len(y))], dim=1))

        if len(split.info.input_shape) != 3 or split.info.input_shape[1] != split.info.input_shape[2]:
            raise FedsimError(f"task 'mae' needs square images [C, H, W], got input shape {split.info.input_shape}")
        return DatasetSplit(with_index(split.train), with_index(split.test), split.info)

    def model_config(self, info: DataInfo) -> MAEConfig:
        o: MAEOptions = self.options
        channels, size = info.input_shape[0], info.input_shape[-1]
        sizes = {k: getattr(o, k) for k in ("patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
                                            "decoder_depth", "decoder_num_heads") if getattr(o, k)}
        cfg = replace(PRESETS[o.preset], img_size=size, in_chans=channels, norm_pix_loss=o.norm_pix_loss, **sizes)
        try:
            cfg.validate()
        except ValueError as exc:
            raise FedsimError(f"task 'mae': task_options give an invalid model: {exc}") from exc
        if o.mask == "grid" and cfg.grid[0] % 2:
            raise FedsimError(f"task 'mae': grid masking needs an even patch grid, got {cfg.grid} "
                              f"(image {size}, patch {cfg.patch_size})")
        return cfg

    def build_model(self, info: DataInfo) -> nn.Module:
        self.cfg = self.model_config(info)
        if self.mask_seed < 0:
            # Engines call seed_everything(train.seed) right before build_model (fedsim.engines.common).
            self.mask_seed = torch.initial_seed()
        return MAE(self.cfg)

    # ---- masks and loss ------------------------------------------------------------------------
    def _config(self, model: nn.Module) -> MAEConfig:
        if self.cfg is None:  # a model built elsewhere (e.g. loaded): read its config
            inner = getattr(model, "module", model)
            self.cfg = inner.cfg
        return self.cfg

    def masks_for(self, indices: torch.Tensor, cfg: MAEConfig, *, epoch: int | None,
                  device: torch.device | None = None) -> torch.Tensor:
        """``[N, L]`` masks of these samples: training masks are keyed by (seed, sample, ``epoch``);
        ``epoch = None`` gives the fixed test masks."""
        idx = [int(i) for i in indices.tolist()]
        train = epoch is not None
        draws = [epoch if train else 0] * len(idx)
        keys = sample_keys(max(self.mask_seed, 0), idx, draws, "train" if train else "test")
        return draw_masks(self.options.mask, cfg.grid, self.options.mask_ratio, keys,
                          random_offset=self.options.grid_random_offset, device=device)

    def model_inputs(self, model: nn.Module, batch: Batch, context: TaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs ``(imgs, mask)`` of a batch, masks keyed by ``context.epoch`` (the pipeline
        engine feeds these to its first stage)."""
        return self._inputs(model, batch, epoch=context.epoch)

    def _inputs(self, model: nn.Module, batch: Batch, *, epoch: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        return x, self.masks_for(y[:, 1], self._config(model), epoch=epoch, device=x.device)

    def output_loss(self, output: tuple[torch.Tensor, ...], target: torch.Tensor | None = None) -> torch.Tensor:
        """The masked-patch loss from the model's output ``(pred, target, mask)`` (the batch's
        ``target`` is unused: the patches are). Every sample masks the same number of patches, so
        this batch mean over masked patches is also the mean of per-sample losses: ranks' and
        microbatches' means average exactly."""
        pred, patches, mask = output
        return masked_patch_loss(pred, patches, mask)

    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int = 512) -> dict[str, float]:
        """Masked-patch loss on fixed test masks of the run's strategy, and on random 75% masks."""
        cfg = self._config(model)
        keys_total = {"loss": 0.0, "loss_random75": 0.0}
        count = 0
        with torch.no_grad():
            for batch in eval_loader(dataset, batch_size):
                x, y = move_batch(batch, model)
                keys_total["loss"] += float(self.output_loss(model(*self._inputs(model, (x, y), epoch=None)))) * len(x)
                keys = sample_keys(max(self.mask_seed, 0), y[:, 1], 0, "test-random75")
                mask = draw_masks("random", cfg.grid, 0.75, keys, device=x.device)
                keys_total["loss_random75"] += float(self.output_loss(model(x, mask))) * len(x)
                count += len(x)
        return {k: v / max(count, 1) for k, v in keys_total.items()}

    # ---- downstream ----------------------------------------------------------------------------
    def final_metrics(self, model: nn.Module, split: DatasetSplit, *, context: TaskContext) -> dict[str, float]:
        mae: MAE = getattr(model, "module", model)
        if self.options.reference == "raw_pixels":
            return {"probe_accuracy": raw_pixel_logreg(split)}
        metrics = {"probe_accuracy": self.linear_probe(mae, split)}
        if self.options.finetune_epochs > 0:
            metrics["finetune_accuracy"] = self.finetune(mae, split)
        if context.run_dir is not None and self.options.plot_images > 0:
            self.plot_reconstructions(mae, split.test, Path(context.run_dir) / "reconstructions.png")
        return metrics

    def _seed(self) -> int:
        return max(self.mask_seed, 0)

    def features(self, mae: MAE, dataset: TensorDataset, batch_size: int = 512) -> TensorDataset:
        """Frozen encoder features ``[N, D]`` of every image (no masking) with integer labels."""
        was_training = mae.training
        mae.eval()
        feats, labels = [], []
        with torch.no_grad():
            for batch in eval_loader(dataset, batch_size):
                x, y = move_batch(batch, mae)
                feats.append(mae.encode(x, self.options.pool))
                labels.append(y[:, 0] if y.ndim == 2 else y)
        mae.train(was_training)
        return TensorDataset(torch.cat(feats), torch.cat(labels))

    def linear_probe(self, mae: MAE, split: DatasetSplit) -> float:
        """Accuracy of BatchNorm(affine=False) + linear head on frozen encoder features (as the paper)."""
        o: MAEOptions = self.options
        train_f, test_f = self.features(mae, split.train), self.features(mae, split.test)
        torch.manual_seed(self._seed())
        head = nn.Sequential(nn.BatchNorm1d(mae.cfg.embed_dim, affine=False),
                             nn.Linear(mae.cfg.embed_dim, split.info.num_classes))
        head = head.to(device=model_device(mae), dtype=model_dtype(mae))
        nn.init.normal_(head[1].weight, std=0.01)  # the paper's probe init
        nn.init.zeros_(head[1].bias)
        cfg = TrainConfig(epochs=o.probe_epochs, batch_size=o.probe_batch_size, optimizer="sgd", lr=o.probe_lr,
                          momentum=0.9, schedule="cosine", seed=self._seed(), progress=False, checkpoint=False)
        return self._train_classifier(head, train_f, test_f, cfg)

    def finetune(self, mae: MAE, split: DatasetSplit) -> float:
        """Accuracy after training a copy of the encoder + LayerNorm + linear head end to end."""
        o: MAEOptions = self.options
        torch.manual_seed(self._seed() + 1)
        classifier = EncoderClassifier(copy.deepcopy(mae), split.info.num_classes, o.pool)
        classifier = classifier.to(device=model_device(mae), dtype=model_dtype(mae))
        cfg = TrainConfig(epochs=o.finetune_epochs, batch_size=o.finetune_batch_size, optimizer="adam",
                          lr=o.finetune_lr, schedule="cosine", seed=self._seed(), progress=False, checkpoint=False)
        train = TensorDataset(split.train.tensors[0], split.train.tensors[1][:, 0])
        test = TensorDataset(split.test.tensors[0], split.test.tensors[1][:, 0])
        return self._train_classifier(classifier, train, test, cfg)

    def _train_classifier(self, model: nn.Module, train: TensorDataset, test: TensorDataset, cfg: TrainConfig) -> float:
        from fedsim.train import build_schedulers

        task = _Classify()
        optimizers = {"model": make_optimizer(model.parameters(), cfg)}
        state = TrainState(model, optimizers, build_schedulers(optimizers, cfg))
        fit(task, state, cfg, lambda epoch: make_loader(train, cfg.batch_size, cfg.seed, epoch),
            context=TaskContext(device=model_device(model)), show_progress=False)
        model.eval()
        return task.evaluate(model, test)["accuracy"]

    def plot_reconstructions(self, mae: MAE, dataset: TensorDataset, path: Path) -> Path:
        """Rows: original, masked (red), reconstruction, reconstruction with visible patches pasted back."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from fedsim.models.mae import patchify, unpatchify

        cfg, k = mae.cfg, min(self.options.plot_images, len(dataset))
        x, y = move_batch((dataset.tensors[0][:k], dataset.tensors[1][:k]), mae)
        mask = self.masks_for(y[:, 1], cfg, epoch=None, device=x.device)
        was_training = mae.training
        mae.eval()
        with torch.no_grad():
            _, recon = mae.reconstruct(x, mask)
        mae.train(was_training)
        pix_mask = unpatchify(mask[..., None].to(x.dtype).expand(-1, -1, cfg.patch_dim), cfg.patch_size, cfg.in_chans)
        masked = x.masked_fill(pix_mask.bool(), float("nan"))
        pasted = unpatchify(patchify(x, cfg.patch_size), cfg.patch_size, cfg.in_chans) * (1 - pix_mask) \
            + recon * pix_mask
        rows = [("original", x), ("masked", masked), ("reconstruction", recon), ("recon + visible", pasted)]
        fig, axes = plt.subplots(len(rows), k, figsize=(1.2 * k, 1.3 * len(rows)), squeeze=False)
        lo, hi = float(x.min()), float(x.max())
        cmap = matplotlib.colormaps["gray"].with_extremes(bad="tab:red")  # masked patches in red
        for r, (title, images) in enumerate(rows):
            for c in range(k):
                img = images[c].detach().cpu().float()
                img = img[0] if img.shape[0] == 1 else ((img.permute(1, 2, 0) - lo) / (hi - lo)).clamp(0, 1)
                axes[r][c].imshow(img.numpy(), cmap=cmap, vmin=lo, vmax=hi)
                axes[r][c].set_xticks([])
                axes[r][c].set_yticks([])
            axes[r][0].set_ylabel(title, fontsize=7)
        ratio = num_masked(cfg.num_patches, self.options.mask_ratio) / cfg.num_patches
        fig.suptitle(f"MAE {self.options.mask} {ratio:.0%} masked", fontsize=9)
        fig.tight_layout()
        return save_figure(fig, path, dpi=100)


def raw_pixel_logreg(split: DatasetSplit) -> float:
    """Reference: scikit-learn logistic regression on flattened (normalised) raw pixels."""
    from sklearn.linear_model import LogisticRegression

    def arrays(ds: TensorDataset) -> tuple[Any, Any]:
        x, y = ds.tensors
        return x.flatten(1).double().numpy(), (y[:, 0] if y.ndim == 2 else y).numpy()

    x_train, y_train = arrays(split.train)
    x_test, y_test = arrays(split.test)
    clf = LogisticRegression(max_iter=2000).fit(x_train, y_train)
    return float(clf.score(x_test, y_test))

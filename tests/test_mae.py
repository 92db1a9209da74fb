"""MAE model and task: patchify, loss on masked patches only, encoder sees visible patches only,
per-sample masks independent of batch composition, and a short end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fedsim
from fedsim.data import load_dataset
from fedsim.errors import FedsimError
from fedsim.models.mae import (
    MAE,
    PRESETS,
    MAEConfig,
    masked_patch_loss,
    patchify,
    sincos_pos_embed_2d,
    unpatchify,
)
from fedsim.models.masking import draw_masks, sample_keys
from fedsim.tasks import TaskContext, make_task

SMALL = MAEConfig(embed_dim=16, depth=2, num_heads=2, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)


def _masks(n: int, strategy: str = "random", ratio: float = 0.75, grid: tuple[int, int] = (4, 4)) -> torch.Tensor:
    return draw_masks(strategy, grid, ratio, sample_keys(0, range(n)))


def test_patchify_round_trips_and_orders_patches_row_major() -> None:
    imgs = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    patches = patchify(imgs, 2)
    assert patches.shape == (2, 4, 12)
    assert torch.equal(unpatchify(patches, 2, 3), imgs)
    # Patch 1 (top right) of image 0, pixel (0, 0), channels 0..2 = imgs[0, :, 0, 2].
    assert torch.equal(patches[0, 1, :3], imgs[0, :, 0, 2])


def test_pos_embed_is_fixed_sincos_with_zero_cls() -> None:
    emb = sincos_pos_embed_2d(8, (4, 4))
    assert emb.shape == (17, 8)
    assert torch.equal(emb[0], torch.zeros(8))
    # Patch (row 0, col 0): sin(0) = 0, cos(0) = 1 in both halves.
    assert torch.allclose(emb[1], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    model = MAE(SMALL)
    names = {n for n, _ in model.named_parameters()}
    assert not any("pos_embed" in n for n in names)  # buffers, never trained
    assert torch.equal(model.embed.pos_embed[0], sincos_pos_embed_2d(16, (4, 4)))


def test_loss_ignores_predictions_on_visible_patches() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(3, 16, 4, requires_grad=True), torch.randn(3, 16, 4)
    mask = _masks(3).float()
    loss = masked_patch_loss(pred, target, mask)
    # By hand: per-patch MSE, averaged over the 3 * 12 masked patches.
    per_patch = ((pred - target) ** 2).mean(-1)
    assert torch.allclose(loss, per_patch[mask.bool()].mean())
    changed = pred.detach() + 100.0 * (1 - mask)[..., None]  # only visible patches change
    assert torch.equal(masked_patch_loss(changed, target, mask), loss.detach())
    loss.backward()
    assert (pred.grad[~mask.bool()] == 0).all() and (pred.grad[mask.bool()] != 0).any()


def test_encoder_sees_only_visible_patches() -> None:
    torch.manual_seed(0)
    model = MAE(SMALL).eval()
    imgs, mask = torch.randn(4, 1, 8, 8), _masks(4)
    latent, ids_restore, _ = model.forward_encoder(imgs, mask)
    assert latent.shape == (4, 1 + 4, 16)  # cls + 4 visible of 16
    # Changing the pixels of masked patches leaves the encoder output unchanged.
    pix_mask = unpatchify(mask[..., None].float().expand(-1, -1, 4), 2, 1)
    noisy = imgs + 5.0 * torch.randn_like(imgs) * pix_mask
    assert torch.allclose(model.forward_encoder(noisy, mask)[0], latent, atol=1e-6)
    assert not torch.allclose(model.forward_encoder(imgs + 0.1, mask)[0], latent)


def test_forward_runs_named_children_in_order_and_matches_official_methods() -> None:
    torch.manual_seed(0)
    model = MAE(SMALL).eval()
    assert model.layer_names() == ["embed", "enc0", "enc1", "enc_norm", "decoder_embed", "dec0", "head"]
    imgs, mask = torch.randn(4, 1, 8, 8), _masks(4, "block", 0.5)
    pred, target, out_mask = model(imgs, mask)
    assert pred.shape == (4, 16, 4) and torch.equal(out_mask, mask.float())
    assert torch.equal(target, patchify(imgs, 2))
    pred2, _, _ = model.forward_decoder(model.forward_encoder(imgs, mask))
    assert torch.equal(pred, pred2)
    # A stage boundary anywhere in the stack: running children piecewise gives the same output.
    state = (imgs, mask)
    children = list(model.children())
    for child in children[:3]:
        state = child(state)
    for child in children[3:]:
        state = child(state)
    assert torch.equal(state[0], pred)


def test_norm_pix_loss_targets_are_per_patch_normalised() -> None:
    model = MAE(MAEConfig(norm_pix_loss=True, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=8,
                          decoder_depth=1, decoder_num_heads=2))
    imgs = torch.randn(2, 1, 8, 8) * 3 + 1
    _, target, _ = model(imgs, _masks(2))
    assert torch.allclose(target.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 16), atol=1e-3)


def test_vit_tiny_preset_has_a_light_decoder() -> None:
    cfg = PRESETS["vit_tiny"]
    assert (cfg.num_patches, cfg.patch_dim, cfg.embed_dim, cfg.depth) == (196, 768, 192, 12)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth) == (128, 4)
    model = MAE(cfg)
    enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("embed", "enc")))
    dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("decoder", "dec", "head")))
    assert dec < 0.3 * enc


# ---- the task ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _task(**options):
    task = make_task("mae", {"embed_dim": 16, "depth": 1, "num_heads": 2, "decoder_embed_dim": 8,
                             "decoder_depth": 1, "decoder_num_heads": 2, **options})
    return task


def test_prepare_data_packs_label_and_sample_index(digits) -> None:
    split = _task().prepare_data(digits)
    x, y = split.train.tensors
    assert y.shape == (len(x), 2) and y.dtype == torch.long
    assert torch.equal(y[:, 0], digits.train.tensors[1]) and torch.equal(y[:, 1], torch.arange(len(x)))


@pytest.mark.parametrize("strategy", ["random", "block", "grid"])
def test_task_loss_is_independent_of_batch_composition(digits, strategy: str) -> None:
    """What data-parallel equivalence needs: masks keyed by (seed, index), exact counts, batch mean."""
    ratio = 0.75 if strategy == "grid" else 0.5
    split = _task().prepare_data(digits)
    x, y = split.train.tensors[0][:8].double(), split.train.tensors[1][:8]
    whole = _task(mask=strategy, mask_ratio=ratio, mask_seed=3)
    torch.manual_seed(0)
    model = whole.build_model(split.info).double()
    full = whole.loss(model, (x, y))
    full.backward()
    grad_full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ranks = [_task(mask=strategy, mask_ratio=ratio, mask_seed=3) for _ in range(2)]
    halves = [ranks[0].loss(model, (x[[0, 2, 4, 6]], y[[0, 2, 4, 6]])),
              ranks[1].loss(model, (x[[1, 3, 5, 7]], y[[1, 3, 5, 7]]))]
    (sum(halves) / 2).backward()
    assert torch.allclose(full, sum(halves) / 2, atol=1e-12)
    for g_full, p in zip(grad_full, model.parameters(), strict=True):
        assert torch.allclose(g_full, p.grad, atol=1e-12)
    # The same epoch redraws the same masks; a new epoch (TaskContext.epoch, from the loop) new ones.
    cfg = whole.cfg
    first = ranks[0].masks_for(torch.tensor([0]), cfg, epoch=None)
    again = whole.masks_for(y[:1, 1], cfg, epoch=0)
    assert torch.equal(whole.masks_for(y[:1, 1], cfg, epoch=0), again)
    assert torch.equal(whole.model_inputs(model, (x[:1], y[:1]), TaskContext(epoch=0))[1], again)
    if strategy != "grid":
        assert not torch.equal(whole.masks_for(y[:1, 1], cfg, epoch=1), again)
        assert not torch.equal(whole.model_inputs(model, (x[:1], y[:1]), TaskContext(epoch=1))[1], again)
    assert torch.equal(first, _task(mask=strategy, mask_ratio=ratio, mask_seed=3).masks_for(
        torch.tensor([0]), cfg, epoch=None))


def test_bad_options_are_clear_errors() -> None:
    with pytest.raises(FedsimError, match="mask_ratio"):
        make_task("mae", {"mask": "grid", "mask_ratio": 0.5})
    with pytest.raises(FedsimError, match="mask_ratio"):
        make_task("mae", {"mask_ratio": 1.0})
    with pytest.raises(FedsimError, match="mask"):
        make_task("mae", {"mask": "checkerboard"})


def test_short_run_reports_loss_probe_finetune_and_writes_png(tmp_path: Path) -> None:
    opts = {"embed_dim": 16, "depth": 1, "num_heads": 2, "decoder_embed_dim": 8, "decoder_depth": 1,
            "decoder_num_heads": 2, "probe_epochs": 3, "finetune_epochs": 1, "plot_images": 4}
    config = {"name": "mae_smoke", "task": "mae", "seeds": [0],
              "train": {"epochs": 2, "max_steps": 5, "batch_size": 32, "optimizer": "adam", "lr": 1e-3,
                        "progress": False, "checkpoint": False},
              "runs": [{"name": "block", "task_options": {**opts, "mask": "block", "mask_ratio": 0.5}},
                       {"name": "raw", "train": {"epochs": 0}, "task_options": {**opts, "reference": "raw_pixels"}}]}
    block, raw = fedsim.run(config, out=str(tmp_path), quiet=True)
    metrics = block["metrics"]
    assert 0.0 < metrics["loss"] < 5.0 and 0.0 < metrics["loss_random75"] < 5.0
    assert 0.1 < metrics["probe_accuracy"] <= 1.0 and 0.0 <= metrics["finetune_accuracy"] <= 1.0
    png = tmp_path / "mae_smoke" / "block-seed0" / "reconstructions.png"
    assert png.exists() and png.stat().st_size > 1000
    assert raw["metrics"]["probe_accuracy"] > 0.9  # logistic regression on raw digit pixels
    assert json.loads((tmp_path / "mae_smoke" / "block-seed0" / "summary.json").read_text())["metrics"]


def test_pipeline_split_points_name_children_of_the_built_model(digits) -> None:
    task = _task(depth=3, decoder_depth=2)
    model = task.build_model(task.prepare_data(digits).info)
    names = model.layer_names()
    assert set(task.pipeline_split_points) <= set(names[1:])
    assert len(task.pipeline_split_points) == len(names) - 1  # any child but the first may start a stage


def test_masking_report_groups_seeds_and_writes_table_and_plot(tmp_path: Path) -> None:
    from fedsim.reports.mae import masking_rows, report_masking

    def summary(name: str, seed: int, probe: float, options: dict, epochs: int = 1) -> dict:
        return {"name": name, "seed": seed, "config": {"task_options": options, "train": {"epochs": epochs}},
                "metrics": {"loss": 0.5, "loss_random75": 0.6, "probe_accuracy": probe, "finetune_accuracy": 0.7}}

    summaries = [summary("random_75", 0, 0.8, {"mask": "random", "mask_ratio": 0.75}),
                 summary("random_75", 1, 0.9, {"mask": "random", "mask_ratio": 0.75}),
                 summary("ref_raw", 0, 0.97, {"reference": "raw_pixels"}, epochs=0),
                 summary("ref_init", 0, 0.85, {}, epochs=0)]
    rows = {r["run"]: r for r in masking_rows(summaries)}
    mean, std, n = rows["random_75"]["probe_accuracy"]
    assert n == 2 and mean == pytest.approx(0.85) and std == pytest.approx(0.0707107, rel=1e-5)
    assert rows["random_75"]["paper"] == (84.9, 73.5)
    assert rows["ref_raw"]["strategy"] == "ref: raw_pixels" and rows["ref_raw"]["loss"] is None
    assert rows["ref_init"]["strategy"] == "ref: random_init"

    class Exp:
        name = "mae_masking"

    report_masking(Exp(), summaries, tmp_path)
    assert "85.0 ± 7.1" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "accuracy_vs_mask.png").stat().st_size > 1000

"""MAE step time at mask ratio 0 vs 0.75: the speed-up of encoding visible patches only.

The paper ("Masked Autoencoders Are Scalable Vision Learners", He et al.) reports >= 3x faster
pre-training because the encoder sees only the 25% visible patches while the light decoder
sees all of them. This script times one forward + backward of the ``vit_tiny`` preset
(12 x 192 encoder, 4 x 128 decoder, 224x224 RGB, 16x16 patches) at both ratios, alternating
them so that load on a shared machine hits both alike, and prints the measured ratio.

On CPU it runs with one torch thread by default and also records the process CPU time of each
step: on a machine shared with other jobs, CPU time measures the work done while wall time also
counts waiting for a core, so the CPU-time ratio is the one to trust there.

    python benchmarks/mae.py                       # CPU, 1 thread, batch 8, 3 timed reps (~1-2 min)
    python benchmarks/mae.py --device cuda --batch 64 --reps 20

Writes JSON (default ``results/benchmarks/mae.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fedsim.models.mae import MAE, PRESETS, masked_patch_loss
from fedsim.models.masking import draw_masks, sample_keys


def step(model: MAE, imgs: torch.Tensor, mask: torch.Tensor) -> None:
    """One forward + backward (the optimizer update costs the same at both ratios: left out)."""
    pred, target, mask = model(imgs, mask)
    if mask.sum() > 0:
        loss = masked_patch_loss(pred, target, mask)
    else:  # ratio 0 masks nothing: regress every patch so there is a loss to differentiate
        loss = ((pred - target) ** 2).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3, help="timed steps per ratio")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.75])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    parser.add_argument("--out", default="results/benchmarks/mae.json")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cfg = PRESETS["vit_tiny"]
    torch.manual_seed(0)
    model = MAE(cfg).to(device).train()
    imgs = torch.randn(args.batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    masks = {r: draw_masks("random", cfg.grid, r, sample_keys(0, range(args.batch)), device=device)
             for r in args.ratios}
    times: dict[float, list[float]] = {r: [] for r in args.ratios}
    cpu_times: dict[float, list[float]] = {r: [] for r in args.ratios}
    for rep in range(args.warmup + args.reps):
        for ratio in args.ratios:  # alternate ratios: background load affects both alike
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            step(model, imgs, masks[ratio])
            sync(device)
            if rep >= args.warmup:
                times[ratio].append(time.perf_counter() - start)
                cpu_times[ratio].append(time.process_time() - cpu_start)

    base = statistics.median(times[args.ratios[0]])
    cpu_base = statistics.median(cpu_times[args.ratios[0]])
    rows = []
    for ratio in args.ratios:
        med, cpu_med = statistics.median(times[ratio]), statistics.median(cpu_times[ratio])
        visible = cfg.num_patches - int(masks[ratio][0].sum())
        rows.append({"mask_ratio": ratio, "visible_patches": visible, "median_s": med,
                     "min_s": min(times[ratio]), "times_s": times[ratio], "speedup_vs_first": base / med,
                     "cpu_median_s": cpu_med, "cpu_times_s": cpu_times[ratio], "cpu_speedup_vs_first": cpu_base / cpu_med,
                     "images_per_s": args.batch / med})
    result = {
        "benchmark": "mae_step_time", "preset": "vit_tiny", "config": cfg.__dict__, "batch": args.batch,
        "reps": args.reps, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows,
        "speedup": rows[-1]["speedup_vs_first"], "cpu_time_speedup": rows[-1]["cpu_speedup_vs_first"],
    }
    print(f"MAE vit_tiny forward+backward, batch {args.batch}, {args.reps} reps, {device} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'mask ratio':>10} {'visible':>8} {'wall s':>9} {'min s':>8} {'img/s':>8} {'speed-up':>9} "
          f"{'cpu s':>8} {'cpu speed-up':>13}")
    for row in rows:
        print(f"{row['mask_ratio']:>10.2f} {row['visible_patches']:>8d} {row['median_s']:>9.4f} "
              f"{row['min_s']:>8.4f} {row['images_per_s']:>8.1f} {row['speedup_vs_first']:>8.2f}x "
              f"{row['cpu_median_s']:>8.4f} {row['cpu_speedup_vs_first']:>12.2f}x")
    print(f"measured speed-up of ratio {args.ratios[-1]} over {args.ratios[0]}: {result['speedup']:.2f}x wall, "
          f"{result['cpu_time_speedup']:.2f}x CPU time (paper: >= 3x for ViT-L with an 8 x 512 decoder)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

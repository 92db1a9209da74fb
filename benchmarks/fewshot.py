"""Episodes per second: batched torch distribution calibration vs per-episode NumPy + scikit-learn.

Both implementations score the same 5-way K-shot episodes of the same features (the synthetic
64-base / 20-novel, 640-d set by default, or the reference code's feature files) with the same
settings (Tukey 0.5, k = 2, alpha = 0.21, 750 drawn features per class, logistic regression
with C = 1). The reference (:mod:`fedsim.models.fewshot_reference`) is slow, so it runs on the
first ``--ref-episodes`` episodes; the torch path runs all ``--episodes`` and is also scored on
that common subset, where the two accuracies must agree within the 95% confidence interval
(the draws differ, so the agreement is statistical, not exact).

On a machine shared with other jobs the process CPU time is recorded next to the wall time.

    python benchmarks/fewshot.py                                # CPU, 1 thread (a few minutes)
    python benchmarks/fewshot.py --device cuda --episodes 1000 --ref-episodes 20
    python benchmarks/fewshot.py --base base_features.plk --novel novel_features.plk

Writes JSON (default ``results/benchmarks/fewshot.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fedsim.data.episodes import accuracy_ci, sample_episodes
from fedsim.data.features import load_feature_files, synthetic_features
from fedsim.models.fewshot import DCConfig, base_statistics, evaluate_episodes
from fedsim.models.fewshot_reference import evaluate_episodes_np


def timed(fn):  # type: ignore[no-untyped-def]
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--episodes", type=int, default=32, help="episodes for the batched torch path")
    parser.add_argument("--ref-episodes", type=int, default=4, help="episodes for the per-episode reference")
    parser.add_argument("--episode-batch", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    parser.add_argument("--base", default="", help="base-class feature file (pickle/.npz); default synthetic")
    parser.add_argument("--novel", default="", help="novel-class feature file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/benchmarks/fewshot.json")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    features = load_feature_files(args.base, args.novel) if args.base else synthetic_features(seed=args.seed)
    config = DCConfig(episode_batch=args.episode_batch, seed=args.seed)

    (stats, stats_wall, _) = timed(lambda: base_statistics(features.base).to(device))
    # The reference gets the same statistics precomputed: the timings compare the episodes only.
    stats_np = (stats.means.cpu().numpy(), stats.covs.cpu().numpy())
    rows = []
    for shot in args.shots:
        n_ref = min(args.ref_episodes, args.episodes)
        ep = sample_episodes(features.novel, 5, shot, 15, args.episodes, seed=1000 * args.seed + shot)
        ep_dev = ep.to(device)
        # warm-up on two episodes (kernels, allocator), not timed
        evaluate_episodes(ep_dev.support[:2], ep_dev.support_labels[:2], ep_dev.query[:2], ep_dev.query_labels[:2],
                          stats, config)
        if device.type == "cuda":
            torch.cuda.synchronize()

        def run_torch(ep_dev=ep_dev) -> np.ndarray:
            acc = evaluate_episodes(ep_dev.support, ep_dev.support_labels, ep_dev.query, ep_dev.query_labels,
                                    stats, config)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return acc

        acc_torch, wall_torch, cpu_torch = timed(run_torch)
        acc_ref, wall_ref, cpu_ref = timed(lambda ep=ep, n_ref=n_ref: evaluate_episodes_np(
            ep.support[:n_ref].numpy(), ep.support_labels[:n_ref].numpy(), ep.query[:n_ref].numpy(),
            ep.query_labels[:n_ref].numpy(), None, config, stats_np))
        torch_common, ci_torch_common = accuracy_ci(acc_torch[:n_ref])
        ref_mean, ref_ci = accuracy_ci(acc_ref)
        diff = acc_torch[:n_ref] - acc_ref
        diff_mean, diff_ci = accuracy_ci(diff)
        row = {
            "shot": shot,
            "torch_episodes": args.episodes,
            "ref_episodes": n_ref,
            "torch_episodes_per_s": args.episodes / wall_torch,
            "torch_episodes_per_cpu_s": args.episodes / max(cpu_torch, 1e-9),
            "ref_episodes_per_s": n_ref / wall_ref,
            "ref_episodes_per_cpu_s": n_ref / max(cpu_ref, 1e-9),
            "speedup_wall": (args.episodes / wall_torch) / (n_ref / wall_ref),
            "speedup_cpu": (args.episodes / max(cpu_torch, 1e-9)) / (n_ref / max(cpu_ref, 1e-9)),
            "torch_acc_all": accuracy_ci(acc_torch)[0],
            "torch_ci95_all": accuracy_ci(acc_torch)[1],
            "torch_acc_common": torch_common,
            "torch_ci95_common": ci_torch_common,
            "ref_acc_common": ref_mean,
            "ref_ci95_common": ref_ci,
            "paired_diff": diff_mean,
            "paired_diff_ci95": diff_ci,
            "agree_within_ci": bool(abs(torch_common - ref_mean) <= max(ci_torch_common, ref_ci)),
        }
        rows.append(row)
        print(f"{shot}-shot: torch {row['torch_episodes_per_s']:.2f} ep/s, reference {row['ref_episodes_per_s']:.3f} ep/s",
              flush=True)
    result = {
        "benchmark": "fewshot_dc",
        "features": "files" if args.base else "synthetic (64 base / 20 novel, 640-d)",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(),
        "base_statistics_s": stats_wall,
        "config": {k: getattr(config, k) for k in ("tukey", "lam", "generate", "k", "alpha", "samples", "C",
                                                    "max_iter", "episode_batch")},
        "torch": torch.__version__,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    from fedsim.results import print_table

    print_table(
        f"few-shot DC, 5-way, {result['features']}, {device} ({result['threads']} threads)",
        ["K", "torch ep/s", "ref ep/s", "speed-up (wall)", "speed-up (CPU)", "torch acc (common)",
         "ref acc (common)", "paired diff", "agree"],
        [[r["shot"], f"{r['torch_episodes_per_s']:.3g}", f"{r['ref_episodes_per_s']:.3g}", f"{r['speedup_wall']:.1f}x",
          f"{r['speedup_cpu']:.1f}x",
          f"{100 * r['torch_acc_common']:.1f} ± {100 * r['torch_ci95_common']:.1f}",
          f"{100 * r['ref_acc_common']:.1f} ± {100 * r['ref_ci95_common']:.1f}",
          f"{100 * r['paired_diff']:+.1f} ± {100 * r['paired_diff_ci95']:.1f}", r["agree_within_ci"]] for r in rows],
    )
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

"""GPU checks of the DDP (nccl), SyncBatchNorm and pipeline (cuda) paths, one step per subcommand.

Driven by ``benchmarks/gpu_checks.sh`` (which adds timeouts, the benchmarks and the log). Every
step prints ``PASS <name>: ...``, ``FAIL <name>: ...``, ``SKIP <name>: ...`` (a GPU-only assert
on a machine without CUDA) or ``INFO <name>: ...`` lines and exits non-zero if any check failed.
Without CUDA the same commands run on the CPU (gloo) so that the script can be dry-run anywhere.

    python benchmarks/gpu_checks.py env
    python benchmarks/gpu_checks.py ddp --work DIR
    python benchmarks/gpu_checks.py syncbn --work DIR        # starts torchrun itself
    python benchmarks/gpu_checks.py pipeline --work DIR

Tolerances: float64 and plain SGD everywhere. DDP with one rank equals the central engine with the
same batch up to rounding (cuDNN may pick non-deterministic float64 conv kernels, whose atomic
adds reorder sums: ~1e-16 relative per step), so 1e-9 absolute after 4 steps. The pipeline with
one stage equals single-process gradient accumulation on the same device to 1e-9 (same argument).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = 1e-9
FAILED: list[str] = []


def report(status: str, name: str, text: str) -> None:
    if status == "FAIL":
        FAILED.append(name)
    print(f"{status} {name}: {text}", flush=True)


def check(name: str, ok: bool, text: str) -> bool:
    report("PASS" if ok else "FAIL", name, text)
    return ok


def short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def gpu_check(name: str, ok: bool, text: str) -> None:
    """A check that only means something on CUDA: SKIP elsewhere."""
    if CUDA:
        check(name, ok, text)
    else:
        report("SKIP", name, f"no CUDA here (would check: {text})")


def run_cmd(cmd: list[str], timeout: float, cwd: Path | None = None) -> tuple[int, str]:
    """Run ``cmd`` in its own session, output captured and echoed; kill its whole session on timeout."""
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    CHILDREN.append(proc)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        output, _ = proc.communicate()
        output += f"\n[gpu_checks] killed after {timeout} s"
        proc.returncode = 124
    finally:
        CHILDREN.remove(proc)
    tail = output[-6000:]
    print(tail, flush=True)
    return proc.returncode, output


CHILDREN: list[subprocess.Popen[str]] = []


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """Stop ``proc``, its session and every descendant at once (torchrun puts workers in sessions of their own)."""
    from fedsim.engines.parallel.launch import terminate_tree

    terminate_tree(proc, grace_s=0.0)


def _on_sigterm(signum: int, frame: Any) -> None:
    """``timeout`` in gpu_checks.sh sends SIGTERM: take the launched jobs down too, then exit."""
    for proc in list(CHILDREN):
        kill_tree(proc)
    print(f"FAIL {sys.argv[1] if len(sys.argv) > 1 else 'step'}_terminated: stopped by the step timeout", flush=True)
    os._exit(124)


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max((float((a[k].detach().double().cpu() - b[k].detach().double().cpu()).abs().max())
                for k in a if a[k].is_floating_point()), default=0.0)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def write_experiment(path: Path, head: dict[str, Any], tables: dict[str, dict[str, Any]],
                     runs: list[dict[str, Any]]) -> Path:
    """A small TOML writer (the device has no tomli_w): top-level keys, tables, [[runs]] with sub-tables."""
    lines = [f"{k} = {toml_value(v)}" for k, v in head.items()]
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    for run in runs:
        lines.append("[[runs]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in run.items() if not isinstance(v, dict)]
        for key, sub in run.items():
            if isinstance(sub, dict):
                lines.append(f"[runs.{key}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in sub.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- env -----------------------------------------------------------------------------------------
def cmd_env(args: argparse.Namespace) -> None:
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA build {torch.version.cuda}, "
          f"cuda available {CUDA}", flush=True)
    if CUDA:
        print(f"devices: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}; "
              f"nccl {torch.cuda.nccl.version()}; cudnn {torch.backends.cudnn.version()}", flush=True)
    import importlib

    modules = ["fedsim", "fedsim.cli", "fedsim.experiment", "fedsim.distributed", "fedsim.engines.central",
               "fedsim.engines.parallel.data_parallel", "fedsim.engines.parallel.launch", "fedsim.engines.parallel.pipeline",
               "fedsim.engines.parallel.pipeline_split", "fedsim.nn.sync_batchnorm", "fedsim.models.mae",
               "fedsim.tasks.mae", "fedsim.models.fewshot", "torch.distributed.pipelining"]
    bad = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - reported
            bad.append(f"{name}: {type(exc).__name__}: {exc}")
    check("env_imports", not bad, "; ".join(bad) if bad else f"{len(modules)} modules import")
    leaked = [m for m in ("flwr", "ray") if sys.modules.get(m) is not None]
    check("env_no_flwr_ray", not leaked, f"flwr/ray imported by the GPU paths: {leaked}" if leaked else
          "importing the DDP/pipeline/MAE paths did not import flwr or ray")
    if CUDA:
        x = torch.randn(256, 256, device="cuda", dtype=torch.float64)
        check("env_cuda_matmul", bool(torch.allclose((x @ x).cpu(), x.cpu() @ x.cpu(), atol=1e-9)),
              "float64 matmul on cuda equals CPU")
        check("env_nccl_available", torch.distributed.is_nccl_available(), "torch.distributed nccl backend built")
    else:
        report("SKIP", "env_cuda_matmul", "no CUDA here")


# ---- DDP --------------------------------------------------------------------------------------------
DDP_TASKS: dict[str, dict[str, Any]] = {
    "exam_net": {},
    "bn_cnn": {},
    "dual_head_vit": {"depth": 2, "dropout": 0.0},
    "mae": {"probe_epochs": 1, "finetune_epochs": 0, "plot_images": 0},
}


def cmd_ddp(args: argparse.Namespace) -> None:
    import fedsim
    from fedsim.checkpoint import load_checkpoint

    work = Path(args.work) / "ddp"
    work.mkdir(parents=True, exist_ok=True)
    exp = write_experiment(
        work / "ddp_gpu.toml", {"name": "ddpgpu", "mode": "ddp"},
        {"train": {"epochs": 2, "max_steps": 2, "batch_size": 8, "lr": 0.05, "dtype": "float64", "threads": 1,
                   "progress": False, "device": DEV},
         "ddp": {"nproc": 1, "sync_bn": True, "use_gpu": CUDA, "timeout_s": 150}},
        [{"name": t, "task": t, **({"task_options": o} if o else {})} for t, o in DDP_TASKS.items()])
    # 1. torchrun --nproc-per-node 1 -m fedsim run: DDP on nccl (cuda) / gloo (dry run)
    t0 = time.time()
    code, _ = run_cmd(torchrun(1) + ["-m", "fedsim", "run", str(exp), "--out", str(work / "ddp")], 200)
    check("ddp_torchrun_exit", code == 0, f"torchrun x1 DDP job exit code {code} ({time.time() - t0:.0f} s)")
    if code != 0:
        return
    # 2. the central engine on the same device, same batch (one rank: DDP batch == central batch)
    t0 = time.time()
    central = fedsim.run(str(exp), ["mode=central"], out=str(work / "central"), quiet=True)
    cpu_central = fedsim.run(str(exp), ["mode=central", "train.device=cpu"], out=str(work / "central_cpu"),
                             quiet=True)
    print(f"central runs ({DEV} and cpu) took {time.time() - t0:.0f} s", flush=True)
    cpu_models = {s["name"]: s["model"].state_dict() for s in cpu_central}
    for summary in central:
        name = summary["name"]
        folder = work / "ddp" / "ddpgpu" / name
        ddp_summary = json.loads((folder / "summary.json").read_text())
        ckpt = load_checkpoint(folder / "checkpoint.pt")
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        check(f"ddp_results_{name}", ckpt["step"] == 4 and len(lines) == 2 and ddp_summary.get("world_size") == 1,
              f"summary/metrics/checkpoint written: step {ckpt['step']}, {len(lines)} metric lines, "
              f"world_size {ddp_summary.get('world_size')}, backend {ddp_summary.get('backend')}, "
              f"metrics {json.dumps({k: v for k, v in ddp_summary['metrics'].items() if isinstance(v, float)})[:200]}")
        gpu_check(f"ddp_backend_nccl_{name}", ddp_summary.get("backend") == "nccl",
                  f"summary backend = {ddp_summary.get('backend')!r} (want 'nccl')")
        central_state = summary["model"].state_dict()
        diff = max_diff(ckpt["model"], central_state)
        check(f"ddp_eq_central_{name}", diff < TOL,
              f"DDP x1 on {DEV} vs central on {DEV}, float64 SGD 4 steps: max abs diff {diff:.3g} (tol {TOL:g})")
        on_device = [str(t.device) for t in central_state.values()][:1]
        report("INFO", f"central_cuda_vs_cpu_{name}",
               f"central on {DEV} (tensors on {on_device}) vs central on cpu: max abs diff "
               f"{max_diff(central_state, cpu_models[name]):.3g}")
    # 3. fedsim run spawning torchrun itself (launch path) on the shipped experiment, 1 GPU worker
    t0 = time.time()
    sets = ["ddp.nproc=1", f"ddp.use_gpu={str(CUDA).lower()}", f"train.device={DEV}", "train.epochs=1",
            "train.progress=false", "ddp.timeout_s=150"]
    code, output = run_cmd([sys.executable, "-m", "fedsim", "run", "experiments/ddp_digits.toml", "--out",
                            str(work / "launch"), *sum((["--set", s] for s in sets), [])], 200)
    summary_path = work / "launch" / "ddp_digits" / "ddp_digits" / "summary.json"
    if code == 0 and not summary_path.exists():
        found = list((work / "launch").rglob("summary.json"))
        summary_path = found[0] if found else summary_path
    ok = code == 0 and summary_path.exists()
    acc = json.loads(summary_path.read_text())["metrics"].get("accuracy") if ok else None
    backend = json.loads(summary_path.read_text()).get("backend") if ok else None
    check("ddp_launcher_digits", ok and acc is not None and acc > 0.5,
          f"`fedsim run experiments/ddp_digits.toml` (spawns torchrun, 1 worker, sync_bn, 1 epoch): exit {code}, "
          f"accuracy {acc}, backend {backend} ({time.time() - t0:.0f} s)")
    gpu_check("ddp_launcher_backend_nccl", backend == "nccl", f"backend {backend!r}")
    # 4. the error: more processes than GPUs
    code, output = run_cmd([sys.executable, "-m", "fedsim", "run", "experiments/ddp_digits.toml", "--out",
                            str(work / "err"), "--set", "ddp.nproc=2", "--set", "ddp.use_gpu=true"], 60)
    wanted = "more processes than GPUs" if CUDA else "CUDA is not available"
    check("ddp_error_nproc_gt_gpus", code == 2 and wanted in output,
          f"ddp.nproc=2 with use_gpu on {torch.cuda.device_count()} GPU(s): exit {code}, message contains {wanted!r}")


# ---- SyncBatchNorm -------------------------------------------------------------------------------------
def cmd_syncbn(args: argparse.Namespace) -> None:
    """Start ``syncbn-worker`` under torchrun with one process (nccl on cuda:0)."""
    code, _ = run_cmd(torchrun(1) + [str(Path(__file__).resolve()), "syncbn-worker"], 150)
    check("syncbn_torchrun_exit", code == 0, f"torchrun x1 syncbn worker exit code {code}")


def cmd_syncbn_worker(args: argparse.Namespace) -> None:
    import torch.nn.functional as F
    from torch import nn

    from fedsim.config import RunConfig, from_dict
    from fedsim.distributed import init_distributed, read_env, wrap_ddp
    from fedsim.engines.common import build_model, load_task_data
    from fedsim.nn.sync_batchnorm import AllReduceBatchNorm

    env = read_env(use_cuda=CUDA)
    init_distributed(env, timeout_s=120)
    check("syncbn_backend", env.backend == ("nccl" if CUDA else "gloo"),
          f"process group backend {torch.distributed.get_backend()} on {env.device}")
    run = from_dict(RunConfig, {"task": "bn_cnn", "train": {"dtype": "float64", "device": DEV}})
    task, split = load_task_data(run)
    model = build_model(task, split, run, env.device)
    wrapped = wrap_ddp(model, env, sync_bn=True)
    kinds = sorted({type(m).__name__ for m in wrapped.module.modules() if "BatchNorm" in type(m).__name__})
    if CUDA:
        check("syncbn_convert_nccl", kinds == ["SyncBatchNorm"],
              f"bn_cnn under wrap_ddp(sync_bn=True) on nccl has BatchNorm kinds {kinds} (want torch SyncBatchNorm)")
    else:
        check("syncbn_convert_gloo", kinds == [AllReduceBatchNorm.__name__], f"gloo: BatchNorm kinds {kinds}")
    # One training step through the DDP model (SyncBatchNorm with one rank falls back to batch_norm).
    x, y = next(iter(torch.utils.data.DataLoader(split.train, batch_size=32)))
    wrapped.train()
    loss = nn.functional.cross_entropy(wrapped(x.to(env.device, torch.float64)), y.to(env.device))
    loss.backward()
    check("syncbn_ddp_step", bool(torch.isfinite(loss)), f"forward+backward of bn_cnn under DDP+sync BN: loss {loss.item():.4f}")
    # torch's SyncBatchNorm autograd function (the CUDA stats/gather/elemt kernels and the nccl
    # all_gather that a 2-GPU run uses) called directly with world_size 1, vs F.batch_norm.
    try:
        from torch.nn.modules._functions import SyncBatchNorm as SyncBNFunction
    except ImportError as exc:
        report("FAIL", "syncbn_kernels", f"torch.nn.modules._functions.SyncBatchNorm missing: {exc}")
        return
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        gen = torch.Generator().manual_seed(0)
        xs = torch.randn(16, 8, 5, 5, generator=gen, dtype=dtype).to(env.device) * 3 + 1
        w = torch.rand(8, generator=gen, dtype=dtype).to(env.device) + 0.5
        b = torch.randn(8, generator=gen, dtype=dtype).to(env.device)
        up = torch.randn(16, 8, 5, 5, generator=gen, dtype=dtype).to(env.device)
        results = []
        for sync in (True, False):
            xi, wi, bi = (t.clone().requires_grad_(True) for t in (xs, w, b))
            rm, rv = torch.zeros(8, dtype=dtype, device=env.device), torch.ones(8, dtype=dtype, device=env.device)
            try:
                if sync:
                    out = SyncBNFunction.apply(xi, wi, bi, rm, rv, 1e-5, 0.1, torch.distributed.group.WORLD, 1)
                else:
                    out = F.batch_norm(xi, rm, rv, wi, bi, True, 0.1, 1e-5)
            except Exception as exc:  # noqa: BLE001 - reported
                results.append(exc)
                break
            (out * up).sum().backward()
            results.append([out, xi.grad, wi.grad, bi.grad, rm, rv])
        name = f"syncbn_kernels_{str(dtype).split('.')[-1]}"
        if isinstance(results[0], Exception):
            if CUDA:
                report("FAIL", name, f"torch SyncBatchNorm function raised on cuda: {short(results[0])}")
            else:
                report("SKIP", name, f"torch SyncBatchNorm function on CPU raised (expected): {short(results[0])}")
            continue
        diff = max(float((a - c).abs().max()) for a, c in zip(results[0], results[1], strict=True))
        check(name, diff < tol, f"torch SyncBatchNorm function (world 1, {env.backend}) vs F.batch_norm: output, "
              f"grads of x/weight/bias and running stats max abs diff {diff:.3g} (tol {tol:g})")


# ---- pipeline ---------------------------------------------------------------------------------------
PIPE_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("exam_net", "gpipe", {}),
    ("bn_cnn", "gpipe", {}),
    ("bn_cnn", "1f1b", {}),
    ("bn_cnn", "interleaved_1f1b", {}),
    ("dual_head_vit", "gpipe", {}),
    ("mae", "gpipe", {"probe_epochs": 1, "finetune_epochs": 0, "plot_images": 0}),
    ("mae", "interleaved_1f1b", {"probe_epochs": 1, "finetune_epochs": 0, "plot_images": 0}),
]
PIPE_STEPS = 3


def reference_state(run: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """Single-process gradient accumulation over the pipeline's microbatches (tests/test_pipeline_equivalence)."""
    from fedsim.engines.common import build_model, load_task_data
    from fedsim.engines.parallel.pipeline import FullBatches
    from fedsim.tasks import move_batch
    from fedsim.train import configure_torch, make_loader

    configure_torch(run.train)
    task, split = load_task_data(run)
    model = build_model(task, split, run, device)
    optimizer = task.build_optimizers(model, run.train)["model"]
    b, m = run.train.batch_size, run.pipeline.microbatches
    batches = FullBatches(make_loader(split.train, b, run.train.seed, 0, run.train.shuffle), b)
    for step, (x, y) in enumerate(batches):
        if step >= run.train.max_steps:
            break
        model.train()
        optimizer.zero_grad(set_to_none=True)
        for xm, ym in zip(x.chunk(m), y.chunk(m), strict=True):
            (task.loss(model, move_batch((xm, ym), model)) / m).backward()
        optimizer.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def cmd_pipeline(args: argparse.Namespace) -> None:
    from fedsim.checkpoint import load_checkpoint
    from fedsim.config import load_experiment

    work = Path(args.work) / "pipeline"
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for task, schedule, options in PIPE_CASES:
        pipeline: dict[str, Any] = {"schedule": schedule}
        if schedule == "interleaved_1f1b":
            pipeline["virtual_stages"] = 2
        runs.append({"name": f"{task}-{schedule}", "task": task, "pipeline": pipeline,
                     **({"task_options": options} if options else {})})
    exp = write_experiment(
        work / "pp_gpu.toml", {"name": "ppgpu", "mode": "pipeline"},
        {"train": {"epochs": 1, "max_steps": PIPE_STEPS, "batch_size": 16, "lr": 0.05, "optimizer": "sgd",
                   "dtype": "float64", "threads": 1, "device": DEV, "progress": False},
         "pipeline": {"stages": 1, "microbatches": 4, "timeout_s": 200}}, runs)
    # `fedsim run` outside torchrun validates, then starts torchrun with stages x dp = 1 process.
    t0 = time.time()
    code, _ = run_cmd([sys.executable, "-m", "fedsim", "run", str(exp), "--out", str(work / "out")], 240)
    check("pipeline_launch_exit", code == 0, f"`fedsim run` (spawns torchrun x1) of {len(runs)} one-stage "
          f"pipeline runs on {DEV}: exit {code} ({time.time() - t0:.0f} s)")
    experiment = load_experiment(str(exp))
    for run in experiment.runs:
        folder = work / "out" / "ppgpu" / run.name
        if not (folder / "checkpoint.pt").exists():
            check(f"pipeline_eq_{run.name}", False, f"no checkpoint in {folder}")
            continue
        ckpt = load_checkpoint(folder / "checkpoint.pt")
        summary = json.loads((folder / "summary.json").read_text())
        ref = reference_state(run, torch.device(DEV))
        diff = max_diff(ckpt["model"], ref)
        check(f"pipeline_eq_{run.name}", ckpt["step"] == PIPE_STEPS and diff < TOL,
              f"1-stage {run.pipeline.schedule} on {DEV} (split {summary['pipeline']['split']}, m=4) vs gradient "
              f"accumulation on {DEV}: step {ckpt['step']}, max abs diff (params+buffers) {diff:.3g} (tol {TOL:g}); "
              f"step time {summary['pipeline']['step_time_s']}")
        if CUDA:
            report("INFO", f"pipeline_cuda_vs_cpu_ref_{run.name}",
                   f"vs CPU reference: {max_diff(ckpt['model'], reference_state(run, torch.device('cpu'))):.3g}")
    # The error: two stages on cuda with one GPU.
    code, output = run_cmd([sys.executable, "-m", "fedsim", "run", str(exp), "--only", "bn_cnn-gpipe", "--out",
                            str(work / "err"), "--set", "pipeline.stages=2", "--set", "train.device=cuda"], 60)
    check("pipeline_error_stages_gt_gpus", code == 2 and "GPU(s) are visible" in output,
          f"pipeline.stages=2, train.device=cuda on {torch.cuda.device_count()} GPU(s): exit {code}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["env", "ddp", "syncbn", "syncbn-worker", "pipeline"])
    parser.add_argument("--work", default="/tmp/fedsim_gpu_checks")
    args = parser.parse_args()
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        {"env": cmd_env, "ddp": cmd_ddp, "syncbn": cmd_syncbn, "syncbn-worker": cmd_syncbn_worker,
         "pipeline": cmd_pipeline}[args.step](args)
    except Exception:  # noqa: BLE001 - a crash is a failed step, with its traceback
        import traceback

        traceback.print_exc()
        report("FAIL", f"{args.step}_crashed", "exception above")
    return 1 if FAILED else 0


if __name__ == "__main__":
    raise SystemExit(main())

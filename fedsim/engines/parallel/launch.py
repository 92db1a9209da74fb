"""Starting torchrun for a run, when ``fedsim run`` is not already running under torchrun.

:func:`launch_torchrun` writes the resolved run (every default filled in, the seed applied) to
``<run folder>/launch.json`` and starts::

    python -m torch.distributed.run --standalone --nproc-per-node N [--max-restarts R] \\
        -m fedsim.engines.parallel.launch <run folder>/launch.json

(``--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID`` instead of
``--standalone`` for multi-node jobs). Each worker rebuilds the same :class:`RunConfig` and calls
the run's engine, which finds itself under torchrun and trains its rank. Rank 0 writes the run
folder; the launcher reads ``summary.json`` back.

The job runs under a wall-clock limit with ``timeout -k`` semantics: at the limit torchrun gets
SIGTERM (it stops its workers), and whatever is left of the processes it started gets SIGKILL
after a grace period. torchrun starts each worker in a new session, so they are found by
parentage (a snapshot of torchrun's descendants), never by name.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from fedsim.checkpoint import atomic_write_json
from fedsim.config import RunConfig, from_dict, to_dict
from fedsim.distributed import check_port_free
from fedsim.engines.common import RunContext
from fedsim.errors import FedsimError
from fedsim.ops.procs import child_env

__all__ = ["launch_torchrun", "torchrun_command", "run_with_timeout", "terminate_tree", "LAUNCH_SPEC"]

LAUNCH_SPEC = "launch.json"
KILL_GRACE_S = 15.0


def torchrun_command(spec_path: str, nproc: int, *, nnodes: int = 1, rdzv_endpoint: str = "", rdzv_id: str = "fedsim",
                     max_restarts: int = 0, extra_args: Sequence[str] = ()) -> list[str]:
    """The torchrun command line that runs the launch spec on this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1 and not rdzv_endpoint:
        cmd.append("--standalone")
    else:
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
                "--rdzv-id", rdzv_id]
    cmd += ["--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts), *extra_args,
            "-m", "fedsim.engines.parallel.launch", spec_path]
    return cmd


def terminate_tree(proc: subprocess.Popen[Any], grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM ``proc``'s process group, wait ``grace_s``, then SIGKILL what is left of its descendants.

    The descendants are listed *before* any signal: once torchrun exits, its workers (each in a
    session of its own) would be orphans nobody can attribute to it any more.
    """
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:  # anything torchrun started since the snapshot
        descendants += psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.Error:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    psutil.wait_procs(descendants, timeout=5)


def run_with_timeout(cmd: Sequence[str], timeout_s: float, *, env: dict[str, str] | None = None,
                     what: str = "job", cwd: str | None = None, timeout_key: str = "timeout_s") -> int:
    """Run ``cmd`` in its own process group; at ``timeout_s`` stop it and everything it started.

    Output goes to this process's stdout/stderr. Returns the exit code; raises FedsimError on timeout.
    """
    proc = subprocess.Popen(list(cmd), env=child_env(env), start_new_session=True, cwd=cwd)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        terminate_tree(proc)
        raise FedsimError(f"{what} did not finish within {timeout_s:g} s ({timeout_key}); stopped it and "
                          "the processes it started") from None
    except BaseException:  # KeyboardInterrupt, or anything else: never leave workers behind
        terminate_tree(proc)
        raise


def _rdzv_id(run: RunConfig, ctx: RunContext) -> str:
    """The same id on every node that launches this run (experiment, run name and seed)."""
    experiment = ctx.experiment.name if ctx.experiment is not None else "fedsim"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{experiment}-{run.name}-s{run.train.seed}")[:120]


def launch_torchrun(ctx: RunContext, run: RunConfig, nproc: int, *, nnodes: int = 1, rdzv_endpoint: str = "",
                    max_restarts: int = 0, timeout_s: float = 900, extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``run`` under torchrun with ``nproc`` processes on this node; return rank 0's summary.

    Parameters
    ----------
    ctx: the run's context; its folder receives ``launch.json`` and rank 0's results.
    nnodes, rdzv_endpoint: multi-node c10d rendezvous (every node runs the same launch).
    max_restarts: torchrun ``--max-restarts``; a restarted group resumes from the last checkpoint.
    timeout_s: wall-clock limit of the whole job (``timeout -k`` semantics).
    extra_args: more torchrun arguments (e.g. ``--local-ranks-filter 0``).
    """
    if rdzv_endpoint and nnodes == 1:
        # A single-node job with an explicit endpoint hosts the store itself: the port must be free.
        host, _, port = rdzv_endpoint.rpartition(":")
        check_port_free(host, int(port), f"{run.source}: ddp.rdzv_endpoint = {rdzv_endpoint!r}")
    spec = {"run": to_dict(run), "out": str(ctx.out.root.resolve()), "resume": ctx.resume}
    spec_path = ctx.out.path(LAUNCH_SPEC)
    ctx.out.summary_path.unlink(missing_ok=True)  # what we read back must come from this job
    atomic_write_json(spec_path, spec)
    cmd = torchrun_command(str(spec_path), nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                           rdzv_id=_rdzv_id(run, ctx), max_restarts=max_restarts, extra_args=extra_args)
    print("fedsim: launching " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    started = time.time()
    # One torch thread per worker unless the run says otherwise (torchrun sets OMP_NUM_THREADS=1 too).
    # ddp, pipeline and decentralized each hold their limit in the config section named like the mode.
    code = run_with_timeout(cmd, timeout_s, what=f"torchrun for run '{run.name}'", timeout_key=f"{run.mode}.timeout_s")
    if code != 0:
        raise FedsimError(f"torchrun for run '{run.name}' exited with code {code} (worker errors above)")
    if not ctx.out.summary_path.exists():
        if nnodes > 1:  # global rank 0 ran on another node and wrote its results there
            print(f"fedsim: run '{run.name}' finished on this node; rank 0 wrote the results on another node",
                  file=sys.stderr)
            return {"name": run.name, "task": run.task, "mode": run.mode, "metrics": {}, "wall_time_s":
                    time.time() - started, "note": "rank 0 ran on another node"}
        raise FedsimError(f"torchrun for run '{run.name}' finished but wrote no {ctx.out.summary_path}")
    summary = json.loads(ctx.out.summary_path.read_text())
    summary["launch_wall_time_s"] = time.time() - started
    model = _final_model(run, ctx)
    if model is not None:
        summary["model"] = model
    return summary


def _final_model(run: RunConfig, ctx: RunContext) -> Any:
    """The trained model rebuilt from rank 0's last checkpoint (for callers of ``fedsim.run``)."""
    if not ctx.out.checkpoint_path.exists():
        return None
    from fedsim.checkpoint import load_checkpoint
    from fedsim.engines.common import build_model, load_task_data
    from fedsim.train import resolve_device

    task, split = load_task_data(run)
    model = build_model(task, split, run, resolve_device("cpu"))
    model.load_state_dict(load_checkpoint(ctx.out.checkpoint_path)["model"])
    return model.eval()


# ---- the worker side: `python -m fedsim.engines.parallel.launch SPEC` under torchrun ----------------------
def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of each torchrun worker: rebuild the run from the spec and call its engine."""
    parser = argparse.ArgumentParser(prog="python -m fedsim.engines.parallel.launch",
                                     description="Run one fedsim run from a launch spec (a torchrun worker).")
    parser.add_argument("spec", help="launch.json written by launch_torchrun")
    args = parser.parse_args(argv)
    if os.getcwd() not in sys.path:  # users' module:attribute tasks live next to their experiments
        sys.path.insert(0, os.getcwd())
    from fedsim.distributed import read_env
    from fedsim.engines import engine_for
    from fedsim.results import RunDir

    try:
        spec = json.loads(open(args.spec).read())
        run = from_dict(RunConfig, spec["run"], spec["run"].get("source", args.spec))
        ctx = RunContext(out=RunDir(spec["out"]), resume=bool(spec.get("resume")), rank0=read_env().is_rank0)
        engine_for(run.mode)(run, ctx)
    except FedsimError as exc:
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    from fedsim.distributed import exit_process

    exit_process(worker_main())  # tear the process group down, then leave without finalising

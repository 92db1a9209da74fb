"""The engine for ``mode = "ddp"``: the task's model under ``DistributedDataParallel``.

:func:`run_ddp` does one of three things:

* inside a torchrun worker: train this rank's share
  (:func:`fedsim.engines.parallel.data_parallel.train_data_parallel`);
* ``launcher = "torchrun"`` outside torchrun: start torchrun on this run and wait
  (:func:`fedsim.engines.parallel.launch.launch_torchrun`);
* ``launcher = "ray"``: run the same training function through Ray Train's ``TorchTrainer``
  (:mod:`fedsim.engines.parallel.ray_train`).
"""

from __future__ import annotations

from typing import Any

from fedsim.config import RunConfig
from fedsim.distributed import distributed_session, read_env, under_launcher
from fedsim.engines.common import RunContext
from fedsim.engines.parallel.data_parallel import TorchrunSink, train_data_parallel, validate_ddp, wants_cuda

__all__ = ["run_ddp"]


def run_ddp(run: RunConfig, ctx: RunContext) -> dict[str, Any]:
    """Engine for ``mode = "ddp"`` (see the module docstring for the three cases)."""
    if under_launcher():
        env = read_env(use_cuda=wants_cuda(run))
        with distributed_session(env, timeout_s=run.ddp.timeout_s):
            sink = TorchrunSink(ctx.out, env, resume=ctx.resume, checkpoint=run.train.checkpoint)
            return train_data_parallel(run, env, sink, launcher="torchrun")
    validate_ddp(run)
    if run.ddp.launcher == "ray":
        from fedsim.engines.parallel.ray_train import run_ray_train

        return run_ray_train(run, ctx)
    from fedsim.engines.parallel.launch import launch_torchrun

    ddp = run.ddp
    return launch_torchrun(ctx, run, ddp.nproc, nnodes=ddp.nnodes, rdzv_endpoint=ddp.rdzv_endpoint,
                           max_restarts=ddp.max_restarts, timeout_s=ddp.timeout_s)

"""The reference engine: one process, one device, the shared loop."""

from __future__ import annotations

import time
from typing import Any

from fedsim.config import RunConfig
from fedsim.engines.common import RunContext, final_run_metrics, prepare, save_state, task_context
from fedsim.results import make_summary
from fedsim.train import fit, make_loader


def run_central(run: RunConfig, ctx: RunContext) -> dict[str, Any]:
    """Train ``run`` centrally; log each epoch, checkpoint each epoch, write the summary."""
    started = time.time()
    out = ctx.out
    resume = ctx.resume and out.checkpoint_path.exists()
    if not resume and ctx.rank0:
        out.reset_metrics()
    prepared = prepare(run, resume_from=out if resume else None)
    task, split, state = prepared.task, prepared.split, prepared.state
    context = task_context(out if ctx.rank0 else None, prepared.device)
    train_cfg = run.train

    def on_epoch_end(state_now: Any, record: dict[str, Any]) -> None:
        if not ctx.rank0:  # a central run started on every rank by torchrun: only rank 0 writes
            return
        out.log(record)
        if train_cfg.checkpoint:
            save_state(out, "central", state_now)

    history = fit(
        task, state, train_cfg,
        lambda epoch: make_loader(split.train, train_cfg.batch_size, train_cfg.seed, epoch, train_cfg.shuffle),
        evaluate=lambda: task.evaluate(state.model, split.test, train_cfg.eval_batch_size),
        context=context,
        on_epoch_end=on_epoch_end,
        description=run.name,
    )
    state.model.eval()
    if resume:
        history = out.read_metrics()  # epochs before the interruption + the ones just run
    metrics = final_run_metrics(task, state.model, split, run, history, context=context)
    summary = make_summary(run, metrics, primary_metric=task.primary_metric, started=started, extra={"epochs": state.epoch, "steps": state.step,
                                                                   "history": history})
    if ctx.rank0:
        out.write_summary(summary)
    summary["model"] = state.model  # in-memory only (not JSON): lets tests and fedsim.run callers inspect it
    return summary

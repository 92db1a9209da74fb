"""The reference engine: one process, one device, the shared loop.

With ``train.dp`` the model, optimizer and batches are made private by Opacus
(:mod:`fedsim.privacy.dpsgd`): the loop is the same, its batches are Poisson-sampled and its step is
the task's step on the private model; each epoch records ``dp_epsilon``, checkpoints keep the
accountant, and the summary carries the ``privacy`` record.
"""

from __future__ import annotations

import time
from typing import Any

from fedsim.checkpoint import load_checkpoint
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
    model = state.model  # the plain model: evaluation, checkpoints, the summary

    private = None
    if train_cfg.dp.enabled:
        from fedsim.privacy.dpsgd import make_private

        private = make_private(run, task, state, split.train, device=prepared.device)
        if resume:
            private.restore(load_checkpoint(out.checkpoint_path), str(out.checkpoint_path))

    def on_epoch_end(state_now: Any, record: dict[str, Any]) -> None:
        if private is not None:
            record.update(private.epoch_metrics())
        if not ctx.rank0:  # a central run started on every rank by torchrun: only rank 0 writes
            return
        out.log(record)
        if train_cfg.checkpoint:
            save_state(out, "central", state_now, model=model,
                       engine_state={"dp": private.state_dict()} if private is not None else None)

    history = fit(
        task, state, train_cfg,
        private.batches_for_epoch if private is not None else
        lambda epoch: make_loader(split.train, train_cfg.batch_size, train_cfg.seed, epoch, train_cfg.shuffle),
        evaluate=lambda: task.evaluate(model, split.test, train_cfg.eval_batch_size),
        context=context,
        step_fn=private.step_fn(task, state) if private is not None else None,
        on_epoch_end=on_epoch_end,
        description=run.name,
    )
    model.eval()
    if resume:
        history = out.read_metrics()  # epochs before the interruption + the ones just run
    metrics = final_run_metrics(task, model, split, run, history, context=context)
    extra: dict[str, Any] = {"epochs": state.epoch, "steps": state.step, "history": history}
    if private is not None:
        metrics.update(private.summary_metrics())
        extra["privacy"] = private.privacy_record()
    summary = make_summary(run, metrics, primary_metric=task.primary_metric, started=started, extra=extra)
    if ctx.rank0:
        out.write_summary(summary)
    summary["model"] = model  # in-memory only (not JSON): lets tests and fedsim.run callers inspect it
    return summary

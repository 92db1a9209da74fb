"""Tasks: the :class:`Task` API (model + loss + metrics + data), the context engines hand a task, and
the built-in tasks (``part_a``, ``mae``, ``fewshot``), registered by name in :data:`TASKS`."""

from fedsim.tasks.base import (
    TASKS,
    Batch,
    ExtraLoss,
    NoOptions,
    Optimizers,
    Task,
    TaskContext,
    eval_loader,
    make_optimizer,
    make_task,
    model_device,
    model_dtype,
    move_batch,
    options_dict,
    task_class,
)

__all__ = ["TASKS", "Batch", "ExtraLoss", "NoOptions", "Optimizers", "Task", "TaskContext", "eval_loader", "make_optimizer",
           "make_task", "model_device", "model_dtype", "move_batch", "options_dict", "task_class"]

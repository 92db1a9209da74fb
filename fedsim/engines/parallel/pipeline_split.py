"""Cutting a stack-of-layers model into pipeline pieces at named split points.

A pipelined model runs its named children in order (``for child in children: x = child(x)``,
see :mod:`fedsim.tasks`). A task lists in :attr:`Task.pipeline_split_points` the children where a
new piece may start; an experiment picks the cut (``pipeline.split``):

* ``[]`` (default): the task's split points as they are when there are exactly ``pieces - 1`` of
  them, otherwise the balanced choice among them;
* ``["balanced"]``: the ``pieces - 1`` allowed points that minimise the largest piece's
  parameter count (ties: the smaller sum of squared counts, then more even layer counts);
* explicit names: exactly ``pieces - 1`` allowed points in model order.

``pieces = stages * virtual_stages``; piece ``i`` runs on pipeline rank ``i % stages`` (the
looped placement of ``ScheduleInterleaved1F1B``). Everything here is pure (no process groups),
so the engine validates a run in the launching process before any worker starts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from fedsim.config import RunConfig
from fedsim.errors import ConfigError, UnsupportedError
from fedsim.tasks import Task

__all__ = ["SplitPlan", "PipelinePiece", "layer_children", "balanced_cuts", "plan_split", "make_pieces", "check_schedule",
           "num_pieces", "BALANCED"]

BALANCED = "balanced"
# Exhaustive search over cut combinations below this many; a minimax DP above it.
_EXHAUSTIVE_LIMIT = 200_000


@dataclass(frozen=True)
class SplitPlan:
    """Where a model is cut: piece ``i`` holds ``children[bounds[i]:bounds[i + 1]]``."""

    names: tuple[str, ...]
    """Child-module names in order."""
    bounds: tuple[int, ...]
    """Piece boundaries as child indices: ``0 = bounds[0] < ... < bounds[-1] = len(names)``."""
    params: tuple[int, ...]
    """Parameters per piece."""

    @property
    def pieces(self) -> int:
        return len(self.bounds) - 1

    @property
    def split_points(self) -> tuple[str, ...]:
        """The children where pieces 1.. start (what ``pipeline.split`` names)."""
        return tuple(self.names[b] for b in self.bounds[1:-1])

    def children_of(self, piece: int) -> tuple[str, ...]:
        return self.names[self.bounds[piece]:self.bounds[piece + 1]]

    def describe(self) -> list[dict[str, object]]:
        """One row per piece (for summaries and logs)."""
        return [{"piece": i, "children": list(self.children_of(i)), "params": self.params[i]}
                for i in range(self.pieces)]


def layer_children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's named children in execution order (the pipeline's layers)."""
    return list(model.named_children())


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _loads(costs: Sequence[int], bounds: Sequence[int]) -> list[int]:
    return [sum(costs[a:b]) for a, b in itertools.pairwise(bounds)]


def balanced_cuts(costs: Sequence[int], allowed: Sequence[int], pieces: int) -> list[int]:
    """Choose ``pieces - 1`` cut indices from ``allowed`` that balance ``costs`` over the pieces.

    Parameters
    ----------
    costs: cost of each layer (parameter count).
    allowed: layer indices where a piece may start (each in ``1 .. len(costs) - 1``).
    pieces: number of pieces.

    Returns
    -------
    Sorted cut indices minimising the largest piece (ties: smaller sum of squares, then the more
    even layer counts, then the earliest cuts).
    """
    allowed = sorted(set(allowed))
    k = pieces - 1
    if k == 0:
        return []
    if k > len(allowed):
        raise ValueError(f"{pieces} pieces need {k} cuts but only {len(allowed)} are allowed")
    n = len(costs)

    def key(cuts: tuple[int, ...]) -> tuple[int, int, int, tuple[int, ...]]:
        bounds = (0, *cuts, n)
        loads = _loads(costs, bounds)
        sizes = [b - a for a, b in itertools.pairwise(bounds)]
        return max(loads), sum(x * x for x in loads), max(sizes), cuts

    if math.comb(len(allowed), k) <= _EXHAUSTIVE_LIMIT:
        return list(min(itertools.combinations(allowed, k), key=key))
    return _minimax_dp(costs, allowed, k)


def _minimax_dp(costs: Sequence[int], allowed: Sequence[int], k: int) -> list[int]:
    """Exact minimax over cuts for large searches (no secondary tie-break)."""
    n = len(costs)
    prefix = list(itertools.accumulate(costs, initial=0))
    starts = [0, *allowed]
    # best[j][c]: (max load, cuts) covering layers [0, starts[j]) with c cuts, last cut at starts[j]
    best: dict[tuple[int, int], tuple[int, tuple[int, ...]]] = {(0, 0): (0, ())}
    for c in range(1, k + 1):
        for j in range(1, len(starts)):
            candidates = [
                (max(load, prefix[starts[j]] - prefix[starts[i]]), cuts + (starts[j],))
                for (i, cc), (load, cuts) in best.items() if cc == c - 1 and starts[i] < starts[j]
            ]
            if candidates:
                best[(j, c)] = min(candidates)
    final = [(max(load, prefix[n] - prefix[starts[j]]), cuts) for (j, c), (load, cuts) in best.items() if c == k]
    return list(min(final)[1])


def num_pieces(run: RunConfig) -> int:
    """``stages * virtual_stages``: how many pieces the model is cut into."""
    return run.pipeline.stages * run.pipeline.virtual_stages


def plan_split(model: nn.Module, task: Task, run: RunConfig) -> SplitPlan:
    """Resolve ``run.pipeline.split`` against ``task``'s split points for ``model``.

    Raises
    ------
    UnsupportedError: the task declares no split points (its ``pipeline_reason`` says why).
    ConfigError: an unknown split point, a wrong number of them, or more pieces than layers.
    """
    task.require("pipeline")
    file, cfg = run.source, run.pipeline
    children = layer_children(model)
    names = tuple(name for name, _ in children)
    index = {name: i for i, name in enumerate(names)}
    missing = [p for p in task.pipeline_split_points if p not in index or index[p] == 0]
    if missing:  # a task bug, but say it plainly rather than cut somewhere odd
        raise UnsupportedError(f"task '{task.name}' declares split point(s) {missing} that are not children "
                               f"(after the first) of its model: {list(names)}")
    allowed = sorted(index[p] for p in task.pipeline_split_points)
    costs = [_param_count(module) for _, module in children]
    pieces = num_pieces(run)
    if pieces < 1:
        raise ConfigError(file, "pipeline.stages", cfg.stages, "needs at least one stage")
    if pieces > len(allowed) + 1:
        what = f"{cfg.stages} stages x {cfg.virtual_stages} virtual stages" if cfg.virtual_stages > 1 else \
            f"{cfg.stages} stages"
        raise ConfigError(file, "pipeline.stages", cfg.stages,
                          f"{what} need {pieces} pieces but task '{task.name}' splits into at most "
                          f"{len(allowed) + 1} layers (split points: {', '.join(names[i] for i in allowed)})")
    requested = list(cfg.split)
    if requested == [BALANCED] or (not requested and len(allowed) != pieces - 1):
        cuts = balanced_cuts(costs, allowed, pieces)
    elif not requested:
        cuts = allowed
    else:
        allowed_names = [names[i] for i in allowed]
        for point in requested:
            if point not in allowed_names:
                why = "is a layer but not one of the task's split points" if point in index else "unknown split point"
                raise ConfigError(file, "pipeline.split", point,
                                  f"{why}; task '{task.name}' allows: {', '.join(allowed_names)} (or \"balanced\")")
        if len(requested) != pieces - 1:
            raise ConfigError(file, "pipeline.split", requested,
                              f"names {len(requested)} split point(s) but {pieces} pieces need {pieces - 1}")
        cuts = [index[p] for p in requested]
        if cuts != sorted(set(cuts)):
            raise ConfigError(file, "pipeline.split", requested,
                              f"split points must be distinct and in model order ({', '.join(names)})")
    bounds = (0, *cuts, len(names))
    return SplitPlan(names=names, bounds=bounds, params=tuple(_loads(costs, bounds)))


class PipelinePiece(nn.Module):
    """Consecutive children of a layer stack, run in order; children keep their names (and so
    their state-dict keys). A stage receives its inputs as separate tensors: several are the
    model's state tuple (the MAE's ``(tokens, ids_restore, target)``), one is a plain tensor."""

    def __init__(self, children: Sequence[tuple[str, nn.Module]]) -> None:
        super().__init__()
        for name, module in children:
            self.add_module(name, module)

    def forward(self, *inputs: Any) -> Any:
        state: Any = inputs[0] if len(inputs) == 1 else tuple(inputs)
        for child in self.children():
            state = child(state)
        return state


def make_pieces(model: nn.Module, plan: SplitPlan) -> list[PipelinePiece]:
    """The model's pieces, holding the model's own child modules (shared, not copied)."""
    modules = dict(layer_children(model))
    return [PipelinePiece([(name, modules[name]) for name in plan.children_of(i)]) for i in range(plan.pieces)]


def check_schedule(run: RunConfig, world_size: int | None = None) -> None:
    """Checks that need no model: microbatches vs batch size and stages, virtual stages, world size.

    Raised up front because the schedules fail late and obscurely: a batch that does not divide
    into the microbatches gives a shape mismatch (shapes are fixed by the first microbatch).
    """
    file, cfg, train = run.source, run.pipeline, run.train
    if cfg.stages < 1:
        raise ConfigError(file, "pipeline.stages", cfg.stages, "needs at least one stage")
    if cfg.dp < 1:
        raise ConfigError(file, "pipeline.dp", cfg.dp, "needs at least one pipeline replica")
    if cfg.microbatches < 1:
        raise ConfigError(file, "pipeline.microbatches", cfg.microbatches, "needs at least one microbatch")
    if train.batch_size % cfg.microbatches:
        raise ConfigError(file, "train.batch_size", train.batch_size,
                          f"not divisible by pipeline.microbatches = {cfg.microbatches} (each microbatch must "
                          f"have the same size)")
    if cfg.schedule in ("1f1b", "interleaved_1f1b") and cfg.microbatches < cfg.stages:
        raise ConfigError(file, "pipeline.microbatches", cfg.microbatches,
                          f"{cfg.schedule} needs at least as many microbatches as stages ({cfg.stages})")
    if cfg.schedule == "interleaved_1f1b":
        if cfg.virtual_stages < 2:
            raise ConfigError(file, "pipeline.virtual_stages", cfg.virtual_stages,
                              "interleaved_1f1b needs at least 2 virtual stages per rank")
        rounds = max(1, cfg.microbatches // cfg.stages)
        if cfg.microbatches % rounds:
            raise ConfigError(file, "pipeline.microbatches", cfg.microbatches,
                              f"interleaved_1f1b needs a multiple of {rounds} (microbatches // stages)")
    elif cfg.virtual_stages != 1:
        raise ConfigError(file, "pipeline.virtual_stages", cfg.virtual_stages,
                          f"only interleaved_1f1b runs several stages per rank; schedule is '{cfg.schedule}'")
    if world_size is not None and world_size != cfg.dp * cfg.stages:
        raise ConfigError(file, "pipeline.stages", cfg.stages,
                          f"pipeline.dp x pipeline.stages = {cfg.dp} x {cfg.stages} = {cfg.dp * cfg.stages} "
                          f"ranks, but WORLD_SIZE is {world_size}")

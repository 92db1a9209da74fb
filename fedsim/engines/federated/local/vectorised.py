"""Vectorised clients: K clients' local SGD at once with ``torch.func`` (``functional_call`` + ``vmap``).

Clients that share one architecture differ only in their parameters and their batches, so one
``vmap(grad(loss))`` over a stacked parameter dict ``{name: [K, ...]}`` replaces K forward/backward
passes. Each client follows exactly the batch sequence it would see sequentially; the update is
``torch.optim.SGD``'s (momentum, weight decay, dampening 0), so the result matches sequential
training up to float summation order (``tests/test_local_grid_vectorised.py``: < 1e-5).

Unequal client sizes: at a step where clients have different batch sizes,

* models without batch-coupled layers are padded to the largest batch with a per-sample mask
  (the loss is the masked mean of per-sample losses: the task's batch-mean loss on one sample at
  a time, vmapped over the batch), so every step is one vectorised call;
* models with BatchNorm (whose batch statistics padding would change) are grouped by batch size
  instead: one vectorised call per distinct size, each client keeping its own running statistics.

Clients that have run out of batches are simply left out of later steps (their parameters and
momentum stay as they are). This is an opt-in path (``federated.vectorise = true``) for fedsim's
own ClientApp and tasks with ``vectorisable = True``; arbitrary Flower apps keep their own loop.

:func:`fedsim_batch_handler` answers a batch of fedsim train messages this way for the local
grid; it declines (returns None) whatever it cannot reproduce exactly, e.g. FedProx/SCAFFOLD
corrections or optimizers other than SGD, and those messages run one by one.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedsim.config import TrainConfig
from fedsim.errors import UnsupportedError
from fedsim.tasks import Batch, Task, TaskContext, move_batch
from fedsim.train import build_schedulers

__all__ = ["train_clients", "ClientResult", "has_batch_coupling", "fedsim_batch_handler", "handler_for"]


@dataclass
class ClientResult:
    """One client's outcome: its final state dict and per-epoch training losses."""

    state: dict[str, torch.Tensor]
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    samples: int = 0


def has_batch_coupling(model: nn.Module) -> bool:
    """True if some layer mixes samples of a batch (BatchNorm): padding would change its statistics."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _epoch_lrs(train: TrainConfig, epochs: int) -> list[float]:
    """The learning rate of each local epoch, from the same torch scheduler the shared loop uses."""
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=train.lr)
    schedulers = build_schedulers({"model": dummy}, train)
    lrs = []
    for _ in range(epochs):
        lrs.append(dummy.param_groups[0]["lr"])
        for scheduler in schedulers.values():
            scheduler.step()
    return lrs


def train_clients(
    task: Task,
    model: nn.Module,
    start: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]],
    client_epochs: Sequence[Sequence[Sequence[Batch]]],
    train: TrainConfig,
    *,
    pad: bool | None = None,
) -> list[ClientResult]:
    """Train every client from ``start`` on its own batches, all clients at once.

    Parameters
    ----------
    task: the task (its ``loss`` is the batch mean; ``vectorisable`` must be True).
    model: a module of the clients' architecture (its tensors are not modified).
    start: the initial state dict, shared by all clients or one per client.
    client_epochs: ``client_epochs[k][e]`` = the batches client k sees in local epoch e, in order.
    train: SGD settings (``lr``, ``momentum``, ``weight_decay``, ``schedule``).
    pad: pad unequal batches with masks (default: unless the model has BatchNorm).

    Returns
    -------
    One :class:`ClientResult` per client, in order.
    """
    task.require("vectorise")
    if train.optimizer != "sgd":
        raise UnsupportedError(f"vectorised clients implement SGD only (train.optimizer = '{train.optimizer}')")
    num_clients = len(client_epochs)
    starts = [start] * num_clients if isinstance(start, dict) else list(start)
    coupled = has_batch_coupling(model)
    pad = (not coupled) if pad is None else pad
    if pad and coupled:
        raise UnsupportedError("padding would change BatchNorm statistics; use pad=False (grouping by size)")
    model.train()
    param_names = [n for n, _ in model.named_parameters()]
    buffer_names = [n for n, _ in model.named_buffers()]
    dtype = next(model.parameters()).dtype
    params = {n: torch.stack([s[n].detach().to(dtype) for s in starts]) for n in param_names}
    buffers = {n: torch.stack([s[n].detach().clone() for s in starts]) for n in buffer_names}
    momentum_bufs = {n: torch.zeros_like(p) for n, p in params.items()} if train.momentum else {}
    # Flatten each client's epochs into one step sequence, remembering the epoch of every step.
    sequences = [[(e, b) for e, batches in enumerate(epochs) for b in batches] for epochs in client_epochs]
    num_epochs = max((len(c) for c in client_epochs), default=0)
    lrs = _epoch_lrs(train, num_epochs)
    loss_sums = [[0.0] * len(c) for c in client_epochs]
    seen = [[0] * len(c) for c in client_epochs]

    # The task's hooks, called apart so torch.func can swap the model's tensors in between. A
    # vectorisable task's model_inputs draw nothing per epoch (vmap would need one context per client).
    context = TaskContext(device=next(model.parameters()).device)

    def batch_loss(p: dict, b: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        output = functional_call(model, (p, b), task.model_inputs(model, (x, y), context))
        return task.output_loss(output, y)

    def masked_loss(p: dict, b: dict, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        # Per-sample loss = the task's batch-mean loss on a batch of one (no batch coupling here).
        per_sample = vmap(lambda xi, yi: batch_loss(p, b, xi.unsqueeze(0), yi.unsqueeze(0)))(x, y)
        return (per_sample * m).sum() / m.sum()

    grad_masked = vmap(grad_and_value(masked_loss), in_dims=(0, 0, 0, 0, 0))
    grad_plain = vmap(grad_and_value(batch_loss), in_dims=(0, 0, 0, 0))
    template = model  # move_batch reads device/dtype from it

    longest = max((len(s) for s in sequences), default=0)
    for step in range(longest):
        active = [k for k in range(num_clients) if step < len(sequences[k])]
        sizes_now = {len(sequences[k][step][1][0]) for k in active}
        if pad or len(sizes_now) == 1:
            groups = [active]
        else:
            by_size: dict[int, list[int]] = {}
            for k in active:
                by_size.setdefault(len(sequences[k][step][1][0]), []).append(k)
            groups = list(by_size.values())
        for group in groups:
            batches = [move_batch(sequences[k][step][1], template) for k in group]
            sizes = [len(b[0]) for b in batches]
            everyone = len(group) == num_clients
            index = torch.tensor(group)
            p_group = params if everyone else {n: v[index] for n, v in params.items()}
            b_group = buffers if everyone else {n: v[index].clone() for n, v in buffers.items()}
            if pad and len(set(sizes)) > 1:  # equal sizes need no mask (and no per-sample loop)
                width = max(sizes)
                x = torch.stack([_pad(b[0], width) for b in batches])
                y = torch.stack([_pad(b[1], width) for b in batches])
                mask = torch.stack([(torch.arange(width) < s).to(dtype) for s in sizes])
                grads, losses = grad_masked(p_group, b_group, x, y, mask)
            else:
                x = torch.stack([b[0] for b in batches])
                y = torch.stack([b[1] for b in batches])
                grads, losses = grad_plain(p_group, b_group, x, y)
            lr = torch.tensor([lrs[sequences[k][step][0]] for k in group], dtype=dtype)
            for name in param_names:
                update = grads[name]
                current = p_group[name]
                if train.weight_decay:
                    update = update + train.weight_decay * current
                if train.momentum:
                    buf = momentum_bufs[name][index] if not everyone else momentum_bufs[name]
                    buf = train.momentum * buf + update
                    if everyone:
                        momentum_bufs[name] = buf
                    else:
                        momentum_bufs[name][index] = buf
                    update = buf
                new = current - lr.view(-1, *([1] * (update.dim() - 1))) * update
                if everyone:
                    params[name] = new
                else:
                    params[name][index] = new
            if not everyone:
                for name in buffer_names:
                    buffers[name][index] = b_group[name]
            for position, k in enumerate(group):
                epoch = sequences[k][step][0]
                loss_sums[k][epoch] += float(losses[position]) * sizes[position]
                seen[k][epoch] += sizes[position]

    results = []
    for k in range(num_clients):
        state = {n: params[n][k].detach().clone() for n in param_names}
        state.update({n: buffers[n][k].clone() for n in buffer_names})
        ordered = {name: state[name] for name in model.state_dict()}
        results.append(ClientResult(ordered, [s / max(c, 1) for s, c in zip(loss_sums[k], seen[k], strict=True)],
                                    steps=len(sequences[k]), samples=sum(seen[k])))
    return results


def _pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    if len(tensor) == width:
        return tensor
    filler = tensor[:1].expand(width - len(tensor), *tensor.shape[1:])  # any valid sample; masked out
    return torch.cat([tensor, filler])


# ---- fedsim's ClientApp, vectorised -----------------------------------------------------------------
def fedsim_batch_handler(messages: list[Any], contexts: list[Any]) -> list[Any] | None:
    """Answer a batch of fedsim ``train`` messages at once, or return None to let them run one by one.

    Reproduces :func:`fedsim.engines.federated.flower_app.train` for plain local SGD: same partition, same
    batch order (``make_loader`` keyed by the client seed), same reply records and metrics.
    """
    from flwr.app import Message, MetricRecord, RecordDict

    from fedsim.engines.federated import flower_app as fa
    from fedsim.engines.federated.rounds import (
        CLIENT_STATE_KEY,
        FAIL_KEY,
        LOCAL_EPOCHS_KEY,
        LOCAL_STEPS_KEY,
        RUN_KEY,
    )
    from fedsim.train import derive_seed, make_loader
    from fedsim.wire.array_codec import record_to_tensors, tensors_to_record
    from fedsim.wire.flower_private import KEY_CLIPPING_NORM

    if any(m.metadata.message_type != "train" or "config" not in m.content for m in messages):
        return None  # SecAgg+ stages carry their own records: the ClientApp (and its mods) handles them
    configs = [m.content["config"] for m in messages]
    if any(KEY_CLIPPING_NORM in c for c in configs):
        return None  # client-side DP clipping is a ClientApp mod: batched clients would skip it
    if any(c.get(FAIL_KEY, False) for c in configs) or any(CLIENT_STATE_KEY in m.content for m in messages):
        return None
    if len({str(c[RUN_KEY]) for c in configs}) != 1:
        return None
    if any(set(m.content.keys()) - {"arrays", "config"} for m in messages):
        return None  # SCAFFOLD controls or other extras: the sequential client knows what to do
    if any(key in c for c in configs for key in ("proximal-mu", "proximal_mu")):
        return None  # FedProx's proximal term
    if any(key in c for c in configs for key in (LOCAL_EPOCHS_KEY, LOCAL_STEPS_KEY)):
        return None  # stragglers doing partial work: their own amount of local training
    run = fa.run_from_json(str(configs[0][RUN_KEY]))
    data = fa.client_data(run)
    task, fed = data.task, run.federated
    if not task.vectorisable or run.train.optimizer != "sgd" or run.train.max_steps:
        return None
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in data.model.modules()):
        return None  # dropout masks are drawn per client from the seeded global generator
    fa._threads(run)
    local_cfg = dataclasses.replace(run.train, epochs=1 if fed.local_steps > 0 else fed.local_epochs,
                                    progress=False, checkpoint=False)
    client_epochs, counts = [], []
    starts = []
    for message, context in zip(messages, contexts, strict=True):
        pid = int(context.node_config["partition-id"])
        server_round = int(message.content["config"].get("server-round", 0))
        seed = derive_seed(run.train.seed, "client", server_round, pid)
        shard = data.shard(pid)
        indices = shard.train_idx.tolist()
        counts.append(len(indices))
        starts.append(record_to_tensors(message.content["arrays"]))  # views; stacked (copied) below
        if fed.local_steps > 0:
            endless = itertools.chain.from_iterable(
                make_loader(shard.train, local_cfg.batch_size, seed, e, local_cfg.shuffle, indices=indices)
                for e in itertools.count())
            client_epochs.append([list(itertools.islice(endless, fed.local_steps))])
        else:
            client_epochs.append([list(make_loader(shard.train, local_cfg.batch_size, seed, e, local_cfg.shuffle,
                                                   indices=indices)) for e in range(local_cfg.epochs)])
    results = train_clients(task, data.model, starts, client_epochs, local_cfg)
    replies = []
    for message, result, count in zip(messages, results, counts, strict=True):
        metrics: dict[str, Any] = {"num-examples": count, "samples": result.samples, "local-steps": result.steps}
        if result.epoch_losses:
            metrics["loss"] = float(result.epoch_losses[-1])
        content = RecordDict({"arrays": tensors_to_record(result.state), "metrics": MetricRecord(metrics)})
        replies.append(Message(content, reply_to=message))
    return replies


def handler_for(client_app: Any) -> Any:
    """The batch handler of a ClientApp fedsim knows how to vectorise (its own), else None."""
    import sys

    flower_app = sys.modules.get("fedsim.engines.federated.flower_app")
    if flower_app is not None and client_app is getattr(flower_app, "clientapp", None):
        return fedsim_batch_handler
    return None

"""BatchNorm whose training statistics span every rank's batch, for gloo (CPU) process groups.

torch's ``SyncBatchNorm`` only runs on CUDA (torch 2.13 raises on CPU), so CPU data-parallel
runs with ``ddp.sync_bn = true`` use :class:`AllReduceBatchNorm`: per channel, the batch sum and
sample count are all-reduced to the global mean, then the sum of squared deviations to the global
(biased) variance, exactly as central BatchNorm computes them on the concatenated batch. The
all-reduces are ``torch.distributed.nn.functional.all_reduce`` (autograd-aware: the backward
all-reduces the gradients of the statistics), so the gradients equal central BatchNorm's on the
global batch once DDP averages them.

Running statistics are updated like ``nn.BatchNorm*d``: exponential average with ``momentum``
(or the cumulative average when ``momentum`` is None), with the unbiased global variance.
Evaluation mode and one-process runs use plain ``F.batch_norm``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["AllReduceBatchNorm", "convert_sync_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; the gradient of a sum that every rank uses is the sum of their gradients.

    (``torch.distributed.nn.functional.all_reduce`` does the same but is deprecated in torch 2.13.)
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def _all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    return _AllReduceSum.apply(tensor, group)


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of a process group (any backend; meant for gloo).

    Accepts inputs ``[N, C, *]`` (what BatchNorm1d/2d/3d accept). The state-dict keys are those
    of ``nn.BatchNorm*d``, so checkpoints load into the plain model.

    Parameters
    ----------
    process_group: group whose ranks share statistics (default: the whole world).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input [N, C, ...] (got {input.dim()}D input)")

    def _distributed(self) -> bool:
        if not (dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.process_group) > 1

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or self.running_mean is None
        if not use_batch_stats or not self._distributed():
            return super().forward(input)  # identical to nn.BatchNorm*d
        factor = 0.0
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        # x: [N, C, *]; one all-reduce for (per-channel sums, sample count), one for squared deviations.
        local_count = torch.full((1,), input.numel() // input.shape[1], dtype=input.dtype, device=input.device)
        totals = _all_reduce_sum(torch.cat([input.sum(dims), local_count]), group)
        sums, count = totals[:-1], totals[-1].detach()
        if float(count) <= 1:
            raise ValueError(f"expected more than 1 value per channel over the global batch (got {int(count)})")
        mean = sums / count  # [C]
        centred = input - mean.view(shape)
        var = _all_reduce_sum((centred * centred).sum(dims), group) / count  # [C], biased
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                unbiased = var.detach() * (count / (count - 1))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return out


def convert_sync_batchnorm(module: nn.Module, backend: str, process_group: Any = None) -> nn.Module:
    """Replace every BatchNorm in ``module`` by a global-batch one, keeping names, weights and buffers.

    ``nccl`` gets torch's ``SyncBatchNorm`` (CUDA kernels); any other backend gets
    :class:`AllReduceBatchNorm`.
    """
    if backend == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _convert(module, process_group)


def _convert(module: nn.Module, process_group: Any) -> nn.Module:
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        converted = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                       module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
    for name, child in module.named_children():
        converted.add_module(name, _convert(child, process_group))
    return converted

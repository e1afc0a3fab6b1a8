"""Data-parallel training under `torchrun`: one process per GPU (or CPU process, gloo), one node or many.

A run with N processes trains what a 1-process run with the same global batch trains:
- every rank builds the same global batch (same seeded order and augmentation), keeps its
  contiguous 1/N of it, and all ranks sample the same subnet (the samplers are seeded by
  (seed, epoch, step), never by rank);
- BatchNorm in training steps normalises with the statistics of the whole global batch
  (`batch_norm`, `GlobalBatchNorm2d`, inside `global_batch`): per-rank statistics would make the
  result depend on N;
- random draws that are per image (dropout, superclass dropout) are drawn for the global batch
  and sliced, so each image gets the draw it would get in one process;
- gradients are averaged over ranks after each step's backward passes (FairNAS accumulates
  several), then every rank takes the same optimizer step.
Only rank 0 writes files (checkpoints, models, metrics: tailor.utils' atomic writers) and logs;
every rank reads the checkpoint to resume. Exact on CPU (gloo) up to float summation order;
on GPUs as deterministic as the kernels.

We average gradients by hand instead of wrapping the model in DistributedDataParallel: a supernet
step runs several subnets, each touching a different subset of the weights, which DDP's one
all-reduce per backward and its unused-parameter detection handle poorly.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    # Started by torchrun, even as one process: then BatchNorm and gradients take the collective
    # path, so `torchrun --nproc-per-node=1` computes exactly what N processes compute.
    group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's rows of a global batch drawn for `n` local rows per rank."""
        return slice(self.rank * n, (self.rank + 1) * n)


_WORLD = World()
_GLOBAL = False  # inside global_batch: training steps, where each rank holds its part of one batch


def world() -> World:
    return _WORLD


def env_world() -> World:
    """The world torchrun describes in the environment (a plain run: one process, no group)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)), group="TORCHELASTIC_RUN_ID" in os.environ)


def init(device_type: str) -> World:
    """Join torchrun's process group (NCCL for CUDA, gloo for the CPU). A no-op outside torchrun."""
    global _WORLD
    w = env_world()
    if w.group and not torch.distributed.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(w.local_rank)  # "cuda" then means this rank's GPU everywhere
        torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo")
    _WORLD = w
    return w


def shutdown(wait: bool = True) -> None:
    global _WORLD
    if torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()  # no rank leaves while rank 0 may still be writing the outputs
        torch.distributed.destroy_process_group()
    _WORLD = World()


def shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of a global batch."""
    w = _WORLD
    if not w.group:
        return t
    n = t.shape[0] // w.size
    return t[w.rows(n)]


def check_batch(batch_size: int, what: str) -> None:
    w = _WORLD
    if batch_size % w.size:
        raise ValueError(f"{what} batch size {batch_size} is not divisible by the {w.size} torchrun processes: "
                         "every rank must get the same number of images")


def average_gradients(model: nn.Module) -> None:
    """Mean of every gradient over ranks, in one flat all-reduce. Which weights have a gradient is the
    same on every rank (same subnets), so the flat buffers line up."""
    w = _WORLD
    if not w.group:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= w.size
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    if not _WORLD.group or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return {k: float(v) / _WORLD.size for k, v in zip(keys, t.tolist())}


def batch_norm(x, running_mean, running_var, weight, bias, training: bool, momentum: float | None, eps: float):
    """F.batch_norm; in training under `global_batch`, over the whole global batch of all ranks."""
    if not training or not _GLOBAL:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    from torch.distributed.nn.functional import all_reduce  # differentiable: gradients reach every rank

    dims = [0, *range(2, x.dim())]
    c = x.shape[1]
    shape = [1, c] + [1] * (x.dim() - 2)
    xf = x.float()
    # Two passes (mean, then squared deviations), as F.batch_norm: one pass of sums of squares
    # loses precision where a channel's mean is large against its spread.
    count = torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device)
    total = all_reduce(torch.cat([xf.sum(dims), count]))
    count = total[-1]
    mean = total[:c] / count
    centred = xf - mean.view(shape)
    var = all_reduce((centred * centred).sum(dims)) / count
    if running_mean is not None and momentum is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.detach() * (count / (count - 1)), alpha=momentum)
    y = centred * torch.rsqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape) + bias.view(shape)
    return y.to(x.dtype)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics span all ranks (what SyncBatchNorm does on GPUs only)."""

    def forward(self, x):
        if not self.training or not _GLOBAL:
            return super().forward(x)
        momentum = self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # a cumulative average, as nn.BatchNorm2d does
                momentum = 1.0 / float(self.num_batches_tracked)
        return batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, momentum, self.eps)


class GlobalDropout(nn.Dropout):
    """nn.Dropout whose mask is drawn for the global batch and sliced: each image gets the mask it
    would get in one process (F.dropout draws bernoulli(1 - p) in the same element order on the CPU)."""

    def forward(self, x):
        if not self.training or self.p == 0 or not _GLOBAL:
            return super().forward(x)
        noise = torch.empty((x.shape[0] * _WORLD.size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        noise = noise.bernoulli_(1 - self.p)[_WORLD.rows(x.shape[0])]
        return x * noise.div_(1 - self.p)


@contextlib.contextmanager
def global_batch(model: nn.Module):
    """The model's BatchNorm2d and Dropout as their global-batch versions for the block (parameters,
    buffers and state_dict keys unchanged), then as before: BN recalibration after training runs
    every rank on the same images, where per-rank statistics are the right ones. A no-op outside
    torchrun."""
    global _GLOBAL
    swapped, before = [], _GLOBAL
    _GLOBAL = _WORLD.group
    if _WORLD.group:
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                swapped.append((m, nn.BatchNorm2d))
                m.__class__ = GlobalBatchNorm2d
            elif type(m) is nn.Dropout:
                swapped.append((m, nn.Dropout))
                m.__class__ = GlobalDropout
    try:
        yield model
    finally:
        _GLOBAL = before
        for m, cls in swapped:
            m.__class__ = cls

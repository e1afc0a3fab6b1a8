"""One training loop (teacher, supernet, retraining all use `fit`), its losses, and evaluation."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from tailor import distributed
from tailor.config import OptimConfig, RuntimeConfig
from tailor.data import Batches, Meta
from tailor.utils import CheckpointError, atomic_torch_save, load_checkpoint, log


class DeviceError(ValueError):
    """runtime.device asks for hardware this process cannot use."""


def _nvidia_device_nodes() -> list[str]:
    # The driver's device nodes exist whenever a GPU is mounted into the container, even when the
    # driver is too old for this torch's CUDA runtime (then torch.cuda.is_available() is False).
    return sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*"))


def _why_no_cuda() -> str:
    nodes = _nvidia_device_nodes()
    if not nodes:
        return "no NVIDIA device is visible to this process"
    return (f"NVIDIA device nodes {', '.join(nodes)} exist, so the driver is likely older than torch "
            f"{torch.__version__} (CUDA runtime {torch.version.cuda}) needs (nvidia-smi shows its version; "
            "docs/kfp.md lists the minimum)")


def resolve_device(rt: RuntimeConfig) -> torch.device:
    """cuda: CUDA or a DeviceError naming why not. auto: CUDA when usable, else the CPU, with a
    warning when a GPU is mounted but unusable (a driver too old would otherwise go unnoticed)."""
    if rt.device == "cuda" or (rt.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceError(f"runtime.device is 'cuda' but torch {torch.__version__} (CUDA runtime "
                              f"{torch.version.cuda}) cannot use CUDA: {_why_no_cuda()}")
        return torch.device("cuda")
    if rt.device == "auto" and _nvidia_device_nodes():
        log(f"warning: training on the CPU: {_why_no_cuda()}; set runtime.device: cuda to make this an error")
    if rt.threads:
        torch.set_num_threads(rt.threads)
    return torch.device("cpu")


def autocast(device: torch.device, rt: RuntimeConfig):
    # bf16 only on CUDA: CPU results must stay bit-reproducible and comparable.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and rt.bf16)


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # No weight decay on BN and biases (1-D tensors), as in the torchvision recipes, nor on the
    # supernet's stabilizers (els.*): decay would pull them toward zero, not toward their identity init.
    def decays(name: str, p: torch.Tensor) -> bool:
        return p.ndim > 1 and not name.startswith("els.")

    decay = [p for n, p in model.named_parameters() if p.requires_grad and decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and not decays(n, p)]
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def warmup_cosine(lr: float, epochs: float, warmup: float) -> Callable[[float], float]:
    """Learning rate at a fractional epoch: linear warm-up, then cosine decay to zero."""
    def at(t: float) -> float:
        if t < warmup:
            return lr * (t + 1e-3) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, (t - warmup) / max(1e-9, epochs - warmup))))
    return at


# ---------------------------------------------------------------- losses
def superclass_keep_mask(sc: torch.Tensor, class_sc: torch.Tensor, q: float, gen: torch.Generator | None) -> torch.Tensor:
    """EAS superclass dropout: (batch, classes) bool, True where a logit takes part in the loss.

    For each sample, every *other* superclass's whole logit group is dropped with probability q;
    the sample's own superclass is always kept.
    """
    n_sc = int(class_sc.max()) + 1
    w = distributed.world()  # drawn for the global batch, so each image gets its 1-process draw
    draw = torch.rand(sc.shape[0] * w.size, n_sc, generator=gen)[w.rows(sc.shape[0])]
    keep_sc = draw.to(sc.device) >= q  # (B, S)
    keep_sc[torch.arange(sc.shape[0], device=sc.device), sc] = True
    return keep_sc[:, class_sc]  # (B, S) -> (B, C)


def masked_cross_entropy(logits, y, keep, label_smoothing: float = 0.0):
    """Cross-entropy over the kept logits only; label smoothing spreads over kept classes."""
    logp = torch.log_softmax(logits.float().masked_fill(~keep, float("-inf")), dim=1)
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    if label_smoothing:
        smooth = -torch.where(keep, logp, torch.zeros_like(logp)).sum(1) / keep.sum(1)
        nll = (1 - label_smoothing) * nll + label_smoothing * smooth
    return nll.mean()


def masked_kd(student, teacher, keep, temperature: float):
    """KL(teacher || student) at a temperature, both softmaxes restricted to the kept logits."""
    t = temperature
    logp_s = torch.log_softmax(student.float().masked_fill(~keep, float("-inf")) / t, dim=1)
    logp_t = torch.log_softmax(teacher.float().masked_fill(~keep, float("-inf")) / t, dim=1)
    kl = torch.where(keep, logp_t.exp() * (logp_t - logp_s), torch.zeros_like(logp_s)).sum(1)
    return kl.mean() * t * t


# ---------------------------------------------------------------- the loop
StepFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, int, int], dict]


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_epoch: int = 0


def fit(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer, epochs: int,
        lr_at: Callable[[float], float], step: StepFn, checkpoint: Path, seed: int, fingerprint: str,
        log_every: int = 50, after_epoch: Callable[[int], dict] | None = None,
        before_epoch: Callable[[int], None] | None = None) -> FitResult:
    """Train `model` for `epochs`, checkpointing atomically after every epoch.

    `step(model, x, y, superclass, epoch, step_index)` computes the loss(es) and calls backward;
    the loop owns the learning rate, the optimizer step and checkpoints. A checkpoint whose
    fingerprint (params and inputs) differs from this run's is ignored rather than resumed.
    Randomness is re-seeded from (seed, epoch) at every epoch, so a resumed run equals an
    uninterrupted one. `before_epoch(epoch)` runs once before each epoch this call trains (after a
    resume too), e.g. to grow the model at a curriculum stage boundary.
    """
    result = FitResult()
    start = 0
    state = None
    if checkpoint.exists():
        try:
            state = load_checkpoint(checkpoint, "resume checkpoint")
        except CheckpointError as e:
            # A kill mid-write cannot leave this (atomic rename), a full disk or a copy can: keep
            # it for inspection, out of the way, and start over rather than never run again.
            aside = checkpoint.with_name(checkpoint.name + f".corrupt-{int(time.time())}")
            os.replace(checkpoint, aside)
            log(f"{e}; set aside as {aside}, training from the start")
    if state is not None:
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start, result.history, result.seconds = state["epoch"], state["history"], state["seconds"]
            result.resumed_from_epoch = start
            log(f"resuming from {checkpoint} at epoch {start}/{epochs}")
        else:
            log(f"ignoring {checkpoint}: it belongs to another configuration")
    n = batches.num_batches(drop_last=True)
    distributed.check_batch(batches.batch_size, "training")
    with distributed.global_batch(model):
        for epoch in range(start, epochs):
            if before_epoch:
                before_epoch(epoch)
            t0 = time.perf_counter()
            torch.manual_seed(seed * 100_003 + epoch)  # dropout and anything else drawing from torch's RNG
            model.train()
            totals: dict[str, float] = {}
            for i, (x, y, sc) in enumerate(batches.epoch(seed * 100_003 + epoch, augment=True)):
                lr = lr_at(epoch + i / n)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                losses = step(model, distributed.shard(x), distributed.shard(y), distributed.shard(sc), epoch, i)
                distributed.average_gradients(model)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for k, v in losses.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                if log_every and (i + 1) % log_every == 0:
                    log(f"epoch {epoch + 1}/{epochs} step {i + 1}/{n} " + " ".join(f"{k}={v:.4f}" for k, v in losses.items()))
            totals = distributed.mean_over_ranks(totals)
            dt = time.perf_counter() - t0
            result.seconds += dt
            row = {"epoch": epoch + 1, "lr": lr_at(epoch + 1 - 1e-9), "seconds": round(dt, 2),
                   "images_per_s": round(n * batches.batch_size / dt, 1), **{k: v / max(1, n) for k, v in totals.items()}}
            if after_epoch:
                row.update(after_epoch(epoch))
            result.history.append(row)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                               "history": result.history, "seconds": result.seconds, "fingerprint": fingerprint},
                              checkpoint)
            if os.environ.get("TAILOR_STOP_AFTER_EPOCH") == str(epoch + 1):
                # Lets tests kill a run at a known point and check that it resumes exactly.
                raise KeyboardInterrupt(f"TAILOR_STOP_AFTER_EPOCH={epoch + 1}")
    return result


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: Callable[[torch.Tensor], torch.Tensor], batches: Batches, meta: Meta,
             classes: list[int] | None = None, per_image: bool = False) -> dict:
    """Top-1 metrics of `model` on a split.

    With `classes=None` the model has one logit per dataset class: report 50-way (all-class)
    top-1 and superclass-restricted top-1 (argmax over the sample's own superclass's classes,
    since the superclass is known at deployment), per superclass and their mean.
    With `classes` (a specialised model for one superclass, logits for those classes only),
    only samples of those classes are scored.
    `per_image` adds "correct": a '0'/'1' string, one character per scored image in split order
    (superclass-restricted), so that two models can be compared image by image (paired bootstrap).
    """
    class_sc = batches.sc_of_class
    n_sc = len(meta.superclasses)
    correct_sc = torch.zeros(n_sc, device=batches.device)
    count_sc = torch.zeros(n_sc, device=batches.device)
    correct_all = 0.0
    seen = 0
    t0 = time.perf_counter()
    local = None
    hits: list[torch.Tensor] = []
    if classes is not None:
        local = torch.full((len(meta.classes),), -1, dtype=torch.long, device=batches.device)
        local[torch.tensor(classes, device=batches.device)] = torch.arange(len(classes), device=batches.device)
    for x, y, sc in batches.epoch(None, augment=False, drop_last=False):
        if local is not None:
            sel = local[y] >= 0
            x, y, sc = x[sel], local[y[sel]], sc[sel]
            if len(y) == 0:
                continue
            pred_sc = model(x).float().argmax(1)
        else:
            logits = model(x).float()
            correct_all += float((logits.argmax(1) == y).sum())
            own = class_sc[None, :] == sc[:, None]
            pred_sc = logits.masked_fill(~own, float("-inf")).argmax(1)
        seen += len(y)
        if per_image:
            hits.append((pred_sc == y).cpu())
        correct_sc.index_add_(0, sc, (pred_sc == y).float())
        count_sc.index_add_(0, sc, torch.ones_like(sc, dtype=torch.float))
    dt = time.perf_counter() - t0
    per_sc = {meta.superclasses[i]: round(float(correct_sc[i] / count_sc[i]), 5)
              for i in range(n_sc) if count_sc[i] > 0}
    out = {"sc_top1": per_sc, "sc_top1_mean": round(sum(per_sc.values()) / max(1, len(per_sc)), 5),
           "images": seen, "seconds": round(dt, 3), "images_per_s": round(seen / max(dt, 1e-9), 1)}
    if classes is None:
        out["top1"] = round(correct_all / max(1, seen), 5)
    if per_image:
        out["correct"] = "".join("1" if h else "0" for h in torch.cat(hits).tolist()) if hits else ""
    return out


def split_by_superclass(correct: str, y: np.ndarray, meta) -> dict[str, str]:
    """Per-image hits over the whole split -> per superclass, in split order (as evaluate(classes=) orders them)."""
    sc_of = np.asarray(meta.class_superclass)[y]
    return {name: "".join(c for c, s in zip(correct, sc_of) if s == i) for i, name in enumerate(meta.superclasses)}

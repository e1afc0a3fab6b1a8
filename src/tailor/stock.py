"""Stock anchors: what a user would pick instead of a tailored network.

torchvision's own MobileNetV3 builders (not re-implementations), trained by the same `fit` loop on
the same prepared data and augmentation as the teacher and supernet, and scored the same way
(superclass-restricted top-1 on test, MAdds by the same hook counter, onnxruntime latency by the
export stage's timer). Two kinds:

- generalists (stock.models): one network on every class, restricted to the superclass at test;
- specialists (stock.specialist): one network per superclass, trained on that superclass alone,
  as the EAS paper reports them.

Each network checkpoints every epoch, and its finished result is kept in the work dir, so a
killed stage resumes where it stopped. Per-image hits on test go into the metrics, so the report
can put a paired bootstrap CI on tailored-minus-stock.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from tailor import data as datamod
from tailor.config import Params, StockModel
from tailor.data import Batches
from tailor.nets import count_madds
from tailor.train import (autocast, evaluate, fit, make_optimizer, masked_cross_entropy, split_by_superclass,
                          warmup_cosine)
from tailor.utils import check_replaceable, load_checkpoint
from tailor.utils import atomic_torch_save, atomic_write_json, code_version, file_hash, fingerprint, log

BUILDERS = {"mobilenet_v3_small": torchvision.models.mobilenet_v3_small,
            "mobilenet_v3_large": torchvision.models.mobilenet_v3_large}


def build(m: StockModel, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision network (its own default dropout and init)."""
    return BUILDERS[m.arch](weights=None, num_classes=num_classes, width_mult=m.width)


def name_of(m: StockModel) -> str:
    return f"{m.arch}_w{m.width:g}"


def _ort_latency_ms(net: nn.Module, p: Params, meta, images: np.ndarray) -> dict:
    """onnxruntime CPU latency of `net` exported under the serving convention, timed as `tailor export` times."""
    from tailor.export import export_onnx
    from tailor.export.onnx_export import ort_session
    from tailor.export.stage import _ort_latency

    with tempfile.TemporaryDirectory(prefix="tailor-stock-") as tmp:
        path = export_onnx(net, Path(tmp) / "model.onnx", meta.image_size, meta.mean, meta.std, p.export.opset)
        lat = _ort_latency(ort_session(path, p.export.intra_op_threads), images, p.export)
    return {k: round(v["ms"], 4) for k, v in lat.items()}


def _train_one(p: Params, ctx, name: str, m: StockModel, classes: list[int] | None, epochs: int,
               work_dir: Path, x_test: np.ndarray) -> dict:
    """Train one stock network (on every class, or on `classes` only) and score it; cached in work_dir/name."""
    cfg = p.stock
    done = work_dir / name / "result.json"
    # Everything the result depends on, code included: the work dir is not a DVC output, so a
    # result kept there must not outlive a change DVC re-runs the stage for.
    fp = fingerprint("stock", code_version(), p.seed, name, classes, epochs, p.augment.model_dump(),
                     p.runtime.model_dump(), cfg.optim.model_dump(),
                     {k: getattr(p.export, k) for k in ("opset", "intra_op_threads", "latency_batch_sizes",
                                                        "latency_warmup", "latency_repeats")},
                     file_hash(Path(ctx.data_dir) / "meta.json"))
    if done.is_file() and (work_dir / name / "model.pt").is_file():
        res = json.loads(done.read_text())
        if res.get("fingerprint") == fp:
            log(f"train-stock {name}: done earlier ({done})")
            return res
    torch.manual_seed(p.seed)
    n_out = len(classes) if classes is not None else ctx.num_classes
    net = ctx.prepare_model(build(m, n_out))
    x, y = datamod.load_split(ctx.data_dir, "train")
    if classes is not None:
        sel = np.isin(y, classes)
        x, y = x[sel], y[sel]
    batches = Batches(x, y, ctx.meta, ctx.device, cfg.optim.batch_size, pad_crop=p.augment.pad_crop,
                      flip=p.augment.flip, channels_last=p.runtime.channels_last)
    local = torch.full((ctx.num_classes,), -1, dtype=torch.long, device=ctx.device)
    if classes is not None:
        local[torch.tensor(classes, device=ctx.device)] = torch.arange(len(classes), device=ctx.device)

    def step(model, xb, yb, scb, epoch, i):
        with autocast(ctx.device, p.runtime):
            logits = model(xb)
        target = local[yb] if classes is not None else yb
        loss = masked_cross_entropy(logits, target, torch.ones_like(logits, dtype=torch.bool),
                                    cfg.optim.label_smoothing)
        loss.backward()
        return {"loss": loss.item()}

    t = fit(net, batches, make_optimizer(net, cfg.optim), epochs,
            warmup_cosine(cfg.optim.lr, epochs, cfg.optim.warmup_epochs), step, work_dir / name / "checkpoint.pt",
            p.seed, fp, p.runtime.log_every)
    net.eval()
    with autocast(ctx.device, p.runtime):
        val = evaluate(net, ctx.batches("val"), ctx.meta, classes=classes)
        test = evaluate(net, ctx.batches("test"), ctx.meta, classes=classes, per_image=True)
    res = {"name": name, "arch": m.arch, "width": m.width, "epochs": epochs,
           "classes": classes, "train_images": int(len(y)),
           "madds": count_madds(build(m, n_out), ctx.meta.image_size),
           "params": sum(q.numel() for q in net.parameters()),
           "val_sc_top1_mean": val["sc_top1_mean"], "test_sc_top1_mean": test["sc_top1_mean"],
           "test_sc_top1": test["sc_top1"], "train_seconds": round(t.seconds, 1), "history": t.history,
           "fingerprint": fp}
    if classes is None:
        _, y_test = datamod.load_split(ctx.data_dir, "test")
        res["test_top1"] = test["top1"]
        res["test_correct"] = split_by_superclass(test["correct"], y_test, ctx.meta)
        # Deployed for one superclass, the classifier keeps that superclass's rows only (as a tailored net does).
        res["madds_by_superclass"] = {
            sc: count_madds(build(m, len(ctx.meta.classes_of(i))), ctx.meta.image_size)
            for i, sc in enumerate(ctx.meta.superclasses)}
        res["ort_cpu_latency_ms"] = _ort_latency_ms(net, p, ctx.meta, x_test)
    else:
        res["test_correct"] = {ctx.meta.superclasses[ctx.meta.class_superclass[classes[0]]]: test["correct"]}
    atomic_torch_save({"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "result": res},
                      work_dir / name / "model.pt")
    atomic_write_json(done, res)
    log(f"train-stock {name}: {res['madds'] / 1e6:.2f}M MAdds, test sc-top-1 {res['test_sc_top1_mean']}")
    return res


def train_stock(p: Params, data_dir: Path, out_dir: Path, metrics_path: Path, work_dir: Path,
                force: bool = False) -> dict:
    """Every stock generalist of stock.models, and a specialist per superclass (stock.specialist)."""
    check_replaceable(Path(out_dir), force)
    from tailor.context import Context, provenance
    from tailor.utils import atomic_dir

    ctx = Context(p, data_dir)
    cfg = p.stock
    t0 = time.perf_counter()
    x_test, _ = datamod.load_split(data_dir, "test")
    work_dir = Path(work_dir)
    models = {}
    for m in cfg.models:
        models[name_of(m)] = _train_one(p, ctx, name_of(m), m, None, p.stock_epochs(), work_dir, x_test)
    specialists = {}
    if cfg.specialist is not None:
        for i, sc in enumerate(ctx.meta.superclasses):
            name = f"specialist_{name_of(cfg.specialist)}_{sc}"
            specialists[sc] = _train_one(p, ctx, name, cfg.specialist, ctx.meta.classes_of(i),
                                         p.stock_epochs(specialist=True), work_dir, x_test)
    with atomic_dir(Path(out_dir), force) as d:
        for name in [*models, *(s["name"] for s in specialists.values())]:
            ck = load_checkpoint(work_dir / name / "model.pt", "stock model")
            atomic_torch_save({**ck, **provenance(p, "train-stock")}, d / f"{name}.pt")
    metrics = {"epochs": p.stock_epochs(), "specialist_epochs": p.stock_epochs(specialist=True),
               "spine_epochs": p.spine_epochs, "device": str(ctx.device),
               "models": {k: {kk: vv for kk, vv in v.items() if kk != "fingerprint"} for k, v in models.items()},
               "specialists": {k: {kk: vv for kk, vv in v.items() if kk != "fingerprint"}
                               for k, v in specialists.items()},
               "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(metrics_path, metrics)
    log("train-stock: " + ", ".join(f"{k} {v['test_sc_top1_mean']}" for k, v in models.items()))
    return metrics

"""One function per pipeline stage: params + declared input paths -> declared output paths + metrics.

DVC (through the CLI) and the Kubeflow components call exactly these functions. Every output is
written atomically, and every artifact records the params and code version it came from.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from tailor import data as datamod
from tailor.config import Params, same_budget
from tailor.data import Batches, Meta
from tailor.space import Arch, SearchSpace
from tailor.supernet import SuperNet, recalibrate_bn
from tailor.context import Context, _summary, load_supernet, provenance, save_supernet  # noqa: F401
from tailor.train import autocast, evaluate, fit, make_optimizer, masked_cross_entropy, warmup_cosine
from tailor.utils import (atomic_dir, atomic_torch_save, atomic_write_json, check_replaceable, code_version, file_hash,
                          fingerprint, load_checkpoint, load_state, log, read_json)


# ---------------------------------------------------------------- prepare-data
def prepare_data(p: Params, out_dir: Path, metrics_path: Path, force: bool = False) -> dict:
    t0 = time.perf_counter()
    check_replaceable(Path(out_dir), force)  # before minutes of decoding, not after
    meta, splits = datamod.build(p.data, p.seed)
    _check_superclass_names(p, meta)
    with atomic_dir(out_dir, force) as tmp:
        datamod.write(tmp, meta, splits, provenance(p, "prepare-data"))
    metrics = {"source": p.data.source, "classes": len(meta.classes), "superclasses": len(meta.superclasses),
               **{f"{k}_images": len(v[1]) for k, v in splits.items()}, "image_size": meta.image_size,
               "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_json(metrics_path, metrics)
    log(f"prepare-data: {metrics}")
    return metrics


def _check_superclass_names(p: Params, meta: Meta) -> None:
    """Superclasses that params name must be the data's: checked by the first stage, not the last."""
    named = [("search.superclasses", s) for s in (p.search.superclasses or [])]
    named += [(f"retrain.scenarios[{i}].superclass", s.superclass) for i, s in enumerate(p.retrain.scenarios)
              if s.superclass is not None]
    bad = [f"{where} {name!r}" for where, name in named if name not in meta.superclasses]
    if bad:
        raise datamod.DataError(f"{', '.join(bad)}: not a superclass of the data ({p.data.source}: "
                                f"{', '.join(meta.superclasses)})")


# ---------------------------------------------------------------- train-teacher
def train_teacher(p: Params, data_dir: Path, out_path: Path, metrics_path: Path, work_dir: Path) -> dict:
    """The largest network of the space trained alone on all classes (no superclass dropout)."""
    ctx = Context(p, data_dir)
    torch.manual_seed(p.seed)
    model = ctx.prepare_model(SuperNet(ctx.space, ctx.num_classes))
    cfg = p.teacher
    arch = ctx.space.max_arch

    def step(m, x, y, sc, epoch, i):
        with autocast(ctx.device, p.runtime):
            logits = m(x, arch)
        keep = torch.ones_like(logits, dtype=torch.bool)
        loss = masked_cross_entropy(logits, y, keep, cfg.optim.label_smoothing)
        loss.backward()
        return {"loss": loss.item()}

    fp = fingerprint("teacher", p.seed, p.space.model_dump(), p.augment.model_dump(), cfg.model_dump(),
                     file_hash(Path(data_dir) / "meta.json"))
    res = fit(model, ctx.batches("train", cfg.optim.batch_size), make_optimizer(model, cfg.optim), cfg.epochs,
              warmup_cosine(cfg.optim.lr, cfg.epochs, cfg.optim.warmup_epochs), step,
              Path(work_dir) / "checkpoint.pt", p.seed, fp, p.runtime.log_every)
    model.eval()
    evals = {"max": ctx.evaluate_subnet(model, arch, per_image=True)}
    metrics = {"epochs": cfg.epochs, "train_seconds": round(res.seconds, 1), "device": str(ctx.device),
               "history": res.history, "subnets": _summary(evals)}
    save_supernet(out_path, model, ctx, p, "train-teacher", {"metrics": metrics})
    atomic_write_json(metrics_path, metrics)
    log(f"train-teacher: max subnet val sc_top1_mean={evals['max']['val']['sc_top1_mean']}")
    return metrics


# ---------------------------------------------------------------- train-supernet
def train_supernet(p: Params, data_dir: Path, teacher_path: Path, out_path: Path, metrics_path: Path,
                   work_dir: Path) -> dict:
    """The weight-sharing supernet by the configured recipe (tailor.supernet_training)."""
    from tailor.supernet_training import train_supernet as run

    return run(p, data_dir, teacher_path, out_path, metrics_path, work_dir)


# ---------------------------------------------------------------- train-stock
def train_stock(p: Params, data_dir: Path, out_dir: Path, metrics_path: Path, work_dir: Path,
                force: bool = False) -> dict:
    """Stock torchvision MobileNetV3 anchors (and per-superclass specialists) by the same loop and data."""
    from tailor.stock import train_stock as run

    return run(p, data_dir, out_dir, metrics_path, work_dir, force)


# ---------------------------------------------------------------- retrain
def scenario_id(superclass: str, budget: float) -> str:
    """A filesystem-safe key for a (superclass, budget) scenario, e.g. 'sc0__4000000', 'sc1__2p5'."""
    # Spelt as dvc.yaml's foreach spells the same scenario's paths, ${item.superclass}__${item.budget}:
    # the YAML value's str, e.g. 'sc0__4000000' (an integral float without '.0'), 'dog__0.3'.
    b = float(budget)
    return f"{superclass}__" + (str(int(b)) if b.is_integer() and abs(b) < 1e15 else repr(b))


def retrain_scenarios(p: Params, meta: Meta) -> list[tuple[str, float]]:
    """(superclass, budget) of every scenario to retrain, a null superclass expanded to all of them."""
    every = p.search.superclasses or meta.superclasses
    out: list[tuple[str, float]] = []
    for s in p.retrain.scenarios:
        for sc in ([s.superclass] if s.superclass is not None else every):
            meta.superclass_index(sc)  # an unknown name is one clear error, before any training
            if (sc, s.budget) not in out:
                out.append((sc, s.budget))
    return out


def budget_unit(p: Params) -> str:
    """The unit of retrain.scenarios budgets: search.cost's ('MAdds', or 'ms' on a latency LUT)."""
    return {"madds": "MAdds", "latency": "ms"}[p.search.cost.kind]


def save_specialized(path: Path, net: torch.nn.Module, ctx: Context, p: Params, arch: Arch, superclass: str,
                     budget: float, classes: list[int], extra: dict) -> None:
    atomic_torch_save({"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "arch": str(arch),
                       "superclass": superclass, "budget": budget, "classes": classes,
                       "class_names": [ctx.meta.classes[c] for c in classes], "image_size": ctx.meta.image_size,
                       "mean": ctx.meta.mean, "std": ctx.meta.std, **provenance(p, "retrain"), **extra}, path)


def load_specialized(path: Path, device: torch.device | str = "cpu"):
    """(StaticNet for one superclass's classes, its checkpoint dict)."""
    from tailor.config import SpaceConfig
    from tailor.nets import StaticNet

    ck = load_checkpoint(path, "specialised model", ("params", "image_size", "arch", "classes", "state_dict"))
    space = SearchSpace(SpaceConfig.model_validate(ck["params"]["space"]), ck["image_size"])
    net = StaticNet(space, Arch.parse(ck["arch"]), len(ck["classes"]))
    load_state(net, ck["state_dict"], path, "specialised model")
    return net.to(device).eval(), ck


def within_budget(p: Params, ctx: Context, arch: Arch, budget: float) -> tuple[float, float]:
    """(the budget in search.cost's unit, the arch's cost in it); refuses an arch over its budget.

    A searched arch is within by construction; an explicit one (--arch, retrain.scenarios) is checked
    here with the cost model the search uses, so a deployed net never silently breaks its budget.
    """
    from tailor.search.common import SearchError, make_cost_model

    model = make_cost_model(p.search.cost, ctx.space, ctx.num_classes)
    absolute = budget
    if p.search.budgets.kind == "fraction":  # as the search resolved it
        low, high = model.low_high
        absolute = low + budget * (high - low)
    cost = model.cost(arch)
    if cost > absolute and not same_budget(cost, absolute):
        raise SearchError(f"architecture {arch} costs {cost:.6g} {model.unit}, over the scenario's budget "
                          f"{absolute:.6g} {model.unit}" + (f" (fraction {budget:g})" if absolute != budget else ""))
    return absolute, cost


def retrain(p: Params, data_dir: Path, supernet_path: Path, superclass: str, budget: float, arch: Arch,
            out_path: Path, metrics_path: Path, work_dir: Path) -> dict:
    """Train the network of one scenario for its superclass only (classifier = that superclass's classes).

    retrain.init: 'scratch' (fresh weights, TF-NAS/SCARLET style) or 'inherit' (fine-tune the
    supernet's weights for this arch). retrain.data: 'superclass' trains on that superclass's
    images only; 'all' trains on every class and keeps only the superclass's classifier rows.
    """
    from tailor.nets import StaticNet

    cfg = p.retrain
    ctx = Context(p, data_dir)
    ctx.space.validate(arch)
    sc = ctx.meta.superclass_index(superclass)
    budget_abs, cost = within_budget(p, ctx, arch, budget)
    classes = ctx.meta.classes_of(sc)
    torch.manual_seed(p.seed)
    if cfg.init == "inherit":
        supernet, _ = load_supernet(supernet_path)
        net = supernet.extract(arch)
    else:
        net = StaticNet(ctx.space, arch, ctx.num_classes)
    net = ctx.prepare_model(net)

    x, y = datamod.load_split(data_dir, "train")
    if cfg.data == "superclass":
        sel = torch.isin(torch.from_numpy(y), torch.tensor(classes)).numpy()
        x, y = x[sel], y[sel]
    train_batches = Batches(x, y, ctx.meta, ctx.device, cfg.optim.batch_size, pad_crop=p.augment.pad_crop,
                            flip=p.augment.flip, channels_last=p.runtime.channels_last)
    local = torch.full((ctx.num_classes,), -1, dtype=torch.long, device=ctx.device)
    local[torch.tensor(classes, device=ctx.device)] = torch.arange(len(classes), device=ctx.device)
    cls_idx = torch.tensor(classes, device=ctx.device)

    def step(m, xb, yb, scb, epoch, i):
        with autocast(ctx.device, p.runtime):
            logits = m(xb)
        if cfg.data == "superclass":  # a superclass-only problem: only its logits compete
            logits, yb = logits[:, cls_idx], local[yb]
        keep = torch.ones_like(logits, dtype=torch.bool)
        loss = masked_cross_entropy(logits, yb, keep, cfg.optim.label_smoothing)
        loss.backward()
        return {"loss": loss.item()}

    fp = fingerprint("retrain", p.seed, p.space.model_dump(), p.augment.model_dump(), cfg.model_dump(), str(arch),
                     superclass, file_hash(Path(data_dir) / "meta.json"),
                     file_hash(supernet_path) if cfg.init == "inherit" else None)
    res = fit(net, train_batches, make_optimizer(net, cfg.optim), cfg.epochs,
              warmup_cosine(cfg.optim.lr, cfg.epochs, cfg.optim.warmup_epochs), step,
              Path(work_dir) / "checkpoint.pt", p.seed, fp, p.runtime.log_every)
    # BN statistics afresh on (un-augmented) batches of the data it trained on: a few steps of
    # momentum averaging (retrain.data 'superclass' on a small superclass) still carry the supernet's
    # shared statistics (measured: sc0 at 4M MAdds, test top-1 0.56 before, 0.99 after).
    recal = Batches(x, y, ctx.meta, ctx.device, p.runtime.bn_recal_batch_size, channels_last=p.runtime.channels_last)
    recal_it = recal.epoch(p.seed, augment=False, drop_last=False)
    with torch.no_grad(), autocast(ctx.device, p.runtime):
        recalibrate_bn(net, [next(recal_it)[0] for _ in range(min(p.runtime.bn_recal_batches, recal.num_batches(False)))])
    # Keep only this superclass's classifier rows: the deployed model answers among them alone.
    specialised = StaticNet(ctx.space, arch, len(classes))
    state = net.state_dict()
    state["head.classifier.weight"] = state["head.classifier.weight"][cls_idx]
    state["head.classifier.bias"] = state["head.classifier.bias"][cls_idx]
    specialised.load_state_dict(state)
    specialised = ctx.prepare_model(specialised).eval()
    with autocast(ctx.device, p.runtime):
        val = evaluate(specialised, ctx.batches("val"), ctx.meta, classes=classes)
        test = evaluate(specialised, ctx.batches("test"), ctx.meta, classes=classes, per_image=True)
    metrics = {"superclass": superclass, "budget": budget, "budget_unit": budget_unit(p), "budget_abs": budget_abs,
               "cost": cost, "arch": str(arch),
               "madds": ctx.space.madds(arch, len(classes)), "init": cfg.init, "data": cfg.data,
               "epochs": cfg.epochs, "train_seconds": round(res.seconds, 1), "device": str(ctx.device),
               "val_top1": val["sc_top1_mean"], "test_top1": test["sc_top1_mean"],
               "test_images_per_s": test["images_per_s"], "history": res.history,
               # hits per test image of the superclass, in split order: the report pairs them with stock's
               "test_correct": test["correct"]}
    save_specialized(out_path, specialised, ctx, p, arch, superclass, budget, classes, {"metrics": metrics})
    atomic_write_json(metrics_path, metrics)
    log(f"retrain {superclass} @ {budget:g}: {arch} test top-1 {test['sc_top1_mean']}")
    return metrics


# ---------------------------------------------------------------- profile-latency
def profile_latency(p: Params, data_dir: Path, out_dir: Path, metrics_path: Path,
                    targets: list[str] | None = None) -> dict:
    """A latency LUT per target: out_dir/<target>.json and a predicted-vs-measured out_dir/<target>.png.

    Measures on the machine it runs on, so it must run on the target's hardware (KFP: the target's
    latency.targets.<name>.kfp placement). Needs only the space and, from the prepared data, the image
    size and number of classes. `targets` defaults to latency.target.
    """
    from tailor import latency
    from tailor.latency_plot import plot_predicted_vs_measured

    names = list(targets or p.latency.target)
    for name in names:  # every name checked before minutes of measuring
        latency.get_target(p.latency, name)
    meta = Meta.load(data_dir)
    space = SearchSpace(p.space, meta.image_size)
    metrics = {}
    widest = max(len(meta.classes_of(i)) for i in range(len(meta.superclasses)))  # an exported net's classifier
    for name in names:
        lut = latency.profile(p.latency, name, space, len(meta.classes), deployed_classes=widest)
        lut.update(provenance(p, "profile-latency"))
        atomic_write_json(Path(out_dir) / f"{name}.json", lut)
        plot_predicted_vs_measured(lut, Path(out_dir) / f"{name}.png")
        metrics[name] = latency.summary(lut)
    atomic_write_json(metrics_path, metrics)
    return metrics


# ---------------------------------------------------------------- search
def search_predictor(p: Params, data_dir: Path, supernet_path: Path, out_path: Path) -> dict:
    """OFA's accuracy predictor: random subnets measured on every superclass, then an MLP fitted."""
    from tailor.search.run import run_predictor

    return run_predictor(p, data_dir, supernet_path, out_path)


def search(p: Params, method: str, data_dir: Path, supernet_path: Path, out_path: Path,
           predictor_path: Path | None = None, generator_out: Path | None = None,
           superclasses: list[str] | None = None) -> dict:
    """One search method (generator | random | evolution | nsga2) over the scenario grid -> out_path.

    `superclasses` restricts the grid, so a pipeline can run one superclass per task (OFA-T, NSGA-II
    and random search per superclass are independent) and merge the files with search_collect.
    """
    from tailor.search.run import run_search

    return run_search(p, method, data_dir, supernet_path, out_path, predictor_path, generator_out, superclasses)


def search_collect(p: Params, inputs: list[Path], results_path: Path, table_path: Path, metrics_path: Path) -> dict:
    """Merge the methods' result files into results.json, a Markdown table and metrics."""
    from tailor.search.run import collect

    return collect(p, inputs, results_path, table_path, metrics_path)


# ---------------------------------------------------------------- retrain: which architecture
def choose_arch(p: Params, search_dir: Path, superclass: str, budget: float) -> Arch:
    """The architecture to retrain for (superclass, budget).

    The scenario's explicit `arch` in retrain.scenarios when it has one, else the one search method
    retrain.method chose for the scenario in search_dir/results.json (written by search-collect).
    """
    for s in p.retrain.scenarios:
        if s.arch and s.superclass in (None, superclass) and same_budget(s.budget, budget):
            return Arch.parse(s.arch)
    results = Path(search_dir) / "results.json"
    if not results.is_file():
        raise FileNotFoundError(
            f"{results}: no search results, and retrain.scenarios gives no arch for {superclass}@{budget:g}; "
            "run the search stages first (dvc repro search-collect), or pass --arch")
    from tailor.search.common import SearchError
    from tailor.search.run import find_arch

    cost = read_json(results, "search results")["cost"]
    if cost["unit"] != budget_unit(p):
        raise SearchError(f"{results}: budgets are in {cost['unit']}, but retrain.scenarios budgets are in "
                          f"{budget_unit(p)} (search.cost.kind {p.search.cost.kind!r})")
    if p.search.budgets.kind == "fraction":  # retrain budgets are fractions too: resolve as the search did
        budget = cost["low"] + budget * (cost["high"] - cost["low"])
    return Arch.parse(find_arch(results, p.retrain.method, superclass, budget))


# ---------------------------------------------------------------- export
class ExportError(ValueError):
    """The export stage refused its input or its result (e.g. ONNX parity above tolerance)."""


def _superclass_test(meta: Meta, x: np.ndarray, y: np.ndarray, superclass: str, class_names: list[str],
                     source: str):
    """Test images (uint8 NHWC) of one superclass and their targets as indices into class_names."""

    classes = meta.classes_of(meta.superclass_index(superclass))
    names = [meta.classes[c] for c in classes]
    if list(class_names) != names:
        raise ExportError(f"{source}: classes {list(class_names)} differ from superclass {superclass!r}'s "
                          f"classes in the data {names}: model and data do not belong together")
    local = np.full(len(meta.classes), -1, np.int64)
    local[classes] = np.arange(len(classes))
    sel = local[y] >= 0
    return np.ascontiguousarray(x[sel]), local[y[sel]]


def _ort_top1(sess, images: np.ndarray, targets: np.ndarray, batch_size: int) -> float:
    from tailor.export import INPUT_NAME, LOGITS_NAME

    correct = 0
    for i in range(0, len(images), batch_size):
        (logits,) = sess.run([LOGITS_NAME], {INPUT_NAME: images[i:i + batch_size]})
        correct += int((logits.argmax(1) == targets[i:i + batch_size]).sum())
    return correct / max(1, len(images))


def _ort_latency(sess, images: np.ndarray, cfg) -> dict:
    """onnxruntime wall time per call at each of cfg.latency_batch_sizes, on real images (repeated
    when a batch needs more than there are). "ms" is the median over the calls during which no
    other process preempted this one (getrusage involuntary switches, as profile-latency does),
    or over all calls when fewer than a quarter ran clean: on a shared machine the preempted ones
    time the load, not the model."""
    import resource

    from tailor.export import INPUT_NAME, LOGITS_NAME, PROBS_NAME

    out = {}
    for b in cfg.latency_batch_sizes:
        feed = {INPUT_NAME: np.ascontiguousarray(np.resize(images, (b, *images.shape[1:])))}
        for _ in range(cfg.latency_warmup):
            sess.run([LOGITS_NAME, PROBS_NAME], feed)
        times, clean = [], []
        for _ in range(cfg.latency_repeats):
            switches = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
            t = time.perf_counter()
            sess.run([LOGITS_NAME, PROBS_NAME], feed)
            times.append((time.perf_counter() - t) * 1e3)
            if resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw == switches:
                clean.append(times[-1])
        use = clean if len(clean) >= max(3, len(times) // 4) else times
        out[f"batch_{b}"] = {"ms": float(np.median(use)), "p90_ms": float(np.percentile(use, 90)),
                             "min_ms": float(min(times)), "calls": len(times), "used_calls": len(use)}
    return out


def _deployed_latency(p: Params, onnx_files: dict[str, Path], image_size: int) -> dict[str, dict]:
    """{model: {target: stats}}: every exported file timed under each profiled latency target that can
    run it here (latency.measure_deployed), so the report sets the LUT's prediction beside the
    deployed artifact measured the same way. Meaningful where export runs on the target's machine:
    `dvc repro` on one machine; in Kubeflow only when export is placed on the target's nodes."""
    from tailor import latency

    out: dict[str, dict] = {name: {} for name in onnx_files}
    for tname in p.latency.target:
        target = latency.get_target(p.latency, tname)
        if not latency.measurable_here(target):
            continue
        stats = latency.measure_deployed(tname, target, p.latency.protocol, onnx_files, image_size)
        for name, st in stats.items():
            out[name][tname] = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in st.items()}
    return out


def export(p: Params, model_paths: list[Path], data_dir: Path, repo_out: str | Path, metrics_path: Path,
           onnx_dir: Path | None = None, force: bool = False) -> dict:
    """Retrained scenario checkpoints -> ONNX + a Triton model repository (local dir or s3://bucket/prefix).

    Per model: ONNX with provenance metadata, parity against PyTorch on real test images of its
    superclass (the stage fails above export.parity_tolerance), onnxruntime accuracy on the whole
    superclass test split and CPU latency; then <repo>/<model>/{config.pbtxt,1/model.onnx,labels.txt}
    with the model named after its scenario. The repository appears whole or not at all: built in
    a temporary directory and renamed into place (locally) or uploaded as a complete-or-absent
    prefix (S3). onnx_dir, when given, gets <model>.onnx copies. A local repo or onnx_dir that
    holds files tailor did not write is refused unless `force` (utils.check_replaceable).
    """
    import json
    import shutil
    import tempfile

    import onnxruntime

    from tailor.export import export_onnx, parity, s3_client, triton_model_name, upload_repository, write_model
    from tailor.export.onnx_export import ort_session

    cfg = p.export
    model_paths = [Path(m) for m in model_paths]
    if not model_paths:
        raise ExportError("export: no model checkpoints given")
    repo_is_s3 = str(repo_out).startswith("s3://")
    if repo_is_s3:
        from tailor.export import parse_s3_url

        parse_s3_url(str(repo_out))  # a bad URL fails before minutes of work
    else:
        check_replaceable(Path(repo_out), force)
    if onnx_dir is not None:
        check_replaceable(Path(onnx_dir), force)
    t0 = time.perf_counter()
    meta = Meta.load(data_dir)
    x_test, y_test = datamod.load_split(data_dir, "test")
    export_version = code_version()
    models: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tailor-export-") as tmp:
        staged_onnx = Path(tmp) / "onnx"
        labels: dict[str, list[str]] = {}
        for path in model_paths:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such model checkpoint (run `tailor retrain` for its scenario)")
            net, ck = load_specialized(path)
            m = ck.get("metrics", {})
            unit = m.get("budget_unit", "MAdds")  # checkpoints from before budget_unit was recorded
            name = triton_model_name(ck["superclass"], ck["budget"], unit)
            if name in models:
                raise ExportError(f"{path} and {models[name]['checkpoint']} are the same scenario ({name})")
            images, targets = _superclass_test(meta, x_test, y_test, ck["superclass"], ck["class_names"], str(path))
            metadata = {"model_name": name, "arch": ck["arch"], "superclass": ck["superclass"],
                        "budget": repr(float(ck["budget"])), "budget_unit": unit,
                        "classes": json.dumps(ck["class_names"]), "test_top1": repr(m.get("test_top1")),
                        "code_version": export_version, "model_code_version": ck["code_version"],
                        "params_hash": fingerprint(ck["params"]), "checkpoint_hash": file_hash(path),
                        "export_params_hash": fingerprint(cfg.model_dump(mode="json"))}
            onnx_path = export_onnx(net, staged_onnx / f"{name}.onnx", ck["image_size"], ck["mean"], ck["std"],
                                    cfg.opset, metadata)
            rng = np.random.default_rng(p.seed)
            pick = np.sort(rng.permutation(len(images))[:cfg.parity_images])
            err = parity(onnx_path, net, images[pick])
            sess = ort_session(onnx_path, cfg.intra_op_threads)
            lat = _ort_latency(sess, images, cfg)
            models[name] = {
                "checkpoint": str(path), "superclass": ck["superclass"], "budget": ck["budget"], "budget_unit": unit,
                "budget_abs": m.get("budget_abs"), "arch": ck["arch"], "madds": m.get("madds"), "classes": len(ck["classes"]),
                "parity_max_abs": err, "parity_images": int(len(pick)), "parity_ok": err <= cfg.parity_tolerance,
                "test_top1": m.get("test_top1"),
                "onnx_test_top1": round(_ort_top1(sess, images, targets, cfg.max_batch_size), 5),
                "test_images": int(len(images)), "onnx_bytes": onnx_path.stat().st_size,
                "ort_cpu_latency_ms": {k: round(v["ms"], 4) for k, v in lat.items()},
                "ort_cpu_latency_detail": lat}
            labels[name] = list(ck["class_names"])
            log(f"export {name}: parity {err:.2e}, onnxruntime top-1 {models[name]['onnx_test_top1']}, "
                + ", ".join(f"{k} {v}ms" for k, v in models[name]["ort_cpu_latency_ms"].items()))

        deployed = _deployed_latency(p, {n: staged_onnx / f"{n}.onnx" for n in models}, meta.image_size)
        for name, by_target in deployed.items():
            models[name]["target_latency"] = by_target
        metrics = {"repository": str(repo_out), "opset": cfg.opset, "parity_tolerance": cfg.parity_tolerance,
                   "max_parity_error": max(e["parity_max_abs"] for e in models.values()),
                   "intra_op_threads": cfg.intra_op_threads, "onnxruntime": onnxruntime.__version__,
                   "models": models}
        bad = sorted(n for n, e in models.items() if not e["parity_ok"])
        if bad:
            metrics.update(passed=False, seconds=round(time.perf_counter() - t0, 2))
            atomic_write_json(metrics_path, metrics)
            raise ExportError(f"ONNX parity above export.parity_tolerance {cfg.parity_tolerance:g} for "
                              + ", ".join(f"{n} ({models[n]['parity_max_abs']:.3g})" for n in bad))

        def write_repo(root: Path) -> None:
            for name in models:
                write_model(root, name, staged_onnx / f"{name}.onnx", labels[name], cfg)

        if repo_is_s3:
            write_repo(Path(tmp) / "repo")
            upload_repository(Path(tmp) / "repo", str(repo_out), s3_client(cfg.s3), overwrite=True)
        else:
            with atomic_dir(Path(repo_out), force) as d:
                write_repo(d)
        if onnx_dir is not None:
            with atomic_dir(Path(onnx_dir), force) as d:
                for name in models:
                    shutil.copyfile(staged_onnx / f"{name}.onnx", d / f"{name}.onnx")
    metrics.update(passed=True, seconds=round(time.perf_counter() - t0, 2))
    atomic_write_json(metrics_path, metrics)
    log(f"export: {len(models)} model(s) -> {repo_out}, max parity error {metrics['max_parity_error']:.2e}")
    return metrics


# ---------------------------------------------------------------- serve-check
def _host_port(url: str, option: str) -> str:
    """tritonclient's 'host:port' from 'http://host:port', 'grpc://host:port' or 'host:port'."""
    from urllib.parse import urlparse

    text = url if "://" in url else f"tcp://{url}"
    u = urlparse(text)
    if u.scheme not in ("http", "grpc", "tcp") or not u.hostname or not u.port or u.path not in ("", "/"):
        raise ValueError(f"{option} {url!r}: expected host:port or http://host:port (TLS is not supported)")
    return f"{u.hostname}:{u.port}"


def _repository_models(repo: Path) -> list[Path]:
    dirs = sorted(d for d in repo.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / "config.pbtxt").is_file())
    if not dirs:
        raise FileNotFoundError(f"{repo}: no models (no <model>/config.pbtxt); run `tailor export` first")
    return dirs


def serve_check(p: Params, repo: str | Path, data_dir: Path, metrics_path: Path, url: str | None = None,
                grpc_url: str | None = None, work_dir: Path | None = None) -> dict:
    """Check that Triton serves the exported repository as exported: accuracy, labels, latency.

    With `url` (HTTP) and/or `grpc_url`, a running Triton that serves `repo` is checked over the
    protocols of serve.protocols that have a URL. Without either, the nvidia-pytriton wheel's
    tritonserver is started on 127.0.0.1 (free ports, explicit model control) over the
    python-backend twins of the repository's models (see docs/serving.md). Per model: load, the
    served config against the exported one, the superclass's real test images (top-1 against the
    same model.onnx run by onnxruntime here on the same images, and the served labels), latency
    percentiles and throughput per concurrency, unload. The metrics are written also when the
    check fails; then ServeCheckError is raised.
    """
    import tempfile

    from tailor.export import python_backend_twin, read_config, read_signature
    from tailor.export.onnx_export import ort_session
    from tailor.serve import ServeCheckError, serve_check as check_model

    cfg = p.serve
    urls = {k: _host_port(v, opt) for k, v, opt in (("http", url, "--url"), ("grpc", grpc_url, "--grpc-url")) if v}
    protocols = [pr for pr in cfg.protocols if pr in urls] if urls else list(cfg.protocols)
    if urls and not protocols:
        raise ValueError(f"serve.protocols is {cfg.protocols}, but URLs were given only for {sorted(urls)}")
    t0 = time.perf_counter()
    meta = Meta.load(data_dir)
    x_test, y_test = datamod.load_split(data_dir, "test")
    metrics: dict = {"repository": str(repo), "protocols": protocols, "models": {}, "problems": []}
    problems = metrics["problems"]
    with tempfile.TemporaryDirectory(prefix="tailor-serve-check-", dir=work_dir) as tmp:
        tmp = Path(tmp)
        repo_dir = Path(repo)
        if str(repo).startswith("s3://"):
            from tailor.export import download_repository, s3_client

            repo_dir = tmp / "repository"
            download_repository(str(repo), repo_dir, s3_client(p.export.s3))
        elif not repo_dir.is_dir():
            raise FileNotFoundError(f"{repo}: no such model repository (run `tailor export` first)")
        # Everything about each model comes from the repository itself (ONNX metadata, labels.txt),
        # and its images from the data: a repository that does not match the data is refused here.
        plan = {}
        for model_dir in _repository_models(repo_dir):
            onnx_path = model_dir / "1" / "model.onnx"
            info = read_signature(onnx_path).metadata
            if "superclass" not in info:
                raise ValueError(f"{onnx_path}: no 'superclass' in its metadata; was it written by `tailor export`?")
            labels = (model_dir / "labels.txt").read_text().splitlines()
            images, targets = _superclass_test(meta, x_test, y_test, info["superclass"], labels, str(model_dir))
            if len(images) > cfg.max_images:  # a seeded sample over all classes, not the first classes only
                keep = np.sort(np.random.default_rng(p.seed).permutation(len(images))[:cfg.max_images])
                images, targets = images[keep], targets[keep]
            offline = _ort_top1(ort_session(onnx_path), images, targets, cfg.batch_size)
            test_top1 = info.get("test_top1")
            plan[model_dir.name] = dict(dir=model_dir, labels=labels, images=images, targets=targets, offline=offline,
                                        superclass=info["superclass"],
                                        retrain_test_top1=None if test_top1 in (None, "None") else float(test_top1))

        server = None
        try:
            if urls:
                metrics["server"] = {"mode": "external", "urls": urls}
            else:
                from tailor.serve_local import TritonServer

                twins = tmp / "twins"
                for entry in plan.values():
                    python_backend_twin(entry["dir"], twins)
                server = TritonServer(str(twins), tmp / "server")
                urls = server.urls
                metrics["server"] = {"mode": "bundled tritonserver (nvidia-pytriton), python-backend twins",
                                     "urls": urls}
            metrics["server"]["version"] = _server_version(urls)
            run_cfg = cfg.model_copy(update={"protocols": protocols})
            for name, entry in plan.items():
                m = {"superclass": entry["superclass"], "images": int(len(entry["images"])),
                     "offline_source": "the repository's model.onnx, onnxruntime CPU, same images",
                     "retrain_test_top1": entry["retrain_test_top1"]}
                try:
                    m.update(check_model(urls, name, entry["images"], entry["targets"], entry["offline"], run_cfg,
                                         class_names=entry["labels"], expected_config=read_config(entry["dir"])))
                except ServeCheckError as e:
                    m.update(e.metrics)
                    problems.append(str(e))
                m["latency_summary"] = {
                    pr: {f"c{lv['concurrency']}": {k: lv[k] for k in ("p50_ms", "p90_ms", "p99_ms", "throughput_img_per_s")}
                         for lv in pm.get("latency", [])}
                    for pr, pm in m.get("protocols", {}).items()}
                metrics["models"][name] = m
                log(f"serve-check {name}: " + ", ".join(
                    f"{pr} top-1 {pm.get('accuracy')} (offline {entry['offline']:.4f})"
                    for pr, pm in m.get("protocols", {}).items()))
        except Exception as e:  # the server would not start, died, ...: still write what is known
            problems.append(f"{type(e).__name__}: {e}")
        finally:
            if server is not None:
                if problems:
                    metrics["server"]["log_tail"] = server.log_tail(3000)
                server.stop()
    metrics["passed"] = not problems
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(metrics_path, metrics)
    if problems:
        raise ServeCheckError("; ".join(problems), metrics)
    log(f"serve-check: {len(plan)} model(s) passed over {', '.join(protocols)}")
    return metrics


def _server_version(urls: dict[str, str]) -> str | None:
    try:
        if "http" in urls:
            import tritonclient.http as client

            with client.InferenceServerClient(urls["http"], connection_timeout=10, network_timeout=10) as c:
                return c.get_server_metadata().get("version")
        import tritonclient.grpc as client

        with client.InferenceServerClient(urls["grpc"]) as c:
            return c.get_server_metadata(as_json=True, client_timeout=10).get("version")
    except Exception:  # noqa: BLE001  (informational; readiness is checked by serve-check itself)
        return None


# ---------------------------------------------------------------- report
def report(p: Params, metrics_dir: Path, search_table: Path, out_md: Path, summary_path: Path,
           lut_dir: Path | None = None, search_results: Path | None = None, plots_dir: Path | None = None) -> dict:
    """reports/report.md and a metrics summary from every stage's metrics files (and the latency
    tables in lut_dir, for the chosen networks' predicted latency), with the Pareto pictures and
    `dvc plots` data in plots_dir (default: reports/plots)."""
    from tailor.report import report as build

    summary = build(metrics_dir, search_table, out_md, summary_path, provenance(p, "report"), lut_dir,
                    search_results, plots_dir)
    log(f"report: {out_md}")
    return summary

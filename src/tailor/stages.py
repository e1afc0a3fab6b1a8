"""One function per pipeline stage: params + declared input paths -> declared output paths + metrics.

DVC (through the CLI) and the Kubeflow components call exactly these functions. Every output is
written atomically, and every artifact records the params and code version it came from.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tailor import data as datamod
from tailor.config import Params, same_budget
from tailor.data import Batches, Meta
from tailor.space import Arch, SearchSpace
from tailor.supernet import SuperNet, recalibrate_bn
from tailor.context import Context, _summary, load_supernet, provenance, save_specialized, save_supernet  # noqa: F401
from tailor.train import autocast, evaluate, fit, make_optimizer, masked_cross_entropy, warmup_cosine
from tailor.utils import atomic_write_json, file_hash, fingerprint, log, read_json


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
    datamod.check_superclass_names(p, meta)
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


def finetune(p: Params, ctx: Context, net: torch.nn.Module, classes: list[int], work_dir: Path, fp: str):
    """retrain's training: retrain.epochs of `net` (an all-class classifier) on retrain.data, with only
    the superclass's logits competing when the data is the superclass's, then BN statistics
    recomputed on that data. In place; returns fit's result. Any network: the retrain benchmark
    puts a stock net through the same recipe as a control."""
    cfg = p.retrain
    x, y = datamod.load_split(ctx.data_dir, "train")
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

    res = fit(net, train_batches, make_optimizer(net, cfg.optim), cfg.epochs,
              warmup_cosine(cfg.optim.lr, cfg.epochs, cfg.optim.warmup_epochs), step,
              work_dir / "checkpoint.pt", p.seed, fp, p.runtime.log_every)
    # BN statistics afresh on (un-augmented) batches of the data it trained on: a few steps of
    # momentum averaging (retrain.data 'superclass' on a small superclass) still carry the supernet's
    # shared statistics (measured: sc0 at 4M MAdds, test top-1 0.56 before, 0.99 after).
    recal = Batches(x, y, ctx.meta, ctx.device, p.runtime.bn_recal_batch_size, channels_last=p.runtime.channels_last)
    recal_it = recal.epoch(p.seed, augment=False, drop_last=False)
    with torch.no_grad(), autocast(ctx.device, p.runtime):
        recalibrate_bn(net, [next(recal_it)[0] for _ in range(min(p.runtime.bn_recal_batches, recal.num_batches(False)))])
    return res


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
        supernet, _ = load_supernet(supernet_path, ctx=ctx)
        net = supernet.extract(arch)
    else:
        net = StaticNet(ctx.space, arch, ctx.num_classes)
    net = ctx.prepare_model(net)

    fp = fingerprint("retrain", p.seed, p.space.model_dump(), p.augment.model_dump(), cfg.model_dump(), str(arch),
                     superclass, file_hash(Path(data_dir) / "meta.json"),
                     file_hash(supernet_path) if cfg.init == "inherit" else None)
    res = finetune(p, ctx, net, classes, Path(work_dir), fp)
    cls_idx = torch.tensor(classes, device=ctx.device)
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


# Stage bodies that live beside their domain, still callable as stages.<name> by the CLI and the KFP
# components; imported on first use so that a training step does not load onnx and tritonclient.
_ELSEWHERE = {"prepare_data": "tailor.data", "export": "tailor.export.stage", "ExportError": "tailor.export.stage", "serve_check": "tailor.serve",
              "load_specialized": "tailor.context"}


def __getattr__(name: str):
    if name not in _ELSEWHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_ELSEWHERE[name]), name)

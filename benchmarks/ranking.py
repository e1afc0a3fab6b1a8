"""How well a supernet ranks architectures: its accuracies against stand-alone training.

    # 1. >= 20 architectures spread over the cost range, each trained from scratch (cached, resumable):
    .venv/bin/python benchmarks/ranking.py standalone --preset configs/tin-sc10-cpu.yaml --work runs/ranking
    # 2. one supernet training recipe (overlays over the preset), trained and scored against them:
    .venv/bin/python benchmarks/ranking.py variant --name fairnas --preset configs/tin-sc10-cpu.yaml \\
        --preset configs/ranking/fairnas.yaml --work runs/ranking
    # 3. the table of every variant scored so far (RESULTS.md section):
    .venv/bin/python benchmarks/ranking.py table --data-name tin-sc10-cpu

Stand-alone recipe: the stock anchors' (`stock.optim`, `stock.epochs`: the same loop, data,
epochs and augmentation the stock MobileNetV3s get), every class, one seed; scored on the test
split, superclass-restricted, averaged over superclasses. The architectures are drawn from a
seeded pool of uniform samples so that their MAdds are evenly spaced from the space's minimum to
its maximum; the space's min / mid / max are always among them. Results are cached per
architecture in benchmarks/results/ranking-standalone-<data>.json, keyed by a fingerprint of the
recipe and the data, so every supernet variant is scored against the same figures.

A variant's supernet accuracy for an architecture is what search sees: extracted, BN
recalibrated on training images, scored on the same test split. Kendall tau and Spearman rho
with 95% bootstrap CIs (architectures resampled). Wall time is train-supernet's own training
seconds on this machine; variants run one at a time (`wait_for_quiet`).
"""
from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, RESULTS_MD, ROOT, upsert_section, wait_for_quiet  # noqa: E402


def select_archs(space, num_classes: int, n: int, seed: int, pool: int = 4000) -> list:
    """`n` architectures whose MAdds are evenly spaced over the space's range (min, mid, max included)."""
    rng = random.Random(f"ranking-{seed}")
    c = space.cfg

    def window(v):  # a random contiguous run of the sorted choices: uniform samples alone miss both ends
        i = rng.randrange(len(v))
        j = rng.randrange(i, len(v))
        return list(v[i:j + 1])

    cands = {str(a): a for a in (space.sample(rng, window(c.kernels), window(c.depths), window(c.expands))
                                 for _ in range(pool))}
    fixed = [space.min_arch, space.mid_arch, space.max_arch]
    for a in fixed:
        cands.pop(str(a), None)
    cost = {k: space.madds(a, num_classes) for k, a in cands.items()}
    lo, hi = space.madds(space.min_arch, num_classes), space.madds(space.max_arch, num_classes)
    chosen = list(fixed)
    for i in range(1, n - 1):
        if len(chosen) >= n:
            break
        target = lo + (hi - lo) * i / (n - 1)
        best = min(cost, key=lambda k: abs(cost[k] - target))
        chosen.append(cands[best])
        cost.pop(best)
    return sorted(chosen, key=lambda a: space.madds(a, num_classes))


def _prepare(p, work: Path, data: Path | None) -> Path:
    from tailor import stages

    data = Path(data) if data else work / "data"
    if not (data / "meta.json").exists():
        stages.prepare_data(p, data, work / "metrics" / "data.json")
    return data


def train_standalone(p, ctx, arch, epochs: int, work: Path, fp: str) -> dict:
    """One architecture from scratch by `fit` with the stock recipe, scored on val and test."""
    import torch

    from tailor.nets import StaticNet
    from tailor.train import autocast, evaluate, fit, make_optimizer, masked_cross_entropy, warmup_cosine

    cfg = p.stock.optim
    torch.manual_seed(p.seed)
    net = ctx.prepare_model(StaticNet(ctx.space, arch, ctx.num_classes))

    def step(model, xb, yb, scb, epoch, i):
        with autocast(ctx.device, p.runtime):
            logits = model(xb)
        loss = masked_cross_entropy(logits, yb, torch.ones_like(logits, dtype=torch.bool), cfg.label_smoothing)
        loss.backward()
        return {"loss": loss.item()}

    res = fit(net, ctx.batches("train", cfg.batch_size), make_optimizer(net, cfg), epochs,
              warmup_cosine(cfg.lr, epochs, cfg.warmup_epochs), step, work / "checkpoint.pt", p.seed, fp,
              p.runtime.log_every)
    net.eval()
    with autocast(ctx.device, p.runtime):
        val = evaluate(net, ctx.batches("val"), ctx.meta)
        test = evaluate(net, ctx.batches("test"), ctx.meta)
    return {"arch": str(arch), "madds": ctx.space.madds(arch, ctx.num_classes), "epochs": epochs,
            "val_sc_top1_mean": val["sc_top1_mean"], "test_sc_top1_mean": test["sc_top1_mean"],
            "test_top1": test["top1"], "train_seconds": round(res.seconds, 1)}


def standalone_path(data_name: str, truth: str = "") -> Path:
    """The stand-alone figures: the stock recipe's ("" or "default"), or another run's named `truth`
    (e.g. e8, s1)."""
    return RESULTS / f"ranking-standalone-{data_name}{'-' + truth if truth not in ('', 'default') else ''}.json"


def load_truth(data_name: str, truth: str = "") -> dict:
    """The stand-alone figures named `truth`. Names joined by '+' (`default` for the stock recipe's
    own file), e.g. `default+s1`, give the mean over those runs on the architectures all of them
    hold, with the runs kept under "components" so that their agreement with each other (the
    ground truth's own noise) can be reported beside the supernets'."""
    names = truth.split("+")
    if len(names) == 1:
        return json.loads(standalone_path(data_name, truth).read_text())
    parts = {}
    for name in names:
        path = standalone_path(data_name, name)
        if not path.exists():
            raise SystemExit(f"--truth {truth}: {path} does not exist (run `ranking.py standalone --truth {name}`)")
        parts[name] = json.loads(path.read_text())
    first = next(iter(parts.values()))
    for name, sa in parts.items():
        if sa["recipe"]["epochs"] != first["recipe"]["epochs"] or sa["recipe"]["optim"] != first["recipe"]["optim"]:
            raise SystemExit(f"--truth {truth}: {name} is another recipe than {names[0]} (epochs or optimizer); "
                             "only training seeds of one recipe are averaged")
    common = [a for a in first["results"] if all(a in sa["results"] for sa in parts.values())]
    results = {}
    for a in common:
        rs = [sa["results"][a] for sa in parts.values()]
        results[a] = {"arch": a, "madds": rs[0]["madds"], "epochs": rs[0]["epochs"],
                      **{k: sum(r[k] for r in rs) / len(rs) for k in ("val_sc_top1_mean", "test_sc_top1_mean")},
                      "train_seconds": sum(r["train_seconds"] for r in rs)}
    return {"benchmark": "ranking-standalone", "recipe": {**first["recipe"], "seeds": [sa["recipe"]["seed"] for sa
                                                                                       in parts.values()]},
            "results": results, "components": {n: sa["results"] for n, sa in parts.items()},
            "files": [standalone_path(data_name, n).name for n in names]}


def rescored(run: dict, sa: dict) -> dict:
    """A variant's run scored against other stand-alone figures (the same supernet accuracies, on the
    architectures those figures have so far: a stand-alone run is cached per architecture and may be
    partial): no supernet is retrained to change the ground truth."""
    from tailor.stats import rank_agreement

    archs = [{**a, "standalone": sa["results"][a["arch"]]["test_sc_top1_mean"]} for a in run["archs"]
             if a["arch"] in sa["results"]]
    agree = rank_agreement([a["supernet"] for a in archs], [a["standalone"] for a in archs], seed=seed_of(run))
    return {**run, "archs": archs, "ranking": agree}


def cmd_standalone(args, p) -> dict:
    from tailor.context import Context
    from tailor.utils import atomic_write_json, code_version, file_hash, fingerprint, log

    work = Path(args.work)
    data = _prepare(p, work, args.data)
    ctx = Context(p, data)
    epochs = args.epochs or p.stock_epochs()
    # The architectures and the data split stay the preset seed's; --seed changes only the training
    # (initial weights, batch order, augmentation), so two seeds measure the ground truth's own noise.
    arch_seed, other_seed = p.seed, args.seed is not None and args.seed != p.seed
    if other_seed:
        if not args.truth:
            raise SystemExit(f"standalone --seed {args.seed}: name its results with --truth (e.g. s{args.seed}); "
                             "without it they would replace the preset seed's ground truth")
        p = p.model_copy(update={"seed": args.seed})
    recipe = {"seed": p.seed, **({"arch_seed": arch_seed} if other_seed else {}), "epochs": epochs,
              "optim": p.stock.optim.model_dump(), "augment": p.augment.model_dump(),
              "space": p.space.model_dump(), "data": file_hash(data / "meta.json"), "archs": args.archs}
    fp = fingerprint("ranking-standalone", recipe)
    path = standalone_path(args.data_name, args.truth)
    shard, shards = (int(v) for v in args.shard.split("/"))

    def stored() -> dict:
        out = json.loads(path.read_text()) if path.exists() else {}
        if out.get("fingerprint") != fp:
            out = {"benchmark": "ranking-standalone", "fingerprint": fp, "recipe": recipe, "results": {}}
        return out

    out = stored()
    archs = select_archs(ctx.space, ctx.num_classes, args.archs, arch_seed)
    for i, arch in enumerate(archs):
        if str(arch) in out["results"] or i % shards != shard:
            continue
        log(f"stand-alone {i + 1}/{len(archs)}: {arch} ({ctx.space.madds(arch, ctx.num_classes) / 1e6:.2f}M MAdds)")
        r = train_standalone(p, ctx, arch, epochs, work / "standalone" / f"{i:02d}{f'-s{p.seed}' if other_seed else ''}",
                             fp)
        r["code_version"] = code_version()
        RESULTS.mkdir(parents=True, exist_ok=True)
        # After every architecture, so a killed run keeps what it finished; re-read under a lock so
        # that shards running side by side (--shard) add to one file without losing each other's.
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            out = stored()
            out["results"][str(arch)] = r
            out["date"] = datetime.datetime.now().isoformat(timespec="seconds")
            atomic_write_json(path, out)
        log(f"stand-alone {arch}: test sc-top-1 {r['test_sc_top1_mean']:.4f} in {r['train_seconds']} s")
    return out


def cmd_variant(args, p) -> dict:
    import torch

    from tailor import stages
    from tailor.space import Arch
    from tailor.stats import rank_agreement
    from tailor.utils import atomic_write_json, code_version, log

    sa = json.loads(standalone_path(args.data_name).read_text())["results"]
    work = Path(args.work)
    data = _prepare(p, work, args.data)  # under the preset's seed: every training seed sees the same split
    seed = p.seed if args.seed is None else args.seed
    tag = args.name if seed == p.seed else f"{args.name}-s{seed}"
    p = p.model_copy(update={"seed": seed})
    vdir = work / "variants" / tag
    quiet, waited = wait_for_quiet(args.quiet_load, args.max_wait)
    load_start = [round(v, 2) for v in os.getloadavg()]
    t0 = time.perf_counter()
    stages.train_teacher(p, data, vdir / "teacher.pt", vdir / "metrics" / "teacher.json", vdir / "runs" / "teacher")
    sn = stages.train_supernet(p, data, vdir / "teacher.pt", vdir / "supernet.pt", vdir / "metrics" / "supernet.json",
                               vdir / "runs" / "supernet")
    wall = time.perf_counter() - t0
    supernet, _ = stages.load_supernet(vdir / "supernet.pt")
    ctx = stages.Context(p, data)
    supernet = ctx.prepare_model(supernet).eval()
    rows = []
    for a, r in sa.items():
        e = ctx.evaluate_subnet(supernet, Arch.parse(a), splits=("test",))
        rows.append({"arch": a, "madds": r["madds"], "standalone": r["test_sc_top1_mean"],
                     "supernet": e["test"]["sc_top1_mean"]})
    rows.sort(key=lambda r: r["madds"])
    agree = rank_agreement([r["supernet"] for r in rows], [r["standalone"] for r in rows], seed=p.seed)
    res = {"benchmark": "ranking", "name": args.name, "seed": seed, "data_name": args.data_name,
           "command": "python benchmarks/ranking.py " + " ".join(sys.argv[1:]),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "code_version": code_version(),
           "cpu_threads": torch.get_num_threads(), "quiet_at_start": quiet, "loadavg_start": load_start,
           "loadavg_end": [round(v, 2) for v in os.getloadavg()],
           "recipe": {"sampler": p.supernet.sampler, "subnets_per_step": p.supernet.subnets_per_step,
                      "els": p.supernet.els, "curriculum": p.supernet.curriculum.model_dump(),
                      "superclass_dropout": p.supernet.superclass_dropout, "kd_weight": p.supernet.kd_weight,
                      "phases": [ph.model_dump() for ph in p.supernet.phases]},
           "epochs": sn["epochs"], "train_seconds": sn["train_seconds"], "stage_seconds": round(wall, 1),
           # Per-image hits of min / mid / max on test: paired comparisons between variants.
           "subnets": {k: {"madds_m": v["madds_m"], "test_sc_top1_mean": v["test_sc_top1_mean"],
                           "test_correct": v["test_correct"]} for k, v in sn["subnets"].items()},
           "ranking": agree, "archs": rows, "params": p.model_dump(mode="json")}
    atomic_write_json(RESULTS / f"ranking-{args.data_name}-{tag}.json", res)
    log(f"ranking {tag}: tau {agree['kendall_tau']:.3f} {agree['kendall_tau_ci']}, "
        f"rho {agree['spearman_rho']:.3f}; min/mid/max " +
        " / ".join(f"{v['test_sc_top1_mean']:.4f}" for v in res["subnets"].values()))
    return res


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


BASELINE = "sandwich"  # the reference of every tau difference: the preset's recipe before this benchmark


def seed_of(run: dict) -> int:
    return run["seed"] if "seed" in run else run["params"]["seed"]  # results written before --seed existed


def group(runs: list[dict]) -> dict[str, dict[int, dict]]:
    """Recipe name -> {training seed: run}: the baseline first, then the recipes trained at most
    seeds (the table's best-supported rows), then in the order they were first run."""
    out: dict[str, dict[int, dict]] = {}
    for r in sorted(runs, key=lambda r: r["date"]):
        out.setdefault(r["name"], {})[seed_of(r)] = r
    order = sorted(out, key=lambda name: (name != BASELINE, -len(out[name])))  # stable: first-run order within
    return {name: out[name] for name in order}


def _tau(r: dict) -> float:
    return r["ranking"]["kendall_tau"]


def _ci(d: dict, digits: int = 3) -> str:
    ci = max(digits - 1, 1)
    return f"{d['mean']:+.{digits}f} [{d['lo']:+.{ci}f}, {d['hi']:+.{ci}f}]"


def over_seeds(x: dict[int, dict], y: dict[int, dict], one_seed, value, digits: int = 3, unit: str = "") -> str:
    """x minus y. With >= 2 common training seeds: the mean of the per-seed differences with a
    95% t-CI over seeds (training noise). With one: `one_seed(x_run, y_run)`, a bootstrap CI that
    covers the architectures' or images' draw but not the training seed."""
    from tailor.stats import mean_ci

    common = sorted(set(x) & set(y))
    if not common:
        return "-"
    if len(common) == 1:
        return one_seed(x[common[0]], y[common[0]]) + " (1 seed)"
    return _ci(mean_ci([value(x[s]) - value(y[s]) for s in common]), digits) + f"{unit} ({len(common)} seeds)"


def _mean_row(runs: dict[int, dict], key: str, ci_key: str) -> str:
    from tailor.stats import mean_ci

    if len(runs) == 1:
        (g,) = (r["ranking"] for r in runs.values())
        return f"{g[key]:.3f} [{g[ci_key][0]:.2f}, {g[ci_key][1]:.2f}]"
    return _ci(mean_ci([r["ranking"][key] for r in runs.values()]))


def markdown(data_name: str, truth: str = "") -> str:
    from tailor.stats import kendall_tau

    sa = load_truth(data_name, truth)
    files = ", ".join(f"`benchmarks/results/{n}`" for n in sa.get("files", [standalone_path(data_name, truth).name]))
    runs = [json.loads(f.read_text()) for f in RESULTS.glob(f"ranking-{data_name}-*.json")]
    recipes = group([rescored(r, sa) if truth else r for r in runs])
    srs = sorted(sa["results"].values(), key=lambda r: r["madds"])
    seeds = sa["recipe"].get("seeds")
    lines = [
        f"Stand-alone: {len(srs)} architectures ({srs[0]['madds'] / 1e6:.2f} to {srs[-1]['madds'] / 1e6:.2f} M MAdds) "
        f"trained from scratch on every class with the stock anchors' recipe ({sa['recipe']['epochs']} epochs, "
        f"lr {sa['recipe']['optim']['lr']}, batch {sa['recipe']['optim']['batch_size']})"
        + (f", each at training seeds {', '.join(map(str, seeds))} and scored by its mean" if seeds else "") +
        f", test sc-top-1 {_pct(min(r['test_sc_top1_mean'] for r in srs))} to "
        f"{_pct(max(r['test_sc_top1_mean'] for r in srs))}%; "
        f"{sum(r['train_seconds'] for r in srs) / 60:.0f} min of training in all "
        f"({files}). Kendall tau between MAdds and stand-alone accuracy: "
        f"{kendall_tau([r['madds'] for r in srs], [r['test_sc_top1_mean'] for r in srs]):+.2f} (negative: at "
        "this recipe's epochs the smaller networks train better); between stand-alone val and test accuracy: "
        f"{kendall_tau([r['val_sc_top1_mean'] for r in srs], [r['test_sc_top1_mean'] for r in srs]):.2f} (how "
        "well the test split itself ranks them).",
        "",
        "Each variant: the same preset, data split and total epochs; each architecture's supernet accuracy with BN "
        "recalibrated on training images, scored on the test split. tau / rho: Kendall / Spearman against "
        "stand-alone. A recipe trained at several seeds shows the mean over seeds with a 95% t-CI over seeds "
        "(training noise, for these 20 architectures); one trained at one seed shows its 95% bootstrap CI over "
        "architectures, which leaves the training seed's own variation out. min / mid / max: the space's uniform "
        "subnets, test sc-top-1 (%), mean over seeds. Wall: train-supernet's training seconds on this 2-core CPU, "
        "mean over seeds, at 2 threads unless marked (a row marked 1 thread ran two runs side by side, a thread "
        "each; the load averages at start and end are in each result file; some runs ran beside tests).",
        "",
        *_noise_ceiling(sa),
        f"tau - tau({BASELINE}): the difference from the sandwich recipe, paired by training seed (t-CI over the "
        "seeds both ran) or, with one common seed, by architecture (paired bootstrap); a CI that holds 0 is a tie.",
        "",
        f"| variant | seeds | sampler | ELS | curriculum | q | Kendall tau [95% CI] | tau - tau({BASELINE}) [95% CI] "
        "| Spearman rho [95% CI] | min / mid / max | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = recipes.get(BASELINE)
    for name, runs in recipes.items():
        first = next(iter(runs.values()))
        rc = first["recipe"]
        diff = over_seeds(runs, base, dtau, _tau) if base is not None and name != BASELINE else "-"
        cur = "yes" if rc["curriculum"]["enabled"] else "no"
        sampler = rc["sampler"] + (f" x{rc['subnets_per_step']}" if rc["sampler"] == "sandwich" else "")
        subnets = " / ".join(_pct(sum(r["subnets"][k]["test_sc_top1_mean"] for r in runs.values()) / len(runs))
                             for k in first["subnets"])
        wall = f"{sum(r['train_seconds'] for r in runs.values()) / len(runs):.0f}"
        threads = sorted({r.get("cpu_threads") for r in runs.values()} - {None})
        if threads and threads != [2]:  # runs that shared the 2 cores with another, a thread each
            wall += f" ({'/'.join(map(str, threads))} thread{'s' if threads != [1] else ''})"
        lines.append(
            f"| {name} | {', '.join(map(str, sorted(runs)))} | {sampler} | {'yes' if rc['els'] else 'no'} | {cur} | "
            f"{rc['superclass_dropout']} | {_mean_row(runs, 'kendall_tau', 'kendall_tau_ci')} | {diff} | "
            f"{_mean_row(runs, 'spearman_rho', 'spearman_rho_ci')} | {subnets} | {wall} |")
    lines += ["", *claims(recipes), "",
              f"Per-architecture figures: `benchmarks/results/ranking-{data_name}-<variant>[-s<seed>].json`."]
    return "\n".join(lines)


def _noise_ceiling(sa: dict) -> list[str]:
    """How well the stand-alone runs rank the architectures against each other: a supernet is one
    more noisy measurement of the same ranking, so against one run's figures it can be expected to
    reach at most about this tau, and against their mean somewhat more."""
    from tailor.stats import rank_agreement

    comps = sa.get("components")
    if not comps or len(comps) != 2:
        return []
    (na, a), (nb, b) = comps.items()
    archs = sorted(sa["results"])
    g = rank_agreement([a[x]["test_sc_top1_mean"] for x in archs], [b[x]["test_sc_top1_mean"] for x in archs])
    return [f"The ground truth's own noise: the two stand-alone runs ({na}, {nb}: the same architectures, recipe, data "
            f"split and test images, another training seed) rank the architectures at Kendall tau "
            f"{g['kendall_tau']:.3f} [{g['kendall_tau_ci'][0]:.2f}, {g['kendall_tau_ci'][1]:.2f}] (Spearman rho "
            f"{g['spearman_rho']:.3f}) against each other; their test sc-top-1 differs by "
            f"{100 * sum(abs(a[x]['test_sc_top1_mean'] - b[x]['test_sc_top1_mean']) for x in archs) / len(archs):.1f} "
            "points per architecture on average. A supernet that ranked as well as a second stand-alone run would "
            "reach about that tau against one run.", ""]


def _min_acc(r: dict) -> float:
    return 100 * r["subnets"]["min"]["test_sc_top1_mean"]


def _paired_min(a: dict, b: dict) -> str:
    """Min-subnet test accuracy of run a minus run b, paired bootstrap over the test images."""
    from tailor.stats import as_hits, paired_bootstrap

    ca, cb = a["subnets"]["min"].get("test_correct"), b["subnets"]["min"].get("test_correct")
    if not ca or not cb:
        return "(per-image hits not recorded)"
    groups = [(as_hits(ca[sc]), as_hits(cb[sc])) for sc in ca]
    d = paired_bootstrap(groups)
    return f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] points"


def dtau(x: dict, y: dict) -> str:
    """tau of run x minus tau of run y on their common architectures, paired bootstrap CI."""
    from tailor.stats import tau_difference

    truth = {a["arch"]: a["standalone"] for a in x["archs"]}
    sx, sy = ({a["arch"]: a["supernet"] for a in r["archs"]} for r in (x, y))
    common = sorted(set(sx) & set(sy))
    d = tau_difference([sx[a] for a in common], [sy[a] for a in common], [truth[a] for a in common])
    return f"{d['diff']:+.3f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def claims(recipes: dict[str, dict[int, dict]]) -> list[str]:
    """The papers' claims, each as a paired difference between two rows of the table."""
    out = []
    for name in sorted(recipes):
        if name.endswith("-els") and name[:-4] in recipes:
            x, y = recipes[name], recipes[name[:-4]]
            out.append(f"- ELS ({name} - {name[:-4]}): tau {over_seeds(x, y, dtau, _tau)}; min subnet accuracy "
                       f"{over_seeds(x, y, _paired_min, _min_acc, 1, ' points')}.")
    for name in sorted(recipes, key=lambda n: (n.split("-lr")[0], float(n.split("-lr")[1]) if "-lr" in n else 0)):
        base = name.split("-lr")[0]
        if "-lr" in name and base in recipes:  # a step-rate row against its recipe at the rate it sets
            x, y = recipes[name], recipes[base]
            rate = lambda r: r["recipe"]["phases"][0]["lr"]  # noqa: E731
            out.append(f"- Step rate {rate(next(iter(x.values())))} - {rate(next(iter(y.values())))} ({name} - {base}): "
                       f"tau {over_seeds(x, y, dtau, _tau)}; min subnet accuracy "
                       f"{over_seeds(x, y, _paired_min, _min_acc, 1, ' points')}.")
    if "curriculum" in recipes and BASELINE in recipes:
        cur, base = recipes["curriculum"], recipes[BASELINE]
        out.append(f"- Curriculum - direct ({BASELINE}), equal epochs: min subnet accuracy "
                   f"{over_seeds(cur, base, _paired_min, _min_acc, 1, ' points')} (AdaSearch: >= +1); "
                   f"tau {over_seeds(cur, base, dtau, _tau)}.")
    qs = sorted((next(iter(runs.values()))["recipe"]["superclass_dropout"], name) for name, runs in recipes.items()
                if name in {BASELINE, "q0", "q0.3", "q0.6"})
    if len(qs) > 1 and qs[0][0] == 0:
        zero = recipes[qs[0][1]]
        out += [f"- Superclass dropout q = {q} - q = 0: min subnet accuracy "
                f"{over_seeds(recipes[name], zero, _paired_min, _min_acc, 1, ' points')}; "
                f"tau {over_seeds(recipes[name], zero, dtau, _tau)}." for q, name in qs[1:]]
    return (["Claims, each a paired difference [95% CI]:"] + out) if out else []


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("standalone", "variant"):
        s = sub.add_parser(name)
        s.add_argument("--preset", action="append", default=[], help="overlay(s) over params.yaml, in order")
        s.add_argument("--work", required=True, help="data, checkpoints and models go here (resumable)")
        s.add_argument("--data", default=None, help="an already prepared data dir (default: <work>/data)")
        s.add_argument("--data-name", default="tin-sc10-cpu", help="names the results files")
    sub.choices["standalone"].add_argument("--archs", type=int, default=20)
    sub.choices["standalone"].add_argument("--epochs", type=int, default=None, help="default: the stock anchors' epochs")
    truth_help = ("names another stand-alone recipe's results (ranking-standalone-<data>-<truth>.json); "
                  "default: the stock recipe's")
    sub.choices["standalone"].add_argument("--truth", default="", help=truth_help)
    sub.choices["standalone"].add_argument("--seed", type=int, default=None,
                                           help="training seed (default: the preset's); the architectures and the "
                                                "data split stay the preset's. Name the results with --truth")
    sub.choices["standalone"].add_argument("--shard", default="0/1", metavar="K/N",
                                           help="train only the architectures whose index is K mod N, so that N "
                                                "processes can share the work (one file, written under a lock)")
    v = sub.choices["variant"]
    v.add_argument("--name", required=True, help="the recipe's name: runs of one name at several seeds are one row")
    v.add_argument("--seed", type=int, default=None,
                   help="training seed (default: the preset's); the data split stays the preset's")
    v.add_argument("--quiet-load", type=float, default=1.0)
    v.add_argument("--max-wait", type=float, default=600)
    t = sub.add_parser("table")
    t.add_argument("--data-name", default="tin-sc10-cpu")
    t.add_argument("--truth", default="", help=truth_help + "; names joined by '+' (`default` for the stock "
                   "recipe's own), e.g. default+s1: their mean, with their agreement with each other")
    args = ap.parse_args(argv)
    if args.cmd == "table":
        label = (f"mean of {args.truth.replace('+', ', ')}" if "+" in args.truth else args.truth)
        title = f"Supernet ranking: {args.data_name}" + (f", stand-alone {label}" if args.truth else "")
        md = markdown(args.data_name, args.truth)
        upsert_section(RESULTS_MD, title, md)
        print(md)
        return
    from tailor.config import load_params

    p = load_params(ROOT / "params.yaml", [Path(x) for x in args.preset])
    if args.cmd == "standalone":
        cmd_standalone(args, p)
    else:
        cmd_variant(args, p)
        upsert_section(RESULTS_MD, f"Supernet ranking: {args.data_name}", markdown(args.data_name))


if __name__ == "__main__":
    main()

"""Search benchmarks (not unit tests).

    python benchmarks/search.py latency [--repeats 200] [--threads 1 2]
        Time for the EAS generator to produce all scenarios of a 10-superclass x 5-budget grid on
        the default space, on CPU: G's forward pass alone, + sampling and decoding (mode
        candidate, redrawn while over budget), + snapping into the budget window. The EAS paper
        reports < 0.1 s for its generator and 3,474 s for OFA-T.

    python benchmarks/search.py quality --data D --supernet S [--preset P] [--name N] [--work W]
        Every method on the same supernet and scenarios under the protocol params set (search.seeds,
        search.evaluations per scenario, search on validation, report on test): the table of
        search-collect, the generator's held-out learning curves and the predictor's quality.

    python benchmarks/search.py ablation --data D --supernet S [--preset P] [--only V ...]
        The generator alone (one seed), each of its design choices switched off in turn, and a
        small lambda / normalisation sweep: held-out CE, test accuracy, paired difference vs full.

    python benchmarks/search.py transfer --data D --supernet S --work W [--preset P]
        EAT-NAS transfer: OFA-T seeded from the previous budget's result vs unseeded, at equal
        evaluations, on the predictors a quality run left in W: population-quality curves.

Each writes benchmarks/results/search-<name>.json and its own "## Search..." section of
benchmarks/RESULTS.md (other sections are left alone).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, RESULTS_MD, ROOT, upsert_section  # noqa: E402

def _stats(ts: list[float]) -> dict:
    ts = sorted(ts)
    return {"median_ms": round(1000 * statistics.median(ts), 4), "p90_ms": round(1000 * ts[int(0.9 * (len(ts) - 1))], 4),
            "min_ms": round(1000 * ts[0], 4), "runs": len(ts)}


# ---------------------------------------------------------------- latency
def _time_generator(gen, space, cost, scen, slack: float, max_tries: int, threads: list[int], repeats: int) -> dict:
    from tailor.search import Snapper, propose
    from tailor.search.generator import mode_decider

    snap = Snapper(space, cost, slack)
    sc = torch.tensor([s.sc for s in scen])
    b = torch.tensor([s.budget for s in scen], dtype=torch.float32)
    out, old = {}, torch.get_num_threads()
    for n in threads:
        torch.set_num_threads(n)
        runs = {"forward": [], "sample_decode": [], "sample_decode_snap": []}
        for _ in range(10):  # warm-up
            propose(gen, space, cost, snap, scen, 1, max_tries, 0)
        for i in range(repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                gen(sc, b, mode_decider)  # the U autoregressive steps, mode decisions fed back
            runs["forward"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            raw = propose(gen, space, cost, None, scen, 1, max_tries, i)
            runs["sample_decode"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            archs = propose(gen, space, cost, snap, scen, 1, max_tries, i)
            runs["sample_decode_snap"].append(time.perf_counter() - t0)
        out[n] = {k: _stats(v) for k, v in runs.items()}
        out[n]["all_within_budget"] = all(cost.cost(c[0]) <= s.budget for s, c in zip(scen, archs))
        # How far the unsnapped mode candidates are from their budgets: what snapping has to fix.
        out[n]["unsnapped_cost_over_budget_median"] = round(statistics.median(
            cost.cost(c[0]) / s.budget for s, c in zip(scen, raw)), 4)
    torch.set_num_threads(old)
    return out


def latency(args) -> dict:
    from tailor.config import load_params
    from tailor.cost import madds_cost_model
    from tailor.search import ArchGenerator
    from tailor.search.common import Scenario
    from tailor.space import SearchSpace

    p = load_params(ROOT / "params.yaml", args.preset or [])
    space = SearchSpace(p.space, p.data.image_size)
    n_sc, fractions = 10, [0.1, 0.3, 0.5, 0.7, 0.9]
    cfg = p.search.generator
    cases = []
    cost = madds_cost_model(space, 50)  # 10 superclasses x 5 classes
    low, high = cost.low_high
    torch.manual_seed(0)
    cases.append(("untrained", "random weights (outputs far from the budgets: the most snapping work)",
                  ArchGenerator(space, n_sc, low, high, cfg.embed_dim, cfg.hidden, cfg.anchors,
                                cfg.autoregressive).eval(), cost, n_sc))
    if args.generator:
        from tailor.search.generator import load_generator

        g2, ck, sp2 = load_generator(args.generator)
        if sp2.cfg != space.cfg or sp2.image_size != space.image_size:
            raise SystemExit(f"{args.generator}: trained for another search space than params.yaml's (+ --preset)")
        n_classes = ck.get("num_classes")
        if n_classes is None:  # generators saved before num_classes was recorded: synthetic data only
            syn = ck["params"]["data"]["synthetic"]
            n_classes = syn["superclasses"] * syn["classes_per_superclass"]
        n_emb = len(ck["superclasses"])
        # Trained on fewer superclasses: scenario t asks for superclass t mod n, the same work per scenario.
        cases.append(("trained", f"{args.generator} ({ck['params']['search']['generator']['steps']} steps, "
                      f"{n_emb} superclasses embedded; scenario t uses t mod {n_emb})", g2,
                      madds_cost_model(space, n_classes), n_emb))
    out = {"benchmark": "search-latency", "scenarios": n_sc * len(fractions), "superclasses": n_sc,
           "budget_fractions": fractions, "space": f"space of params.yaml + {args.preset or []} at {space.image_size}x{space.image_size}",
           "generator_config": cfg.model_dump(),
           "repeats": args.repeats, "cases": {}}
    for name, note, gen, cost, n_emb in cases:
        low, high = cost.low_high
        scen = [Scenario(f"sc{t}", t % n_emb, low + f * (high - low), f) for t in range(n_sc) for f in fractions]
        out["cases"][name] = {"generator": note, "cost_range": [low, high],
                              "by_threads": _time_generator(gen, space, cost, scen, p.search.slack, cfg.max_tries,
                                                            args.threads, args.repeats)}
    return out


def latency_markdown(res: dict, command: str) -> str:
    lines = [f"`{command}` — {res['date']} (code {res['code_version']}, load average at start {res['loadavg']})", "",
             f"{res['scenarios']} scenarios ({res['superclasses']} superclasses x budgets at fractions "
             f"{res['budget_fractions']} of the MAdds range; {res['space']}) produced in one call of "
             f"`tailor.search.propose` "
             f"(mode candidate; median / p90 of {res['repeats']} runs). "
             f"Target: < 10 ms; the EAS paper: < 0.1 s for its generator, 3,474 s for OFA-T.", "",
             "| generator | threads | G forward (ms) | + sample, decode, redraw over budget (ms) | + snap into [0.95 B, B] (ms) | "
             "unsnapped cost / budget (median) | all within budget |",
             "|---|---|---|---|---|---|---|"]
    for name, case in res["cases"].items():
        for t, r in case["by_threads"].items():
            lines.append(f"| {name} | {t} | {r['forward']['median_ms']:.2f} / {r['forward']['p90_ms']:.2f} | "
                         f"{r['sample_decode']['median_ms']:.2f} / {r['sample_decode']['p90_ms']:.2f} | "
                         f"**{r['sample_decode_snap']['median_ms']:.2f}** / {r['sample_decode_snap']['p90_ms']:.2f} | "
                         f"{r['unsnapped_cost_over_budget_median']:.3f} | {r['all_within_budget']} |")
    lines += [""] + [f"- {name}: {case['generator']}" for name, case in res["cases"].items()]
    lines += ["", "Figures: `benchmarks/results/search-latency.json`."]
    return "\n".join(lines)


# ---------------------------------------------------------------- quality
def _params(args, extra: dict | None = None):
    from tailor.config import deep_merge, load_params

    overrides = {"runtime": {"threads": args.threads}}
    if extra:
        overrides = deep_merge(overrides, extra)
    return load_params(ROOT / "params.yaml", args.preset or [], overrides), overrides


def _provenance(args) -> dict:
    from tailor.utils import file_hash

    return {"data": str(args.data), "supernet": str(args.supernet), "supernet_sha256_16": file_hash(args.supernet),
            "data_meta_sha256_16": file_hash(Path(args.data) / "meta.json"),
            "presets": [str(x) for x in args.preset or []]}


def quality(args) -> dict:
    """Every method under the protocol of params (search.seeds, search.evaluations, test reporting)."""
    from tailor.search import run

    p, overrides = _params(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    reused, seconds = [], {}
    before = RESULTS / f"search-{args.name}.json"
    if args.reuse and before.exists():  # keep the timings of the stages this run reuses
        seconds = json.loads(before.read_text()).get("stage_seconds", {})
    if args.reuse and (work / "predictor.pt").exists():
        reused.append("predictor")
    else:
        t1 = time.perf_counter()
        run.run_predictor(p, args.data, args.supernet, work / "predictor.pt")
        seconds["predictor"] = round(time.perf_counter() - t1, 1)
    for m in run.METHODS:
        if args.reuse and (work / f"{m}.json").exists():
            reused.append(m)
            continue
        t1 = time.perf_counter()
        run.run_search(p, m, args.data, args.supernet, work / f"{m}.json", work / "predictor.pt", work / "generator.pt")
        seconds[m] = round(time.perf_counter() - t1, 1)
    metrics = run.collect(p, [work / f"{m}.json" for m in run.METHODS], work / "results.json", work / "table.md",
                          work / "metrics.json")
    results = json.loads((work / "results.json").read_text())
    gen = results["methods"]["generator"]["seeds"]
    curves = {seed: [{k: c[k] for k in ("step", "heldout_ce", "heldout_acc", "mode_abs_gap")}
                     for c in run_["heldout_curve"]] for seed, run_ in gen.items()}
    predictor = {seed: r["predictor_quality"] for seed, r in results["methods"]["ofa-t"]["seeds"].items()}
    return {"benchmark": "search-quality", **_provenance(args), "overrides": overrides,
            "supernet_spread": _spread(p, args, work / "predictor.pt"),
            "search_params": p.search.model_dump(mode="json"), "seconds": round(time.perf_counter() - t0, 1),
            "stage_seconds": seconds, "metrics": metrics, "generator_heldout_curves": curves,
            "predictor_quality": predictor, "reused": reused, "table": (work / "table.md").read_text(),
            "results": results}


def _spread(p, args, predictor_path: Path) -> dict:
    """How much the supernet's accuracy depends on the architecture at all: over the predictor's
    uniformly sampled subnets (first seed), the spread of each superclass's validation accuracy
    across architectures, beside the binomial standard error of one such accuracy; and how the
    mean accuracy over superclasses follows the cost. When the spread is below the noise, no search
    method can choose better than another, and G has no accuracy signal to learn."""
    from tailor.cost import madds_cost_model
    from tailor.data import Meta
    from tailor.space import Arch, SearchSpace

    ck = torch.load(predictor_path, map_location="cpu", weights_only=False)
    rows = ck["seeds"][str(p.search.seeds[0])]["data"]
    meta = Meta.load(args.data)
    space = SearchSpace(p.space, meta.image_size)
    madds = madds_cost_model(space, len(meta.classes))
    scs = list(rows[0]["acc"])
    acc = torch.tensor([[r["acc"][s] for s in scs] for r in rows], dtype=torch.float64)   # (archs, superclasses)
    cost = torch.tensor([madds.cost(Arch.parse(r["arch"])) for r in rows], dtype=torch.float64)
    from tailor.data import load_split

    _, y = load_split(args.data, "val")
    sc_of = [meta.class_superclass[c] for c in y.tolist()]
    n_val = {name: sc_of.count(t) for t, name in enumerate(meta.superclasses)}
    m = acc.mean()
    se = [float((acc[:, i].mean() * (1 - acc[:, i].mean()) / n_val[s]).sqrt()) for i, s in enumerate(scs)]
    mean_arch = acc.mean(1)
    corr = float(torch.corrcoef(torch.stack([mean_arch, cost]))[0, 1])
    return {"archs": len(rows), "madds_range_m": [round(float(cost.min()) / 1e6, 3), round(float(cost.max()) / 1e6, 3)],
            "mean_acc": round(float(m), 4),
            "std_across_archs_per_superclass": {s: round(float(acc[:, i].std()), 4) for i, s in enumerate(scs)},
            "binomial_se_per_superclass": {s: round(v, 4) for s, v in zip(scs, se)},
            "std_of_mean_over_superclasses": round(float(mean_arch.std()), 4),
            "corr_mean_acc_with_madds": round(corr, 3)}


def _curve_cell(curve: list[dict], key: str) -> str:
    return f"{curve[0][key]:.3f} -> {curve[-1][key]:.3f}"


def quality_markdown(res: dict, command: str) -> str:
    sp = res["search_params"]
    reused = f"; method results reused from the run before: {', '.join(res['reused'])}" if res["reused"] else ""
    lines = [f"`{command}` — {res['date']} (code {res['code_version']}, load average at start {res['loadavg']}, "
             f"{res['seconds']:.0f} s in all{reused}; seconds per stage {json.dumps(res['stage_seconds'])})", "",
             f"Supernet `{res['supernet']}` (sha256 {res['supernet_sha256_16']}...) on `{res['data']}` (meta.json "
             f"sha256 {res['data_meta_sha256_16']}...), presets {res['presets']}. Protocol: seeds {sp['seeds']}, "
             f"{sp['evaluations']} supernet evaluations per scenario for every method, search on the validation "
             f"split only, every pick reported on the test split. Generator: "
             f"`{json.dumps(sp['generator'])}`.", "",
             res["table"].strip(), "",
             "Generator learning curve (mode architectures of every superclass at the grid's lowest, middle and "
             "highest budget, on the validation images held out of its gradient; start -> end of training):", "",
             "| seed | held-out CE | held-out accuracy | mean abs cost gap / budget | all scenarios, mode, snapped (ms) |",
             "|---|---|---|---|---|"]
    gen_seeds = res["results"]["methods"]["generator"]["seeds"]
    for seed, c in res["generator_heldout_curves"].items():
        lines.append(f"| {seed} | {_curve_cell(c, 'heldout_ce')} | {_curve_cell(c, 'heldout_acc')} | "
                     f"{_curve_cell(c, 'mode_abs_gap')} | "
                     f"{gen_seeds[seed]['timing']['mode_only_all_scenarios_ms']:.1f} |")
    sp_ = res["supernet_spread"]
    stds, ses = list(sp_["std_across_archs_per_superclass"].values()), list(sp_["binomial_se_per_superclass"].values())
    lines += ["", f"How much the supernet's accuracy depends on the architecture (the predictor's {sp_['archs']} "
              f"uniform subnets, {sp_['madds_range_m'][0]}-{sp_['madds_range_m'][1]} M MAdds, first seed): each "
              f"superclass's validation accuracy varies across architectures by a standard deviation of "
              f"{100 * min(stds):.1f}-{100 * max(stds):.1f} points, while one such accuracy has a binomial standard "
              f"error of {100 * min(ses):.1f}-{100 * max(ses):.1f} points; the mean over superclasses varies by "
              f"{100 * sp_['std_of_mean_over_superclasses']:.2f} points and correlates with MAdds at "
              f"r = {sp_['corr_mean_acc_with_madds']}."]
    q = res["predictor_quality"]
    lines += ["", "Accuracy predictor per seed (held-out archs): " + "; ".join(
        f"seed {s}: {v.get('train_archs')} train archs, holdout RMSE {v.get('holdout_rmse')} (of the mean "
        f"{v.get('holdout_rmse_of_mean')}), Kendall tau {v.get('holdout_kendall_tau')}" for s, v in q.items()), "",
        f"Figures: `benchmarks/results/search-{res['name']}.json`."]
    return "\n".join(lines)


# ---------------------------------------------------------------- EAT-NAS transfer
def transfer(args) -> dict:
    """EAT-NAS's claim at equal evaluations: OFA-T's evolution at each budget after a superclass's
    first, started from perturbations of the previous budget's result vs from uniform samples (same
    population, generations and random seed), on each seed's accuracy predictor. Curves: mean and
    best predicted accuracy of the population per generation, averaged over the cases; the final
    picks are also measured on the test split (the supernet, as the search table reports)."""
    import random

    from tailor.search.common import load_setup
    from tailor.search.evolution import evolve, load_predictor, transfer_compare
    from tailor.space import Arch
    from tailor.stats import mean_ci
    from tailor.utils import fingerprint

    p, _ = _params(args)
    setup = load_setup(p, args.data, args.supernet)
    cfg = p.search.evolution.model_copy(update={"seed_fraction": 1.0})
    cases, t0 = [], time.perf_counter()
    for seed in p.search.seeds:
        predictor, _ = load_predictor(Path(args.work) / "predictor.pt", setup, seed)
        by_sc: dict = {}
        for sc in setup.scenarios:
            by_sc.setdefault(sc.superclass, []).append(sc)
        for name, scs in by_sc.items():
            scs = sorted(scs, key=lambda x: x.budget)
            fit = (lambda archs, t=scs[0].sc, predictor=predictor: predictor(archs, t))
            basic, _, _ = evolve(setup.space, setup.cost, setup.snap, scs[0].budget, fit, cfg,
                                 random.Random(fingerprint("transfer-first", seed, name)), None)
            for sc in scs[1:]:
                res = transfer_compare(setup.space, setup.cost, setup.snap, sc.budget, fit, cfg, seed, basic)
                for k in ("seeded", "unseeded"):
                    a = setup.snap(Arch.parse(res[k]["arch"]), sc.budget)
                    res[k]["test_acc"] = setup.reporter.acc(a, name)
                cases.append({"seed": seed, "superclass": name, **res})
                basic = Arch.parse(res["seeded"]["arch"])
    gens = len(cases[0]["seeded"]["curve"]["mean"])
    curves = {k: {stat: [round(statistics.mean(c[k]["curve"][stat][g] for c in cases), 5) for g in range(gens)]
                  for stat in ("mean", "best")} for k in ("seeded", "unseeded")}
    d_best = [c["seeded"]["fitness"] - c["unseeded"]["fitness"] for c in cases]
    d_test = [c["seeded"]["test_acc"] - c["unseeded"]["test_acc"] for c in cases]
    ci = {k: mean_ci(v) for k, v in (("final_best_predicted", d_best), ("test_acc", d_test))}
    evals = {k: statistics.mean(c[k]["curve"]["fitness_evaluations"] for c in cases) for k in ("seeded", "unseeded")}
    return {"benchmark": "search-transfer", **_provenance(args), "cases": len(cases),
            "evolution": cfg.model_dump(mode="json"), "curves": curves, "fitness_evaluations": evals,
            "seeded_minus_unseeded": {k: {"mean": round(v["mean"], 5), "ci": [round(v["lo"], 5), round(v["hi"], 5)]}
                                      for k, v in ci.items()},
            "seconds": round(time.perf_counter() - t0, 1), "per_case": cases}


def transfer_markdown(res: dict, command: str) -> str:
    c, d = res["curves"], res["seeded_minus_unseeded"]
    gens = len(c["seeded"]["mean"])
    show = sorted({0, 1, 2, gens // 4, gens // 2, gens - 1})
    lines = [f"`{command}` — {res['date']} (code {res['code_version']}, {res['seconds']:.0f} s)", "",
             f"{res['cases']} cases (every superclass at each budget after its first, every seed's predictor): "
             f"OFA-T's evolution (population {res['evolution']['population']}, {res['evolution']['generations']} "
             f"generations) seeded entirely with perturbations of the previous budget's result vs started from "
             f"uniform samples, same random seed and the same fitness evaluations "
             f"({res['fitness_evaluations']['seeded']:.0f} vs {res['fitness_evaluations']['unseeded']:.0f} per "
             f"run). Population quality: predicted accuracy (%) of the population, mean over cases.", "",
             "| generation | " + " | ".join(str(g) for g in show) + " |", "|---|" + "---|" * len(show)]
    for k in ("seeded", "unseeded"):
        for stat in ("mean", "best"):
            lines.append(f"| {k} {stat} | " + " | ".join(f"{100 * c[k][stat][g]:.2f}" for g in show) + " |")
    f, t = d["final_best_predicted"], d["test_acc"]
    lines += ["", f"Seeded minus unseeded, final pick: predicted accuracy {100 * f['mean']:+.2f} "
                  f"[{100 * f['ci'][0]:+.2f}, {100 * f['ci'][1]:+.2f}] points; supernet test accuracy "
                  f"{100 * t['mean']:+.2f} [{100 * t['ci'][0]:+.2f}, {100 * t['ci'][1]:+.2f}] points (95% t-CI "
                  f"over cases; a CI holding 0 is a tie).", "",
              f"Figures: `benchmarks/results/search-{res['name']}.json`."]
    return "\n".join(lines)


# ---------------------------------------------------------------- generator ablation
ABLATIONS = {
    # name: generator overrides (everything else as the preset says)
    "full": {},
    "constant input (not autoregressive)": {"autoregressive": False},
    "one scenario per update (equal scenario-forwards)": {"scenarios_per_step": 1, "steps_x_grid": True},
    "BN: batch statistics (earlier scheme)": {"bn": "batch"},
    "lambda 1": {"budget_weight": 1.0},
    "lambda 100": {"budget_weight": 100.0},
    "budget term / B (lambda 10)": {"budget_norm": "budget"},
}


def ablation(args) -> dict:
    """The generator alone, one seed, each change of issue 10 switched off in turn and a small
    lambda / normalisation sweep: held-out CE start -> end, the picks' test accuracy under the
    protocol's evaluations, and the paired per-scenario difference against `full`."""
    from tailor.search import run
    from tailor.stats import mean_ci

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = {"search": {"seeds": [args.seed]}}
    if args.steps:
        base["search"]["generator"] = {"steps": args.steps}
    p0, _ = _params(args, base)
    names = args.only or list(ABLATIONS)
    out, t0 = {}, time.perf_counter()
    for name in names:
        g = dict(ABLATIONS[name])
        if g.pop("steps_x_grid", False):
            from tailor.data import Meta

            g["steps"] = p0.search.generator.steps * len(p0.search.superclasses or Meta.load(args.data).superclasses)
        p, _ = _params(args, {"search": {"seeds": [args.seed], "generator": {**base["search"].get("generator", {}),
                                                                             **g}}})
        slug = "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")
        path = work / f"ablation-{slug}-{p.search.generator.steps}steps.json"
        if not (args.reuse and path.exists()):
            run.run_search(p, "generator", args.data, args.supernet, path, generator_out=work / "ablation-g.pt")
        doc = json.loads(path.read_text())
        r = doc["results"]["generator"]
        seed_run = r["seeds"][str(args.seed)]
        out[name] = {"overrides": g, "rows": r["rows"], "curve": seed_run["heldout_curve"],
                     "train_s": seed_run["timing"]["train_s"], "evaluations": seed_run["evaluations"],
                     "mean_test_acc": round(statistics.mean(x["test_acc"] for x in r["rows"]), 5),
                     "mean_val_acc": round(statistics.mean(x["val_acc"] for x in r["rows"]), 5)}
    if "full" in out:
        ref = {(x["superclass"], x["budget"]): x["test_acc"] for x in out["full"]["rows"]}
        for name, v in out.items():
            d = [x["test_acc"] - ref[(x["superclass"], x["budget"])] for x in v["rows"]]
            ci = mean_ci(d)
            v["minus_full"] = {"mean": round(ci["mean"], 5), "ci": [round(ci["lo"], 5), round(ci["hi"], 5)],
                               "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d)}
    return {"benchmark": "search-ablation", **_provenance(args), "seed": args.seed,
            "search_params": p0.search.model_dump(mode="json"), "seconds": round(time.perf_counter() - t0, 1),
            "variants": out}


def ablation_markdown(res: dict, command: str) -> str:
    sp = res["search_params"]
    lines = [f"`{command}` — {res['date']} (code {res['code_version']}, load average at start {res['loadavg']}, "
             f"{res['seconds']:.0f} s in all)", "",
             f"Supernet `{res['supernet']}` (sha256 {res['supernet_sha256_16']}...), presets {res['presets']}; "
             f"seed {res['seed']}; every variant re-ranks {sp['evaluations']} candidates per scenario on "
             f"validation and is reported on test. Base generator settings: `{json.dumps(sp['generator'])}`. "
             f"Held-out CE / accuracy: mode architectures on the validation images kept out of the gradient, "
             f"start -> end of training. Minus full: per-scenario test-accuracy difference, mean [95% t-CI "
             f"over scenarios], wins / losses.", "",
             "| variant | held-out CE | held-out acc | test acc (%) | val acc (%) | minus full (pts) | train s |",
             "|---|---|---|---|---|---|---|"]
    for name, v in res["variants"].items():
        mf = v.get("minus_full")
        mtxt = "-" if mf is None or name == "full" else (
            f"{100 * mf['mean']:+.1f} [{100 * mf['ci'][0]:+.1f}, {100 * mf['ci'][1]:+.1f}]; {mf['wins']} / {mf['losses']}")
        lines.append(f"| {name} | {_curve_cell(v['curve'], 'heldout_ce')} | {_curve_cell(v['curve'], 'heldout_acc')} | "
                     f"{100 * v['mean_test_acc']:.1f} | {100 * v['mean_val_acc']:.1f} | {mtxt} | {v['train_s']:.0f} |")
    lines += ["", f"Figures: `benchmarks/results/search-{res['name']}.json`."]
    return "\n".join(lines)


def main() -> None:
    from tailor.utils import atomic_write_json, code_version

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("latency")
    a.add_argument("--repeats", type=int, default=200)
    a.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    a.add_argument("--generator", type=Path, help="a trained search/generator.pt (default: an untrained generator)")
    a.add_argument("--preset", type=Path, action="append", help="the space the generator was trained for")
    b = sub.add_parser("quality")
    c = sub.add_parser("ablation")
    t = sub.add_parser("transfer", help="needs the predictor.pt a quality run left in --work")
    for sp in (b, c, t):
        sp.add_argument("--data", type=Path, default=ROOT / "data" / "prepared")
        sp.add_argument("--supernet", type=Path, default=ROOT / "models" / "supernet.pt")
        sp.add_argument("--preset", type=Path, action="append")
        sp.add_argument("--work", default="/tmp/tailor-search-bench")
        sp.add_argument("--name", default="quality", help="results: benchmarks/results/search-<name>.json")
        sp.add_argument("--reuse", action="store_true",
                        help="keep the results already in --work (from a run with the same arguments)")
        sp.add_argument("--threads", type=int, default=2, help="runtime.threads")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--steps", type=int, help="generator steps of every variant (default: the preset's)")
    c.add_argument("--only", nargs="+", choices=list(ABLATIONS), help="run only these variants")
    for sp in (a, b, c, t):
        sp.add_argument("--no-record", action="store_true", help="print only; leave benchmarks/results and RESULTS.md alone")
    args = ap.parse_args()
    command = "python benchmarks/search.py " + " ".join(sys.argv[1:])
    load = [round(x, 2) for x in os.getloadavg()]
    res = {"latency": latency, "quality": quality, "ablation": ablation, "transfer": transfer}[args.what](args)
    name = getattr(args, "name", None) or args.what
    res.update(command=command, date=datetime.datetime.now().isoformat(timespec="seconds"),
               code_version=code_version(), loadavg=load, name=name)
    if args.what == "latency":
        heading, md = "Search: tailoring latency (generator, 10 superclasses x 5 budgets, CPU)", latency_markdown(res, command)
    elif args.what == "quality":
        heading, md = f"Search protocol: generator vs baselines ({name})", quality_markdown(res, command)
    elif args.what == "transfer":
        heading, md = f"Search: EAT-NAS transfer seeding ({name})", transfer_markdown(res, command)
    else:
        heading, md = f"Search: generator ablation ({name})", ablation_markdown(res, command)
    print(md)
    if not args.no_record:
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_json(RESULTS / f"search-{name}.json", res)
        upsert_section(RESULTS_MD, heading, md)


if __name__ == "__main__":
    main()

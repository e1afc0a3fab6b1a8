"""The search stages: predictor data, each method over the scenario grid, and the merge.

Each method writes search/<method>.json:
    {"method", "cost": {kind, unit, lut, low, high}, "slack", "scenarios": [...],
     "results": {variant: {"rows": [one per scenario], "timing": {...}, ...}}, provenance}
A row: superclass, budget, arch, cost (+ latency_ms with a LUT), madds, params, budget_used,
within_budget, in_window, val_acc (BN-recalibrated supernet accuracy on the superclass's
validation images, restricted to its classes), and method-specific fields.
Timings: one_time_s is paid once however many scenarios follow (generator training, predictor
data and training); scenarios_s is the time to produce all the scenarios' architectures after it.
`collect` merges any number of these files (several per method when a pipeline ran one superclass
per task) into search/results.json, search/table.md and the metrics.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from tailor.config import Params
from tailor.search.common import Setup, SearchError, load_setup, resolve_budgets
from tailor.space import Arch
from tailor.utils import atomic_write_json, atomic_write_text, fingerprint, log, read_json

METHODS = ("generator", "random", "evolution", "nsga2")


def _seed_arch(value: str | None, setup: Setup, field: str) -> Arch | None:
    if value is None:
        return None
    try:
        return setup.space.validate(Arch.parse(value))
    except ValueError as e:
        raise SearchError(f"{field}: {e}") from None


def _header(setup: Setup, method: str) -> dict:
    from tailor.context import provenance

    low, high = setup.cost.low_high
    c = setup.p.search.cost
    return {"method": method, "cost": {"kind": c.kind, "unit": setup.cost.unit, "lut": c.lut, "low": low, "high": high},
            "slack": setup.p.search.slack, "seeds": list(setup.p.search.seeds),
            "evaluations_per_scenario": setup.p.search.evaluations,
            "report": {"split": "test", "recal_images": sum(len(b) for b in setup.reporter.recal_sample())},
            "proxy_classes": setup.proxy,
            "scenarios": [{"superclass": s.superclass, "budget": s.budget, "budget_spec": s.spec}
                          for s in setup.scenarios],
            **provenance(setup.p, f"search-{method}")}


def _n_budgets(setup: Setup) -> int:
    return len(resolve_budgets(setup.p.search.budgets, setup.cost))


def predictor_samples(setup: Setup) -> int:
    """Subnets the predictor measures per seed so that it spends search.evaluations per scenario:
    each is scored on every superclass (one evaluation each), amortised over the grid's scenarios."""
    n_grid = len(setup.grid_scs) * _n_budgets(setup)
    return max(2, setup.p.search.evaluations * n_grid // len(setup.superclasses))


def _seeded(seed: int, name: str) -> int:
    return int(fingerprint(name, seed), 16) % (2 ** 31)


# ---------------------------------------------------------------- predictor data
def run_predictor(p: Params, data_dir: Path, supernet_path: Path, out_path: Path) -> dict:
    """Per seed: measure random subnets on every superclass and fit the accuracy predictor (OFA)."""
    from tailor.search.evolution import collect, fit_predictor, save_predictor

    setup = load_setup(p, data_dir, supernet_path)
    cfg, n = p.search.predictor, predictor_samples(setup)
    per_seed = {}
    for seed in p.search.seeds:
        setup.evaluator.begin_run()
        rows, data_s = collect(setup, n, seed)
        model, quality = fit_predictor(setup.space, setup.superclasses, rows, cfg, seed)
        timing = {"data_s": round(data_s, 3), "train_s": quality["train_s"]}
        per_seed[seed] = {"model": model, "rows": rows, "quality": quality, "timing": timing,
                          "evaluations": setup.evaluator.evaluations}
        log(f"search-predictor[seed {seed}]: {len(rows)} subnets in {data_s:.1f}s; {quality}")
    save_predictor(out_path, cfg, setup, per_seed)
    return {str(s): {k: v for k, v in r.items() if k in ("quality", "timing", "evaluations")}
            for s, r in per_seed.items()}


# ---------------------------------------------------------------- the methods
# Each runs every seed of search.seeds and returns {variant: {"rows": rows of all seeds,
# "seeds": {seed: {"timing", "evaluations", ...}}}}; `evaluations` is what the seed's run spent.
def _finish(setup: Setup, name: str, runs: dict, extra: dict | None = None) -> dict:
    rows = [r for run in runs.values() for r in run.pop("rows")]
    return {name: {"rows": rows, "seeds": {str(s): run for s, run in runs.items()}, **(extra or {})}}


def run_generator(setup: Setup, generator_out: Path) -> dict:
    from tailor.search.generator import propose, save_generator, train_generator

    p, cfg, E = setup.p, setup.p.search.generator, setup.p.search.evaluations
    runs, first = {}, None
    for seed in p.search.seeds:
        gen_model, info = train_generator(setup, cfg, _seeded(seed, "generator"), p.runtime.log_every)
        if first is None:
            first = (gen_model, info)
        # Tailoring latency proper: all scenarios, mode candidate only, snapped (median of 5 runs).
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            propose(gen_model, setup.space, setup.cost, setup.snap, setup.scenarios, 1, cfg.max_tries, seed)
            times.append(time.perf_counter() - t0)
        setup.evaluator.begin_run()
        t0 = time.perf_counter()
        cands = propose(gen_model, setup.space, setup.cost, setup.snap, setup.scenarios, E, cfg.max_tries, seed)
        produce_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        picks = [(s, max(cs, key=lambda a, s=s: setup.evaluator.acc(a, s.superclass)), cs)
                 for s, cs in zip(setup.scenarios, cands)]
        select_s = time.perf_counter() - t0
        spent = setup.evaluator.evaluations
        timing = {"train_s": info["train_s"], "produce_s": round(produce_s, 4), "select_s": round(select_s, 3),
                  "mode_only_all_scenarios_ms": round(1000 * statistics.median(times), 3),
                  "one_time_s": info["train_s"], "scenarios_s": round(produce_s + select_s, 3)}
        runs[seed] = {"rows": [setup.row(s, a, seed, candidates=len(cs), mode_arch=str(cs[0])) for s, a, cs in picks],
                      "timing": timing, "evaluations": spent, "history": info["history"],
                      "heldout_curve": info["heldout_curve"], "heldout_images": info["heldout_images"],
                      "scenarios_per_step": info["scenarios_per_step"]}
    save_generator(generator_out, first[0], cfg, setup, {"history": first[1]["history"],
                                                          "heldout_curve": first[1]["heldout_curve"],
                                                          "seed": p.search.seeds[0]})
    return _finish(setup, "generator", runs)


def run_random_method(setup: Setup) -> dict:
    from tailor.search.random_search import run_random

    runs = {}
    for seed in setup.p.search.seeds:
        setup.evaluator.begin_run()
        picks, timing = run_random(setup, setup.p.search.random, seed, setup.p.search.evaluations)
        spent = setup.evaluator.evaluations
        timing.update(one_time_s=0.0, scenarios_s=round(timing["sample_s"] + timing["select_s"], 3))
        runs[seed] = {"rows": [setup.row(s, picks[s.key], seed) for s in setup.scenarios], "timing": timing,
                      "evaluations": spent}
    return _finish(setup, "random", runs)


def _predictor_share(setup: Setup, ck: dict) -> int:
    """The predictor's evaluations charged to this run's scenarios (its data amortised over the grid)."""
    n_grid = len(setup.grid_scs) * _n_budgets(setup)
    return round(ck["evaluations"] * len(setup.scenarios) / n_grid)


def run_evolution(setup: Setup, predictor_path: Path) -> dict:
    from tailor.search.evolution import load_predictor, run_ofa_t, run_ofa_v

    p, cfg = setup.p, setup.p.search.evolution
    basic = _seed_arch(cfg.seed_arch, setup, "search.evolution.seed_arch")
    out: dict = {}
    for variant in cfg.variants:
        run = run_ofa_t if variant == "ofa-t" else run_ofa_v
        runs = {}
        for seed in p.search.seeds:
            predictor, ck = load_predictor(predictor_path, setup, seed)
            picks, timing = run(setup, predictor, cfg, seed, basic)
            final = {k: setup.snap(a, next(s.budget for s in setup.scenarios if s.key == k))
                     for k, (a, _, _) in picks.items()}
            rows = []
            for s in setup.scenarios:
                a = final[s.key]
                pred = predictor([a], s.sc)[0] if variant == "ofa-t" else predictor.mean_over([a], setup.grid_scs)[0]
                rows.append(setup.row(s, a, seed, predicted_acc=round(pred, 5), curve=picks[s.key][2]))
            pt = ck["timing"]
            timing.update(predictor_data_s=pt["data_s"], predictor_train_s=pt["train_s"],
                          one_time_s=round(pt["data_s"] + pt["train_s"], 3), scenarios_s=timing["evolution_s"])
            runs[seed] = {"rows": rows, "timing": timing, "evaluations": _predictor_share(setup, ck),
                          "predictor_quality": ck["quality"]}
        out.update(_finish(setup, variant, runs, {"seeded_from": cfg.seed_arch,
                                                  "transfer_budgets": cfg.transfer_budgets}))
    return out


def run_nsga2_method(setup: Setup, predictor_path: Path | None) -> dict:
    from tailor.search.nsga2 import run_nsga2

    p, cfg = setup.p, setup.p.search.nsga2
    basic = _seed_arch(cfg.seed_arch, setup, "search.nsga2.seed_arch")
    if cfg.fitness == "predictor" and predictor_path is None:
        raise SearchError("search.nsga2.fitness is 'predictor': pass --predictor (search-predictor's output)")
    runs, fronts_of = {}, {}
    for seed in p.search.seeds:
        setup.evaluator.begin_run()
        extra_timing, cap, ck = {}, None, None
        if cfg.fitness == "predictor":
            from tailor.search.evolution import load_predictor

            predictor, ck = load_predictor(predictor_path, setup, seed)
            extra_timing = {"predictor_data_s": ck["timing"]["data_s"], "predictor_train_s": ck["timing"]["train_s"]}

            def acc_fn_for(sc, predictor=predictor):
                return lambda archs: predictor(archs, sc)
        else:
            names = setup.superclasses
            cap = p.search.evaluations * _n_budgets(setup)  # one NSGA-II per superclass serves all its budgets

            def acc_fn_for(sc):
                return lambda archs: [setup.evaluator.acc(a, names[sc]) for a in archs]

        picks, fronts, timing = run_nsga2(setup, acc_fn_for, cfg, seed, basic, max_scored_per_superclass=cap)
        spent = _predictor_share(setup, ck) if ck is not None else setup.evaluator.evaluations
        final = {s.key: setup.snap(picks[s.key][0], s.budget) for s in setup.scenarios}
        timing.update(extra_timing, one_time_s=round(sum(extra_timing.values()), 3), scenarios_s=timing["search_s"])
        rows = [setup.row(s, final[s.key], seed,
                          fitness_acc=None if picks[s.key][1] is None else round(picks[s.key][1], 5))
                for s in setup.scenarios]
        runs[seed] = {"rows": rows, "timing": timing, "evaluations": spent}
        fronts_of[str(seed)] = fronts
    return _finish(setup, "nsga2", runs, {"fitness": cfg.fitness, "fronts": fronts_of})


def run_search(p: Params, method: str, data_dir: Path, supernet_path: Path, out_path: Path,
               predictor_path: Path | None = None, generator_out: Path | None = None,
               superclasses: list[str] | None = None) -> dict:
    """One method over the scenario grid (or only `superclasses` of it) -> search/<method>.json."""
    if method not in METHODS:
        raise SearchError(f"unknown search method {method!r}; known: {', '.join(METHODS)}")
    t0 = time.perf_counter()
    setup = load_setup(p, data_dir, supernet_path, superclasses)
    log(f"search-{method}: {len(setup.scenarios)} scenarios, budgets in {setup.cost.unit} "
        f"{sorted({round(s.budget, 6) for s in setup.scenarios})}")
    if method == "generator":
        if generator_out is None:
            raise SearchError("the generator method needs an output path for the trained generator (--generator-out)")
        results = run_generator(setup, generator_out)
    elif method == "random":
        results = run_random_method(setup)
    elif method == "evolution":
        if predictor_path is None:
            raise SearchError("the evolution method needs the accuracy predictor (--predictor)")
        results = run_evolution(setup, predictor_path)
    else:
        results = run_nsga2_method(setup, predictor_path)
    doc = {**_header(setup, method), "results": results, "evaluation_s": round(setup.evaluator.seconds, 3),
           "report_eval_s": round(setup.reporter.seconds, 3), "seconds": round(time.perf_counter() - t0, 2)}
    allowed = p.search.evaluations * len(setup.scenarios)
    for name, r in results.items():
        bad = [row for row in r["rows"] if not row["within_budget"]]
        if bad:  # snapping guarantees this; a failure here is a bug, not bad input
            raise AssertionError(f"{name}: over budget: {[(b['superclass'], b['budget'], b['cost']) for b in bad]}")
        over = {s: run["evaluations"] for s, run in r["seeds"].items() if run["evaluations"] > allowed}
        if over:  # likewise: every method is built to stay within search.evaluations
            raise AssertionError(f"{name}: spent more than search.evaluations x scenarios = {allowed}: {over}")
        log(f"search-{method}[{name}]: mean val acc {statistics.mean(x['val_acc'] for x in r['rows']):.4f}, "
            f"test acc {statistics.mean(x['test_acc'] for x in r['rows']):.4f} over {len(r['seeds'])} seeds, "
            f"evaluations {[run['evaluations'] for run in r['seeds'].values()]} (allowed {allowed})")
    atomic_write_json(out_path, doc)
    return doc


# ---------------------------------------------------------------- merge, table, metrics
_SHARED = ("one_time_s", "predictor_data_s", "predictor_train_s", "train_s", "mode_only_all_scenarios_ms")


def _merge(docs: list[dict]) -> tuple[dict, dict]:
    """{variant: {"rows", "seeds", ...}} over all files; partial files of one variant (one superclass
    each, say) are concatenated, their evaluations and per-scenario timings added up."""
    methods: dict[str, dict] = {}
    first = docs[0]
    for d in docs:
        if d["cost"]["unit"] != first["cost"]["unit"] or d["cost"]["kind"] != first["cost"]["kind"]:
            raise SearchError(f"search results in different cost units ({d['cost']} vs {first['cost']})")
        for name, r in d["results"].items():
            if name not in methods:
                methods[name] = {k: v for k, v in r.items() if k not in ("rows", "seeds")}
                methods[name].update(rows=[], seeds={})
            m = methods[name]
            have = {(x["superclass"], x["budget"], x["seed"]) for x in m["rows"]}
            dup = [x for x in r["rows"] if (x["superclass"], x["budget"], x["seed"]) in have]
            if dup:
                raise SearchError(f"{name}: scenario {dup[0]['superclass']}@{dup[0]['budget']} (seed "
                                  f"{dup[0]['seed']}) appears in two inputs")
            m["rows"] += r["rows"]
            for seed, run in r["seeds"].items():
                got = m["seeds"].setdefault(seed, {"timing": {}, "evaluations": 0})
                got["evaluations"] += run["evaluations"]
                for k, v in run["timing"].items():
                    if isinstance(v, (int, float)):
                        got["timing"][k] = v if k in _SHARED else round(got["timing"].get(k, 0) + v, 4)
                for k, v in run.items():
                    if k not in ("timing", "evaluations"):
                        got.setdefault(k, v)
    return methods, first["cost"]


def _fmt_cost(v: float, unit: str) -> str:
    return f"{v / 1e6:.2f}M" if unit == "MAdds" else f"{v:.3g} {unit}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def summarize(methods: dict) -> dict:
    """Per method: test and val accuracy (mean over scenarios, per seed; mean and 95% CI over the
    seeds), evaluations per scenario, timings; and against the generator, the paired per-scenario
    test-accuracy difference (averaged over the seeds both ran; mean and 95% CI over scenarios,
    wins / ties / losses)."""
    from tailor.stats import mean_ci

    out: dict = {}
    keys_of = {}
    for name, m in methods.items():
        by_seed: dict = {}
        for r in m["rows"]:
            by_seed.setdefault(str(r["seed"]), []).append(r)
        n_scen = len({(r["superclass"], r["budget"]) for r in m["rows"]})
        test = mean_ci([statistics.mean(r["test_acc"] for r in rs) for rs in by_seed.values()])
        val = mean_ci([statistics.mean(r["val_acc"] for r in rs) for rs in by_seed.values()])
        timing = {k: round(statistics.mean(run["timing"].get(k, 0.0) for run in m["seeds"].values()), 3)
                  for k in ("one_time_s", "scenarios_s")}
        out[name] = {"seeds": len(by_seed), "scenarios": n_scen,
                     "mean_test_acc": round(test["mean"], 5),
                     "test_acc_ci": None if test["lo"] is None else [round(test["lo"], 5), round(test["hi"], 5)],
                     "mean_val_acc": round(val["mean"], 5),
                     "evaluations_per_scenario": round(statistics.mean(
                         run["evaluations"] for run in m["seeds"].values()) / n_scen, 3),
                     "mean_budget_used": round(statistics.mean(r["budget_used"] for r in m["rows"]), 4),
                     "within_budget": round(sum(r["within_budget"] for r in m["rows"]) / len(m["rows"]), 4),
                     "in_window": round(sum(r["in_window"] for r in m["rows"]) / len(m["rows"]), 4), **timing}
        keys_of[name] = {(r["superclass"], r["budget"], str(r["seed"])): r["test_acc"] for r in m["rows"]}
    if "generator" in methods:
        g = keys_of["generator"]
        for name in methods:
            if name == "generator":
                continue
            per_scen: dict = {}
            for (sc, b, seed), acc in keys_of[name].items():
                if (sc, b, seed) in g:
                    per_scen.setdefault((sc, b), []).append(g[(sc, b, seed)] - acc)
            diffs = [statistics.mean(v) for v in per_scen.values()]
            if diffs:
                ci = mean_ci(diffs)
                out[name]["generator_minus_this_test"] = {
                    "mean": round(ci["mean"], 5), "ci": None if ci["lo"] is None else [round(ci["lo"], 5),
                                                                                          round(ci["hi"], 5)],
                    "wins": sum(d > 1e-12 for d in diffs), "ties": sum(abs(d) <= 1e-12 for d in diffs),
                    "losses": sum(d < -1e-12 for d in diffs), "scenarios": len(diffs)}
    return out


def table_markdown(methods: dict, cost: dict, slack: float, summary: dict | None = None) -> str:
    summary = summary or summarize(methods)
    names = list(methods)
    unit = cost["unit"]
    seeds = sorted({str(r["seed"]) for m in methods.values() for r in m["rows"]})
    lines = [f"Each method ran with seeds {', '.join(seeds)} and chose one architecture per scenario using only the "
             f"validation split. Test accuracy: the chosen architecture's supernet accuracy on the test split "
             f"(superclass-restricted, BN recalibrated on the report's sample of training images); mean over "
             f"scenarios, then mean [95% t-CI] over seeds. Validation accuracy (what the methods selected on) "
             f"beside it. Generator minus method: per scenario the test-accuracy difference averaged over seeds, "
             f"then mean [95% t-CI] over scenarios; a CI that holds 0 is a tie. Evaluations: supernet "
             f"evaluations (one architecture on one superclass's validation images) spent per scenario, the "
             f"predictor's amortised over the grid.", "",
             "| method | test acc (%) [95% CI] | val acc (%) | evaluations / scenario | generator minus it, test "
             "(pts) [95% CI]; wins / ties / losses | one-time (s) | all scenarios (s) |",
             "|---|---|---|---|---|---|---|"]
    for n in names:
        s = summary[n]
        ci = s["test_acc_ci"]
        d = s.get("generator_minus_this_test")
        dtxt = "-" if d is None else (
            f"{100 * d['mean']:+.1f} [{_pct(d['ci'][0]) if d['ci'] else '-'}, {_pct(d['ci'][1]) if d['ci'] else '-'}]"
            f"; {d['wins']} / {d['ties']} / {d['losses']}")
        lines.append(f"| {n} | {_pct(s['mean_test_acc'])} [{_pct(ci[0]) if ci else '-'}, {_pct(ci[1]) if ci else '-'}] "
                     f"| {_pct(s['mean_val_acc'])} | {s['evaluations_per_scenario']:g} | {dtxt} | "
                     f"{s['one_time_s']:.1f} | {s['scenarios_s']:.3f} |")
    keys = []
    for name in names:
        for r in methods[name]["rows"]:
            if (r["superclass"], r["budget"]) not in keys:
                keys.append((r["superclass"], r["budget"]))
    mean_of = {}
    for name in names:
        acc: dict = {}
        for r in methods[name]["rows"]:
            acc.setdefault((r["superclass"], r["budget"]), []).append(r)
        mean_of[name] = {k: (statistics.mean(r["test_acc"] for r in v), statistics.mean(r["cost"] for r in v))
                         for k, v in acc.items()}
    lines += ["", f"Per scenario: test accuracy (%) averaged over the seeds (mean cost of the picks, {unit}); every "
                  f"pick lies within its budget, snapped into [{1 - slack:.2f} B, B].", "",
              "| superclass | budget | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for k in keys:
        vals = {n: mean_of[n].get(k) for n in names}
        best = max((v[0] for v in vals.values() if v), default=None)
        cells = ["-" if v is None else (f"**{100 * v[0]:.1f}** ({_fmt_cost(v[1], unit)})" if v[0] == best
                                        else f"{100 * v[0]:.1f} ({_fmt_cost(v[1], unit)})") for v in vals.values()]
        lines.append(f"| {k[0]} | {_fmt_cost(k[1], unit)} | " + " | ".join(cells) + " |")
    lines += ["", "| method | what the one-time cost is | within budget | in window |", "|---|---|---|---|"]
    for n in names:
        rows = methods[n]["rows"]
        lines.append(f"| {n} | {_charged(n)} | {sum(r['within_budget'] for r in rows)}/{len(rows)} | "
                     f"{sum(r['in_window'] for r in rows)}/{len(rows)} |")
    return "\n".join(lines) + "\n"


def _charged(name: str) -> str:
    """What the method's one-time cost consists of, in words (for the table)."""
    if name == "generator":
        return "training G once per seed; then one forward pass for all scenarios and the candidates' evaluations"
    if name == "random":
        return "none; the random candidates' evaluations are per scenario"
    return "the accuracy predictor's subnet measurements and MLP fit, once per seed; then evolution on it"


def collect(p: Params, inputs: list[Path], results_path: Path, table_path: Path, metrics_path: Path) -> dict:
    from tailor.context import provenance

    if not inputs:
        raise SearchError("search-collect: no search result files given")
    docs = []
    for path in inputs:
        try:
            docs.append(read_json(path, "search output"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such search result (run its search stage first)") from None
    methods, cost = _merge(docs)
    slack = docs[0]["slack"]
    summary = summarize(methods)
    table = table_markdown(methods, cost, slack, summary)
    metrics = {"cost_unit": cost["unit"], "seeds": docs[0].get("seeds"),
               "evaluations_per_scenario": docs[0].get("evaluations_per_scenario"),
               "scenarios": len({(r["superclass"], r["budget"]) for m in methods.values() for r in m["rows"]}),
               "methods": summary}
    atomic_write_json(results_path, {"cost": cost, "slack": slack, "seeds": docs[0].get("seeds"),
                                     "methods": methods, "metrics": metrics,
                                     "inputs": [str(x) for x in inputs], **provenance(p, "search-collect")})
    atomic_write_text(table_path, table)
    atomic_write_json(metrics_path, metrics)
    log("search-collect: " + ", ".join(f"{n} test {v['mean_test_acc']}" for n, v in summary.items()))
    return metrics


def find_arch(results_path: Path, method: str, superclass: str, budget: float) -> str:
    """The architecture `method` chose for (superclass, budget) in search/results.json (for retrain),
    in the run of the first of search.seeds."""
    doc = read_json(results_path, "search results")
    if method not in doc["methods"]:
        raise SearchError(f"{results_path}: no results of method {method!r} (has {sorted(doc['methods'])})")
    rows = doc["methods"][method]["rows"]
    first = (doc.get("seeds") or [rows[0]["seed"]])[0]
    for r in rows:
        if (r["seed"] == first and r["superclass"] == superclass
                and abs(r["budget"] - budget) <= 1e-6 * max(1.0, abs(budget))):
            return r["arch"]
    raise SearchError(f"{results_path}: method {method!r} has no scenario {superclass}@{budget:.6g}")

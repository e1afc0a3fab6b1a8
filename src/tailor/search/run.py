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

import json
import statistics
import time
from pathlib import Path

from tailor.config import Params
from tailor.search.common import Setup, SearchError, load_setup
from tailor.space import Arch
from tailor.utils import atomic_write_json, atomic_write_text, fingerprint, log

METHODS = ("generator", "random", "evolution", "nsga2")


def _seed_arch(value: str | None, setup: Setup, field: str) -> Arch | None:
    if value is None:
        return None
    try:
        return setup.space.validate(Arch.parse(value))
    except ValueError as e:
        raise SearchError(f"{field}: {e}") from None


def _header(setup: Setup, method: str) -> dict:
    from tailor.stages import provenance

    low, high = setup.cost.low_high
    c = setup.p.search.cost
    return {"method": method, "cost": {"kind": c.kind, "unit": setup.cost.unit, "lut": c.lut, "low": low, "high": high},
            "slack": setup.p.search.slack,
            "scenarios": [{"superclass": s.superclass, "budget": s.budget, "budget_spec": s.spec}
                          for s in setup.scenarios],
            **provenance(setup.p, f"search-{method}")}


def _report_eval(setup: Setup, picks: dict[str, Arch]) -> float:
    """Seconds spent measuring final picks ({scenario key: arch}) for the report (not charged to the method)."""
    t0 = time.perf_counter()
    for s in setup.scenarios:
        setup.evaluator.acc(picks[s.key], s.superclass)
    return round(time.perf_counter() - t0, 3)


# ---------------------------------------------------------------- predictor data
def run_predictor(p: Params, data_dir: Path, supernet_path: Path, out_path: Path) -> dict:
    """Measure random subnets on every superclass and fit the accuracy predictor (OFA)."""
    from tailor.search.evolution import collect, fit_predictor, save_predictor

    setup = load_setup(p, data_dir, supernet_path)
    cfg = p.search.predictor
    rows, data_s = collect(setup, cfg.samples, p.seed)
    model, quality = fit_predictor(setup.space, setup.superclasses, rows, cfg, p.seed)
    timing = {"data_s": round(data_s, 3), "train_s": quality["train_s"], "evaluations": len(rows)}
    save_predictor(out_path, model, cfg, setup, rows, {"quality": quality, "timing": timing})
    log(f"search-predictor: {len(rows)} subnets in {data_s:.1f}s; {quality}")
    return {"quality": quality, "timing": timing}


# ---------------------------------------------------------------- the methods
def run_generator(setup: Setup, generator_out: Path) -> dict:
    from tailor.search.generator import propose, save_generator, train_generator

    p, cfg = setup.p, setup.p.search.generator
    seed = int(fingerprint("generator", p.seed), 16) % (2 ** 31)
    gen_model, info = train_generator(setup, cfg, seed, p.runtime.log_every)
    save_generator(generator_out, gen_model, cfg, setup, {"history": info["history"]})
    # Tailoring latency proper: all scenarios, mode candidate only, snapped (median of 5 runs).
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        propose(gen_model, setup.space, setup.cost, setup.snap, setup.scenarios, 1, cfg.max_tries, seed)
        runs.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    cands = propose(gen_model, setup.space, setup.cost, setup.snap, setup.scenarios, cfg.candidates, cfg.max_tries,
                    seed)
    produce_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = []
    for s, cs in zip(setup.scenarios, cands):
        best = max(cs, key=lambda a: setup.evaluator.acc(a, s.superclass)) if len(cs) > 1 else cs[0]
        rows.append((s, best, {"candidates": len(cs), "mode_arch": str(cs[0])}))
    select_s = time.perf_counter() - t0
    report_s = _report_eval(setup, {s.key: a for s, a, _ in rows})
    timing = {"train_s": info["train_s"], "produce_s": round(produce_s, 4), "select_s": round(select_s, 3),
              "mode_only_all_scenarios_ms": round(1000 * statistics.median(runs), 3),
              "one_time_s": info["train_s"], "scenarios_s": round(produce_s + select_s, 3), "report_eval_s": report_s}
    return {"generator": {"rows": [setup.row(s, a, **x) for s, a, x in rows], "timing": timing,
                          "history": info["history"]}}


def run_random_method(setup: Setup) -> dict:
    from tailor.search.random_search import run_random

    picks, timing = run_random(setup, setup.p.search.random, setup.p.seed)
    timing.update(one_time_s=0.0, scenarios_s=round(timing["sample_s"] + timing["select_s"], 3), report_eval_s=0.0)
    return {"random": {"rows": [setup.row(s, picks[s.key]) for s in setup.scenarios], "timing": timing}}


def run_evolution(setup: Setup, predictor_path: Path) -> dict:
    from tailor.search.evolution import load_predictor, run_ofa_t, run_ofa_v

    p, cfg = setup.p, setup.p.search.evolution
    predictor, ck = load_predictor(predictor_path, setup)
    basic = _seed_arch(cfg.seed_arch, setup, "search.evolution.seed_arch")
    pt = ck["timing"]
    out = {}
    for variant in cfg.variants:
        run = run_ofa_t if variant == "ofa-t" else run_ofa_v
        picks, timing = run(setup, predictor, cfg, p.seed, basic)
        final = {k: setup.snap(a, next(s.budget for s in setup.scenarios if s.key == k))
                 for k, (a, _, _) in picks.items()}
        report_s = _report_eval(setup, final)
        rows = []
        for s in setup.scenarios:
            a = final[s.key]
            pred = predictor([a], s.sc)[0] if variant == "ofa-t" else predictor.mean_over([a], setup.grid_scs)[0]
            rows.append(setup.row(s, a, predicted_acc=round(pred, 5), curve=picks[s.key][2]))
        timing.update(predictor_data_s=pt["data_s"], predictor_train_s=pt["train_s"],
                      one_time_s=round(pt["data_s"] + pt["train_s"], 3), scenarios_s=timing["evolution_s"],
                      report_eval_s=report_s)
        out[variant] = {"rows": rows, "timing": timing, "predictor_quality": ck["quality"],
                        "seeded_from": cfg.seed_arch, "transfer_budgets": cfg.transfer_budgets}
    return out


def run_nsga2_method(setup: Setup, predictor_path: Path | None) -> dict:
    from tailor.search.nsga2 import run_nsga2

    p, cfg = setup.p, setup.p.search.nsga2
    basic = _seed_arch(cfg.seed_arch, setup, "search.nsga2.seed_arch")
    extra_timing = {}
    if cfg.fitness == "predictor":
        from tailor.search.evolution import load_predictor

        if predictor_path is None:
            raise SearchError("search.nsga2.fitness is 'predictor': pass --predictor (search-predictor's output)")
        predictor, ck = load_predictor(predictor_path, setup)
        extra_timing = {"predictor_data_s": ck["timing"]["data_s"], "predictor_train_s": ck["timing"]["train_s"]}

        def acc_fn_for(sc):
            return lambda archs: predictor(archs, sc)
    else:
        names = setup.superclasses

        def acc_fn_for(sc):
            return lambda archs: [setup.evaluator.acc(a, names[sc]) for a in archs]

    picks, fronts, timing = run_nsga2(setup, acc_fn_for, cfg, p.seed, basic)
    final = {s.key: setup.snap(picks[s.key][0], s.budget) for s in setup.scenarios}
    report_s = _report_eval(setup, final)
    timing.update(extra_timing, one_time_s=round(sum(extra_timing.values()), 3), scenarios_s=timing["search_s"],
                  report_eval_s=report_s)
    rows = [setup.row(s, final[s.key], fitness_acc=None if picks[s.key][1] is None else round(picks[s.key][1], 5))
            for s in setup.scenarios]
    return {"nsga2": {"rows": rows, "timing": timing, "fitness": cfg.fitness, "fronts": fronts}}


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
    doc = {**_header(setup, method), "results": results, "evaluations": setup.evaluator.evaluations,
           "evaluation_s": round(setup.evaluator.seconds, 3), "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_json(out_path, doc)
    for name, r in results.items():
        bad = [row for row in r["rows"] if not row["within_budget"]]
        if bad:  # snapping guarantees this; a failure here is a bug, not bad input
            raise AssertionError(f"{name}: over budget: {[(b['superclass'], b['budget'], b['cost']) for b in bad]}")
        log(f"search-{method}[{name}]: mean val acc {statistics.mean(x['val_acc'] for x in r['rows']):.4f}, "
            f"one-time {r['timing']['one_time_s']}s, all scenarios {r['timing']['scenarios_s']}s")
    return doc


# ---------------------------------------------------------------- merge, table, metrics
def _merge(docs: list[dict]) -> tuple[dict, dict]:
    """{variant: {"rows", "timing", ...}} over all files; partial files of one variant are concatenated."""
    methods: dict[str, dict] = {}
    first = docs[0]
    for d in docs:
        if d["cost"]["unit"] != first["cost"]["unit"] or d["cost"]["kind"] != first["cost"]["kind"]:
            raise SearchError(f"search results in different cost units ({d['cost']} vs {first['cost']})")
        for name, r in d["results"].items():
            if name not in methods:
                methods[name] = {k: v for k, v in r.items() if k not in ("rows", "timing")}
                methods[name].update(rows=[], timing={})
            have = {(x["superclass"], x["budget"]) for x in methods[name]["rows"]}
            dup = [x for x in r["rows"] if (x["superclass"], x["budget"]) in have]
            if dup:
                raise SearchError(f"{name}: scenario {dup[0]['superclass']}@{dup[0]['budget']} appears in two inputs")
            methods[name]["rows"] += r["rows"]
            for k, v in r["timing"].items():
                if not isinstance(v, (int, float)):
                    continue
                if k in ("one_time_s", "predictor_data_s", "predictor_train_s", "train_s", "mode_only_all_scenarios_ms"):
                    methods[name]["timing"][k] = v  # shared, not additive across partial runs
                else:
                    methods[name]["timing"][k] = round(methods[name]["timing"].get(k, 0) + v, 4)
    return methods, first["cost"]


def _fmt_cost(v: float, unit: str) -> str:
    return f"{v / 1e6:.2f}M" if unit == "MAdds" else f"{v:.3g} {unit}"


def table_markdown(methods: dict, cost: dict, slack: float) -> str:
    names = list(methods)
    keys = []
    for name in names:
        for r in methods[name]["rows"]:
            if (r["superclass"], r["budget"]) not in keys:
                keys.append((r["superclass"], r["budget"]))
    index = {name: {(r["superclass"], r["budget"]): r for r in methods[name]["rows"]} for name in names}
    unit = cost["unit"]
    lines = [f"Supernet validation accuracy (BN-recalibrated, superclass-restricted) per scenario; each cell is "
             f"accuracy (cost). Every architecture lies within its budget, snapped into "
             f"[{1 - slack:.2f} B, B]; cost in {unit}.", "",
             "| superclass | budget | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for k in keys:
        cells = []
        for name in names:
            r = index[name].get(k)
            cells.append("-" if r is None else f"{r['val_acc']:.3f} ({_fmt_cost(r['cost'], unit)})")
        best = max((index[n][k]["val_acc"] for n in names if k in index[n]), default=None)
        cells = [f"**{c}**" if c != "-" and index[n].get(k) and index[n][k]["val_acc"] == best else c
                 for c, n in zip(cells, names)]
        lines.append(f"| {k[0]} | {_fmt_cost(k[1], unit)} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | | " + " | ".join(
        f"{statistics.mean(r['val_acc'] for r in methods[n]['rows']):.4f}" for n in names) + " |")
    lines += ["", "| method | one-time cost (s) | all scenarios (s) | what the cost is | within budget | in window |",
              "|---|---|---|---|---|---|"]
    for n in names:
        t, rows = methods[n]["timing"], methods[n]["rows"]
        lines.append(f"| {n} | {t.get('one_time_s', 0):.1f} | {t.get('scenarios_s', 0):.3f} | "
                     f"{_charged(n, methods[n])} | {sum(r['within_budget'] for r in rows)}/{len(rows)} | "
                     f"{sum(r['in_window'] for r in rows)}/{len(rows)} |")
    return "\n".join(lines) + "\n"


def _charged(name: str, m: dict) -> str:
    """What the method's cost consists of, in words (for the table)."""
    t = m["timing"]
    if name == "generator":
        return (f"training G once; then one forward pass for all scenarios "
                f"({t.get('mode_only_all_scenarios_ms', 0):.1f} ms, mode candidates, snapped) and the "
                f"candidates' supernet evaluations")
    if name == "random":
        return "supernet evaluations of the random candidates"
    if "predictor_data_s" in t:
        return (f"accuracy predictor once (subnets measured {t['predictor_data_s']:.0f} s, MLP fit "
                f"{t['predictor_train_s']:.1f} s); then the evolutionary searches")
    return "supernet evaluations"


def collect(p: Params, inputs: list[Path], results_path: Path, table_path: Path, metrics_path: Path) -> dict:
    from tailor.stages import provenance

    if not inputs:
        raise SearchError("search-collect: no search result files given")
    docs = []
    for path in inputs:
        try:
            docs.append(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such search result (run its search stage first)") from None
    methods, cost = _merge(docs)
    slack = docs[0]["slack"]
    table = table_markdown(methods, cost, slack)
    metrics = {"cost_unit": cost["unit"], "scenarios": len({(r["superclass"], r["budget"])
                                                            for m in methods.values() for r in m["rows"]}),
               "methods": {}}
    for name, m in methods.items():
        rows = m["rows"]
        metrics["methods"][name] = {
            "mean_val_acc": round(statistics.mean(r["val_acc"] for r in rows), 5),
            "mean_budget_used": round(statistics.mean(r["budget_used"] for r in rows), 4),
            "within_budget": round(sum(r["within_budget"] for r in rows) / len(rows), 4),
            "in_window": round(sum(r["in_window"] for r in rows) / len(rows), 4),
            "one_time_s": m["timing"].get("one_time_s", 0.0), "scenarios_s": m["timing"].get("scenarios_s", 0.0)}
    if "generator" in methods:
        g = {(r["superclass"], r["budget"]): r["val_acc"] for r in methods["generator"]["rows"]}
        for name, m in methods.items():
            if name != "generator":
                diffs = [g[k] - r["val_acc"] for r in m["rows"] if (k := (r["superclass"], r["budget"])) in g]
                if diffs:
                    metrics["methods"][name]["generator_minus_this"] = round(statistics.mean(diffs), 5)
    atomic_write_json(results_path, {"cost": cost, "slack": slack, "methods": methods, "metrics": metrics,
                                     "inputs": [str(x) for x in inputs], **provenance(p, "search-collect")})
    atomic_write_text(table_path, table)
    atomic_write_json(metrics_path, metrics)
    log("search-collect: " + ", ".join(f"{n} {v['mean_val_acc']}" for n, v in metrics["methods"].items()))
    return metrics


def find_arch(results_path: Path, method: str, superclass: str, budget: float) -> str:
    """The architecture `method` chose for (superclass, budget) in search/results.json (for retrain)."""
    doc = json.loads(Path(results_path).read_text())
    if method not in doc["methods"]:
        raise SearchError(f"{results_path}: no results of method {method!r} (has {sorted(doc['methods'])})")
    for r in doc["methods"][method]["rows"]:
        if r["superclass"] == superclass and abs(r["budget"] - budget) <= 1e-6 * max(1.0, abs(budget)):
            return r["arch"]
    raise SearchError(f"{results_path}: method {method!r} has no scenario {superclass}@{budget:.6g}")

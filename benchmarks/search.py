"""Search benchmarks (not unit tests).

    python benchmarks/search.py latency [--repeats 200] [--threads 1 2]
        Time for the EAS generator to produce all scenarios of a 10-superclass x 5-budget grid on
        the default space, on CPU: G's forward pass alone, + sampling and decoding (mode
        candidate, redrawn while over budget), + snapping into the budget window. The EAS paper
        reports < 0.1 s for its generator and 3,474 s for OFA-T.

    python benchmarks/search.py quality --data data/prepared --supernet models/supernet.pt [--preset P]
        Every method on the same supernet and scenarios, with a larger search effort than the
        default DAG (overrides below), then the per-scenario table: supernet validation accuracy of
        the generator vs random vs OFA-T (and OFA-V, NSGA-II) at matched budgets.

Each writes benchmarks/results/search-<name>.json and its own "## Search: ..." section of
benchmarks/RESULTS.md (other sections are left alone).
"""
from __future__ import annotations

import argparse
import copy
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

# Search effort of the quality benchmark (the default DAG's is in params.yaml).
QUALITY_OVERRIDES = {
    "search": {
        "superclasses": None,
        "budgets": {"kind": "fraction", "values": [0.1, 0.3, 0.5, 0.7, 0.9]},
        "generator": {"steps": 600, "batch_size": 32, "bn_context": 32, "candidates": 4, "lr": 0.005},
        "random": {"samples": 10},
        "predictor": {"samples": 100, "epochs": 400},
        "evolution": {"population": 100, "generations": 30},
        "nsga2": {"population": 100, "generations": 30},
    },
}


def _stats(ts: list[float]) -> dict:
    ts = sorted(ts)
    return {"median_ms": round(1000 * statistics.median(ts), 4), "p90_ms": round(1000 * ts[int(0.9 * (len(ts) - 1))], 4),
            "min_ms": round(1000 * ts[0], 4), "runs": len(ts)}


# ---------------------------------------------------------------- latency
def _time_generator(gen, space, cost, scen, slack: float, max_tries: int, threads: list[int], repeats: int) -> dict:
    from tailor.search import Snapper, propose

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
                gen(sc, b)
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

    p = load_params(ROOT / "params.yaml")
    space = SearchSpace(p.space, p.data.image_size)
    n_sc, fractions = 10, [0.1, 0.3, 0.5, 0.7, 0.9]
    cfg = p.search.generator
    cases = []
    cost = madds_cost_model(space, 50)  # 10 superclasses x 5 classes
    low, high = cost.low_high
    torch.manual_seed(0)
    cases.append(("untrained", "random weights (outputs far from the budgets: the most snapping work)",
                  ArchGenerator(space, n_sc, low, high, cfg.embed_dim, cfg.hidden, cfg.anchors).eval(), cost, n_sc))
    if args.generator:
        from tailor.search.generator import load_generator

        g2, ck, sp2 = load_generator(args.generator)
        if sp2.cfg != space.cfg or sp2.image_size != space.image_size:
            raise SystemExit(f"{args.generator}: trained for another search space than params.yaml's")
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
           "budget_fractions": fractions, "space": "params.yaml space at 32x32", "generator_config": cfg.model_dump(),
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
             f"{res['budget_fractions']} of the MAdds range) produced in one call of `tailor.search.propose` "
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
def quality(args) -> dict:
    from tailor.config import load_params
    from tailor.search import run
    from tailor.search import propose
    from tailor.search.common import load_setup
    from tailor.search.generator import load_generator
    from tailor.space import Arch

    overrides = copy.deepcopy(QUALITY_OVERRIDES)
    overrides["runtime"] = {"threads": args.threads}
    if args.steps:
        overrides["search"]["generator"]["steps"] = args.steps
    p = load_params(ROOT / "params.yaml", args.preset or [], overrides)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    reused = []
    if args.reuse and (work / "predictor.pt").exists():
        ck = torch.load(work / "predictor.pt", weights_only=False)
        pred = {"quality": ck["quality"], "timing": ck["timing"]}
        reused.append("predictor")
    else:
        pred = run.run_predictor(p, args.data, args.supernet, work / "predictor.pt")
    for m in run.METHODS:
        if args.reuse and (work / f"{m}.json").exists():
            reused.append(m)
            continue
        run.run_search(p, m, args.data, args.supernet, work / f"{m}.json", work / "predictor.pt", work / "generator.pt")
    metrics = run.collect(p, [work / f"{m}.json" for m in run.METHODS], work / "results.json", work / "table.md",
                          work / "metrics.json")
    results = json.loads((work / "results.json").read_text())
    methods = results["methods"]
    setup = load_setup(p, args.data, args.supernet)
    # The same trained generator with as many candidates per scenario as random search measures per
    # budget: is G's distribution better than uniform at an equal number of measured candidates?
    k = p.search.random.samples
    name_k = f"generator-{k}cand"
    gen_model, _, _ = load_generator(work / "generator.pt")
    t1 = time.perf_counter()
    cands = propose(gen_model, setup.space, setup.cost, setup.snap, setup.scenarios, k, p.search.generator.max_tries,
                    1)
    rows = [setup.row(s, max(cs, key=lambda a, s=s: setup.evaluator.acc(a, s.superclass)), candidates=len(cs))
            for s, cs in zip(setup.scenarios, cands)]
    methods[name_k] = {"rows": rows, "timing": {"one_time_s": methods["generator"]["timing"]["one_time_s"],
                                                "scenarios_s": round(time.perf_counter() - t1, 3)}}
    # Test-split accuracy of the same picks: the generator and random search choose among candidates
    # by validation accuracy, so their validation figures carry a selection bias that test does not.
    t1 = time.perf_counter()
    for m in methods.values():
        for r in m["rows"]:
            r["test_acc"] = setup.evaluator.test_acc(Arch.parse(r["arch"]), r["superclass"])
    test_s = time.perf_counter() - t1
    paired = {}
    for split in ("val_acc", "test_acc"):
        gen = {(r["superclass"], r["budget"]): r[split] for r in methods["generator"]["rows"]}
        for name in (name_k, "random", "ofa-t", "ofa-v", "nsga2"):
            d = [gen[(r["superclass"], r["budget"])] - r[split] for r in methods[name]["rows"]]
            paired.setdefault(name, {})[split] = {
                "mean_diff": round(statistics.mean(d), 5), "wins": sum(x > 0 for x in d),
                "ties": sum(x == 0 for x in d), "losses": sum(x < 0 for x in d)}
    means = {name: {split: round(statistics.mean(r[split] for r in m["rows"]), 5) for split in ("val_acc", "test_acc")}
             for name, m in methods.items()}
    from tailor.utils import file_hash

    return {"benchmark": "search-quality", "data": str(args.data), "supernet": str(args.supernet),
            "supernet_sha256_16": file_hash(args.supernet), "data_meta_sha256_16": file_hash(Path(args.data) / "meta.json"),
            "presets": [str(x) for x in args.preset or []], "overrides": overrides,
            "generator_steps": p.search.generator.steps, "seconds": round(time.perf_counter() - t0, 1),
            "predictor": pred, "metrics": metrics, "means": means,
            "extra_methods": {name_k: methods[name_k]["timing"]}, "generator_vs": paired,
            "test_eval_s": round(test_s, 1), "reused": reused, "table": (work / "table.md").read_text(),
            "results": results}


def quality_markdown(res: dict, command: str) -> str:
    m = {**res["metrics"]["methods"], **res["extra_methods"]}
    reused = f"; method results reused from the run before: {', '.join(res['reused'])}" if res["reused"] else ""
    lines = [f"`{command}` — {res['date']} (code {res['code_version']}, load average at start {res['loadavg']}, "
             f"{res['seconds']:.0f} s in all{reused})", "",
             f"Supernet `{res['supernet']}` (sha256 {res['supernet_sha256_16']}...) on `{res['data']}` (meta.json "
             f"sha256 {res['data_meta_sha256_16']}...); search effort above the default DAG's: "
             f"`{json.dumps(res['overrides']['search'])}`. Accuracy predictor: "
             f"{json.dumps(res['predictor']['quality'])}.", "",
             "Validation accuracy is what every method optimises and reports; the generator and random search "
             "pick among candidates by it, so the test-split accuracy of the same picks (never used to choose) "
             "is shown too. `generator-Ncand` is the same trained generator sampling as many candidates per "
             "scenario as random search measures per budget (search.random.samples).", "",
             "| method | mean val acc | mean test acc | generator minus it, val (mean; wins / ties / losses) | "
             "generator minus it, test | one-time cost (s) | all scenarios (s) |", "|---|---|---|---|---|---|---|"]
    for name, v in m.items():
        vs = res["generator_vs"].get(name)
        cells = ["-", "-"] if vs is None else [
            f"{vs[k]['mean_diff']:+.4f}; {vs[k]['wins']} / {vs[k]['ties']} / {vs[k]['losses']}"
            for k in ("val_acc", "test_acc")]
        lines.append(f"| {name} | {res['means'][name]['val_acc']:.4f} | {res['means'][name]['test_acc']:.4f} | "
                     f"{cells[0]} | {cells[1]} | {v['one_time_s']:.1f} | {v['scenarios_s']:.3f} |")
    lines += ["", "Per scenario:", "", res["table"].strip(), "",
              "Figures: `benchmarks/results/search-quality.json`."]
    return "\n".join(lines)


def main() -> None:
    from tailor.utils import atomic_write_json, code_version

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("latency")
    a.add_argument("--repeats", type=int, default=200)
    a.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    a.add_argument("--generator", type=Path, help="a trained search/generator.pt (default: an untrained generator)")
    b = sub.add_parser("quality")
    b.add_argument("--data", type=Path, default=ROOT / "data" / "prepared")
    b.add_argument("--supernet", type=Path, default=ROOT / "models" / "supernet.pt")
    b.add_argument("--preset", type=Path, action="append")
    b.add_argument("--steps", type=int, help="generator training steps (default: the benchmark's override)")
    b.add_argument("--work", default="/tmp/tailor-search-bench")
    b.add_argument("--reuse", action="store_true",
                   help="keep the method results already in --work (from a run with the same arguments)")
    b.add_argument("--threads", type=int, default=1,
                   help="runtime.threads (1: on a shared 2-core machine two threads each run several times slower)")
    for sp in (a, b):
        sp.add_argument("--no-record", action="store_true", help="print only; leave benchmarks/results and RESULTS.md alone")
    args = ap.parse_args()
    command = "python benchmarks/search.py " + " ".join(sys.argv[1:])
    load = [round(x, 2) for x in os.getloadavg()]
    res = latency(args) if args.what == "latency" else quality(args)
    res.update(command=command, date=datetime.datetime.now().isoformat(timespec="seconds"),
               code_version=code_version(), loadavg=load)
    if args.what == "latency":
        heading, md = "Search: tailoring latency (generator, 10 superclasses x 5 budgets, CPU)", latency_markdown(res, command)
    else:
        heading, md = "Search: generator vs baselines (supernet validation accuracy)", quality_markdown(res, command)
    print(md)
    if not args.no_record:
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_json(RESULTS / f"search-{args.what}.json", res)
        upsert_section(RESULTS_MD, heading, md)


if __name__ == "__main__":
    main()

"""Retraining choices measured: init (inherit / scratch), data (superclass / all), epochs, learning rate.

    .venv/bin/python benchmarks/retrain.py --preset configs/tin-sc10-cpu.yaml --work runs/tin-cpu \\
        --scenarios 10 --variant inherit,superclass,3 --variant scratch,superclass,3 ...

A variant whose init is `stock:<name>` (e.g. stock:mobilenet_v3_small_w1,superclass,8) is the control:
the DAG's stock generalist <name> put through the same retraining for each scenario's superclass,
so a tailored net is also compared with a stock net that got the same extra training.

Needs a finished `benchmarks/dag.py` workspace (--work): its prepared data, supernet, stock models
and search results. Retrains the first --scenarios scenarios of the preset's retrain grid under every
--variant (init,data,epochs[,lr]; lr default: the preset's retrain.optim.lr) with the same stage function as the DAG (tailor.stages.retrain, in
--work/retrain-bench/), and compares each variant with the first one on the same test images:
mean test top-1 and the paired difference with a 95% bootstrap CI (tailor.stats).

Writes benchmarks/results/retrain-<name>.json and the "## Retrain choices: <name>" section of
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, RESULTS_MD, ROOT, upsert_section  # noqa: E402


def stock_control(p, data: Path, stock_path: Path, superclass: str, budget: float, work_dir: Path) -> dict:
    """A stock generalist from the DAG, fine-tuned by retrain's recipe (stages.finetune) for one
    superclass and scored as a retrained net is (its superclass's logits only, test hits per image)."""
    import torch

    from tailor import stages, stock
    from tailor.context import Context
    from tailor.train import autocast, evaluate
    from tailor.utils import file_hash, fingerprint, load_checkpoint, load_state

    ctx = Context(p, data)
    classes = ctx.meta.classes_of(ctx.meta.superclass_index(superclass))
    ck = load_checkpoint(stock_path, "stock model", ("state_dict",))
    model = next((m for m in p.stock.models if stock.name_of(m) == stock_path.stem), None)
    if model is None:
        raise SystemExit(f"{stock_path.stem}: not one of the preset's stock.models "
                         f"({', '.join(stock.name_of(m) for m in p.stock.models)})")
    torch.manual_seed(p.seed)
    net = stock.build(model, ctx.num_classes)
    load_state(net, ck["state_dict"], stock_path, "stock model")
    net = ctx.prepare_model(net)
    fp = fingerprint("stock-control", p.seed, p.augment.model_dump(), p.retrain.model_dump(), superclass,
                     file_hash(stock_path))
    res = stages.finetune(p, ctx, net, classes, work_dir, fp)
    net.eval()
    idx = torch.tensor(classes, device=ctx.device)
    with torch.no_grad(), autocast(ctx.device, p.runtime):
        val = evaluate(lambda xb: net(xb)[:, idx], ctx.batches("val"), ctx.meta, classes=classes)
        test = evaluate(lambda xb: net(xb)[:, idx], ctx.batches("test"), ctx.meta, classes=classes, per_image=True)
    return {"superclass": superclass, "budget": budget, "arch": stock_path.stem, "val_top1": val["sc_top1_mean"],
            "test_top1": test["sc_top1_mean"], "test_correct": test["correct"], "train_seconds": round(res.seconds, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", action="append", default=[])
    ap.add_argument("--work", required=True, help="a benchmarks/dag.py workspace")
    ap.add_argument("--name", default=None)
    ap.add_argument("--scenarios", type=int, default=10, help="how many scenarios of the retrain grid")
    ap.add_argument("--variant", action="append", required=True, help="init,data,epochs[,lr] (the first is the reference)")
    args = ap.parse_args(argv)

    from tailor import stages
    from tailor.config import load_params
    from tailor.data import Meta
    from tailor.stats import as_hits, paired_bootstrap
    from tailor.utils import atomic_write_json, code_version

    work = Path(args.work)
    base = load_params(ROOT / "params.yaml", [Path(x) for x in args.preset])
    name = args.name or (Path(args.preset[-1]).stem if args.preset else "default")
    data, supernet, search = work / "data" / "prepared", work / "models" / "supernet.pt", work / "search"
    scenarios = stages.retrain_scenarios(base, Meta.load(data))[:args.scenarios]
    variants = []
    for v in args.variant:
        init, what, epochs, *lr = v.split(",")
        variants.append({"init": init, "data": what, "epochs": int(epochs),
                         "optim": {"lr": float(lr[0]) if lr else base.retrain.optim.lr}})
    results = []
    for v in variants:
        p = load_params(ROOT / "params.yaml", [Path(x) for x in args.preset],
                        {"retrain": {**v, "init": "inherit" if v["init"].startswith("stock:") else v["init"]}})
        tag = f"{v['init']}-{v['data']}-{v['epochs']}" + ("" if v["optim"]["lr"] == base.retrain.optim.lr
                                                          else f"-lr{v['optim']['lr']:g}")
        rows, t0 = [], time.perf_counter()
        for sc, budget in scenarios:
            sid = stages.scenario_id(sc, budget)
            out = work / "retrain-bench" / tag / sid
            dag_metrics = work / "metrics" / "retrain" / f"{sid}.json"
            if v["init"].startswith("stock:"):
                rows.append(stock_control(p, data, work / "models" / "stock" / f"{v['init'][6:]}.pt", sc, budget,
                                          out / "work"))
                continue
            if p.retrain == base.retrain and dag_metrics.is_file():
                rows.append(json.loads(dag_metrics.read_text()))  # the DAG's own retrain, same params
                continue
            # retrain resumes from its fingerprinted checkpoint: a finished variant is only re-scored.
            rows.append(stages.retrain(p, data, supernet, sc, budget, stages.choose_arch(p, search, sc, budget),
                                       out / "model.pt", out / "metrics.json", out / "work"))
        results.append({**v, "tag": tag, "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
                        "mean_test_top1": sum(r["test_top1"] for r in rows) / len(rows),
                        "train_seconds": round(sum(r["train_seconds"] for r in rows), 1)})
    ref = results[0]
    for r in results:
        r["vs_first"] = paired_bootstrap([(as_hits(a["test_correct"]), as_hits(b["test_correct"]))
                                          for a, b in zip(r["rows"], ref["rows"])], seed=base.seed,
                                         keys=[a["superclass"] for a in r["rows"]])
    res = {"benchmark": "retrain", "name": name,
           "command": "python benchmarks/retrain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "code_version": code_version(),
           "scenarios": [f"{sc}@{b:g}" for sc, b in scenarios],
           "variants": [{k: v for k, v in r.items() if k != "rows"} | {"per_scenario": [
               {"scenario": f"{x['superclass']}@{x['budget']:g}", "test_top1": x["test_top1"]} for x in r["rows"]]}
               for r in results]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"retrain-{name}.json", res)
    lines = [f"`{res['command']}` — {res['date']} (code {res['code_version']}); {len(scenarios)} scenarios "
             f"({', '.join(res['scenarios'])}), the architectures the DAG's search chose, test top-1 over each "
             "scenario's superclass. Difference: against the first variant, paired over the same test images, "
             "95% bootstrap CI." + (" An init `stock:<name>` is the control: the DAG's stock generalist <name> put "
                                    "through the same retraining for each scenario's superclass."
                                    if any(v["init"].startswith("stock:") for v in variants) else ""), "",
             "| init | data | epochs | lr | mean test top-1 | vs first (pts) | retrain s (all scenarios) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["vs_first"]
        lines.append(f"| {r['init']} | {r['data']} | {r['epochs']} | {r['optim']['lr']:g} | {100 * r['mean_test_top1']:.1f}% | "
                     f"{100 * c['diff']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}] | {r['train_seconds']} |")
    upsert_section(RESULTS_MD, f"Retrain choices: {name}", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

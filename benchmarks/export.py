"""Export benchmark: retrain the scenarios of params.yaml with retrain.data 'superclass' and 'all',
export every network, and record per model the ONNX parity error, onnxruntime CPU latency at
batch 1 and 32, and test accuracy (PyTorch at retrain, onnxruntime on the exported file).

    .venv/bin/python benchmarks/export.py --data data/prepared --supernet models/supernet.pt

Architectures: the scenario's explicit arch, else the search's pick (search/results.json); with
neither, the largest of --fallback-samples seeded random architectures within the budget (said so
in the results). Latency runs --rounds times (each a full `export` stage with --repeats timed
calls per batch size, after waiting for the 1-minute load to drop under --quiet-load); the
reported figure is the median over rounds of each round's median.

Writes benchmarks/results/export.json and the "## Export: parity, onnxruntime CPU latency,
retrain data" section of benchmarks/RESULTS.md (other sections are left alone).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

HEADING = "Export: parity, onnxruntime CPU latency, retrain data"
MODES = ("superclass", "all")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, RESULTS_MD, ROOT, upsert_section, wait_for_quiet  # noqa: E402


def pick_arch(p, data_dir: Path, search_dir: Path, superclass: str, budget: float, samples: int):
    """(arch, where it came from) for one scenario."""
    from tailor import stages
    from tailor.data import Meta
    from tailor.space import SearchSpace

    try:
        arch = stages.choose_arch(p, search_dir, superclass, budget)
        explicit = any(s.arch and s.superclass == superclass and s.budget == budget for s in p.retrain.scenarios)
        return arch, "retrain.scenarios" if explicit else f"search ({p.retrain.method})"
    except FileNotFoundError:
        pass
    meta = Meta.load(data_dir)
    space = SearchSpace(p.space, meta.image_size)
    n_cls = len(meta.classes_of(meta.superclass_index(superclass)))
    rng = random.Random(p.seed)
    best = None
    for _ in range(samples):
        a = space.sample(rng)
        m = space.madds(a, n_cls)
        if m <= budget and (best is None or m > best[1]):
            best = (a, m)
    if best is None:
        raise SystemExit(f"no random architecture within {superclass}@{budget:g}: give retrain.scenarios an arch")
    return best[0], f"largest of {samples} seeded random archs within budget (no search results)"


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"`{res['command']}` — {res['date']}, code {res['code_version']}",
        "",
        f"Data `{res['data']}` ({res['data_source']}, {res['image_size']}x{res['image_size']}; prepared with "
        f"{json.dumps(res['data_params'])}), supernet "
        f"`{res['supernet']}`; retrain init **{res['retrain']['init']}**, {res['retrain']['epochs']} epochs, "
        f"batch {res['retrain']['optim']['batch_size']}, device {res['device']}. onnxruntime "
        f"{m['onnxruntime']} CPU, {res['threads']} intra-op thread(s), {m['cpu_count']} cores; latency = median "
        f"over {res['rounds']} rounds of the median of {res['repeats']} timed calls (preempted calls dropped). "
        f"Load average at start {m['loadavg_start']}, at end {m['loadavg_end']}"
        f" (waited for <= {res['quiet_load']}: {'reached' if res['quiet'] else 'NOT reached'}).",
        "",
        "| model | arch source | MAdds | retrain data | test top-1 (PyTorch) | test top-1 (ONNX) | parity max abs "
        "| ORT b1 ms | ORT b32 ms | ONNX KiB | retrain s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in res["scenarios"]:
        for mode in MODES:
            r = s["by_data"][mode]
            lines.append(
                f"| {s['model']} | {s['arch_source']} | {s['madds'] / 1e6:.2f}M | {mode} | {r['test_top1']:.4f} "
                f"| {r['onnx_test_top1']:.4f} | {r['parity_max_abs']:.1e} | {r['ort_ms']['batch_1']:.3f} "
                f"| {r['ort_ms']['batch_32']:.3f} | {r['onnx_bytes'] / 1024:.0f} | {r['train_seconds']:.0f} |")
    d = res["data_mode_delta"]
    lines += ["", f"retrain.data 'all' minus 'superclass', test top-1 over the scenarios: mean {d['mean']:+.4f} "
                  f"(per scenario {', '.join(f'{x:+.4f}' for x in d['per_scenario'])}); test images per "
                  f"scenario: {', '.join(str(s['test_images']) for s in res['scenarios'])}. At equal epochs "
                  "'superclass' takes one superclass's share of the optimizer steps of 'all' (and of the time); "
                  "both recompute BN statistics on their training data after training.",
              f"Full results: `{res['results_file']}`."]
    return "\n".join(lines)



def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--preset", action="append", default=[])
    ap.add_argument("--data", default=str(ROOT / "data" / "prepared"))
    ap.add_argument("--supernet", default=str(ROOT / "models" / "supernet.pt"))
    ap.add_argument("--search-dir", default=str(ROOT / "search"))
    ap.add_argument("--work", default="/tmp/tailor-bench-export", help="checkpoints and repositories go here")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for the latency figures")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fallback-samples", type=int, default=2000)
    ap.add_argument("--quiet-load", type=float, default=1.5)
    ap.add_argument("--results", default=str(RESULTS / "export.json"))
    ap.add_argument("--markdown", default=str(RESULTS_MD), help="the RESULTS.md whose section is rewritten")
    ap.add_argument("--wait-max", type=float, default=900)
    args = ap.parse_args(argv)

    import onnxruntime
    import torch

    from tailor import stages
    from tailor.config import load_params
    from tailor.data import Meta
    from tailor.export import triton_model_name
    from tailor.space import Arch
    from tailor.train import resolve_device
    from tailor.utils import atomic_write_json, code_version

    work = Path(args.work)
    overrides = {"export": {"intra_op_threads": args.threads, "latency_batch_sizes": [1, 32],
                            "latency_repeats": args.repeats, "latency_warmup": args.warmup}}
    base = load_params(args.params, args.preset, overrides)
    meta = Meta.load(args.data)
    command = "python benchmarks/export.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load_start = [round(x, 2) for x in os.getloadavg()]

    scenarios, quiet_rounds = [], []
    for s in base.retrain.scenarios:
        arch, source = pick_arch(base, Path(args.data), Path(args.search_dir), s.superclass, s.budget,
                                 args.fallback_samples)
        scenarios.append({"superclass": s.superclass, "budget": s.budget, "arch": str(arch), "arch_source": source})

    for mode in MODES:
        p = base.model_copy(update={"retrain": base.retrain.model_copy(update={"data": mode})})
        models = []
        for s in scenarios:
            sid = stages.scenario_id(s["superclass"], s["budget"])
            out = work / mode / sid / "model.pt"
            t0 = time.perf_counter()
            m = stages.retrain(p, Path(args.data), Path(args.supernet), s["superclass"], s["budget"],
                               Arch.parse(s["arch"]), out, work / mode / sid / "metrics.json", work / mode / sid / "run")
            s.setdefault("by_data", {})[mode] = {"test_top1": m["test_top1"], "val_top1": m["val_top1"], "train_seconds": m["train_seconds"],
                       "wall_seconds": round(time.perf_counter() - t0, 1)}
            s["madds"] = m["madds"]
            models.append(out)
        rounds = []
        for r in range(args.rounds):
            quiet, waited = wait_for_quiet(args.quiet_load, args.wait_max)
            em = stages.export(p, models, Path(args.data), work / mode / "triton", work / mode / f"export-{r}.json")
            rounds.append(em)
            quiet_rounds.append(quiet)
        for s in scenarios:
            name = triton_model_name(s["superclass"], s["budget"], stages.budget_unit(p))
            per_round = [em["models"][name] for em in rounds]
            first = per_round[0]
            s["model"] = name
            s["test_images"] = first["test_images"]
            s["by_data"][mode].update({
                "parity_max_abs": max(e["parity_max_abs"] for e in per_round),
                "onnx_test_top1": first["onnx_test_top1"], "onnx_bytes": first["onnx_bytes"],
                "ort_ms": {k: statistics.median(e["ort_cpu_latency_ms"][k] for e in per_round)
                           for k in first["ort_cpu_latency_ms"]},
                "ort_ms_rounds": {k: [e["ort_cpu_latency_ms"][k] for e in per_round] for k in first["ort_cpu_latency_ms"]},
            })
    delta = [s["by_data"]["all"]["test_top1"] - s["by_data"]["superclass"]["test_top1"] for s in scenarios]
    res = {
        "benchmark": "export", "command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "results_file": _shown(Path(args.results)),
        "code_version": code_version(), "data": args.data, "data_source": meta.source, "image_size": meta.image_size,
        "data_params": json.loads((Path(args.data) / "meta.json").read_text())["params"]["data"].get("synthetic"),
        "supernet": args.supernet, "device": str(resolve_device(base.runtime)),
        "retrain": base.retrain.model_dump(mode="json", exclude={"scenarios", "data"}),
        "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "rounds": args.rounds,
        "quiet_load": args.quiet_load, "quiet": all(quiet_rounds),
        "machine": {"cpu_count": os.cpu_count(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                    "loadavg_start": load_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "scenarios": scenarios,
        "data_mode_delta": {"per_scenario": delta, "mean": statistics.mean(delta)},
    }
    atomic_write_json(Path(args.results), res)
    upsert_section(Path(args.markdown), HEADING, markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()

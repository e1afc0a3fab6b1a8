"""Latency LUT accuracy on this machine: profile, calibrate, report held-out error.

    .venv/bin/python benchmarks/latency.py --target cpu-ort --target cpu-torch

Uses params.yaml's space at its data.image_size, with more calibration / held-out subnets and more
repetitions than the DAG's profile-latency stage. Waits (up to --wait-max seconds) for the 1-minute
load average to drop under --quiet-load first, because other people's jobs on a shared machine
inflate and scatter every timing; the load at start and end is recorded either way.

Writes benchmarks/results/latency-<target>.json (summary + the full LUT) and .png, and the
"## Latency LUT: <target>" section of benchmarks/RESULTS.md (other sections are left alone).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, RESULTS_MD, ROOT, upsert_section, wait_for_quiet  # noqa: E402


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def prediction_speed(lut: dict, n: int = 5000, seed: int = 0) -> dict:
    """How fast the calibrated table answers: cost(arch) on random archs (what evolution calls
    thousands of times), and cost_gates forward + backward on relaxed gates (the generator's
    budget term), each the median over calls."""
    import random
    import statistics

    import torch

    from tailor.latency import latency_model, lut_space
    from tailor.supernet import Gates

    model, space = latency_model(lut), lut_space(lut)
    rng = random.Random(seed)
    archs = [space.sample(rng) for _ in range(n)]
    per_arch = []
    for a in archs:
        t = time.perf_counter_ns()
        model.cost(a)
        per_arch.append(time.perf_counter_ns() - t)
    g = Gates.from_arch(space, space.mid_arch)
    relaxed = [torch.full_like(x, 0.5, requires_grad=True) for x in (g.depth, g.kernel, g.expand)]
    per_grad = []
    for _ in range(200):
        t = time.perf_counter_ns()
        model.cost_gates(*relaxed).backward()
        per_grad.append(time.perf_counter_ns() - t)
    return {"cost_us_median": round(statistics.median(per_arch) / 1e3, 2), "cost_calls": n,
            "cost_gates_fwd_bwd_us_median": round(statistics.median(per_grad) / 1e3, 1), "cost_gates_calls": 200}


def markdown(res: dict) -> str:
    lut, v = res["lut"], res["lut"]["validation"]
    t, pr, m = lut["target"], lut["protocol"], lut["machine"]
    rows = ["| statistic | " + " | ".join(f"{meth} median / p90" for meth in v["by_statistic"]["median"]) + " |",
            "|---|" + "---|" * len(v["by_statistic"]["median"])]
    for st, by in v["by_statistic"].items():
        rows.append(f"| {st} | " + " | ".join(f"{pct(e['median'])} / {pct(e['p90'])}" for e in by.values()) + " |")
    held = lut["networks"]["held_out"]
    return "\n".join([
        f"`{res['command']}` — {res['date']}",
        "",
        f"Target **{lut['target_name']}**: {t['runtime']} on {t['device']} ({m['cpu']}, {m['cpu_count']} cores"
        + (f", {m['gpu']}" if m.get("gpu") else "") + f"), {t['dtype']}, batch {t['batch_size']}, "
        f"{t['threads']} threads; space of params.yaml at {lut['image_size']}x{lut['image_size']}, "
        f"{lut['num_classes']} classes; {len(lut['entries'])} table entries.",
        f"Protocol: {pr['warmup']} warm-up + {pr['repeats']} timed calls per item per round, {pr['rounds']} "
        f"interleaved rounds; entry = {pr['entry']}. Versions: torch {lut['versions']['torch']}, "
        f"onnxruntime {lut['versions']['onnxruntime']}, python {lut['versions']['python']}.",
        f"Load average (1/5/15 min) at start {m['loadavg_start']}, at end {m['loadavg_end']}"
        f" (waited {res['waited_s']:.0f}s for load <= {res['quiet_load']}: {'reached' if res['quiet'] else 'NOT reached'});"
        f" {100 * res['clean_fraction']:.0f}% of timed calls ran without preemption.",
        f"Measured whole subnets: {min(r['measured_ms'] for r in held):.3f} to {max(r['measured_ms'] for r in held):.3f} ms"
        f" (held-out). Plain sum of entries vs measured: mean signed error {pct(v['plain_sum']['mean_signed'])}.",
        "",
        f"**Held-out error |predicted - measured| / measured over {v['held_out_archs']} random subnets "
        f"(calibration on {v['calibration_archs']} others incl. min and max), {v['method']} calibration, "
        f"{v['statistic']}: median {pct(v['held_out']['median'])}, p90 {pct(v['held_out']['p90'])}** "
        f"(plain sum: median {pct(v['plain_sum']['median'])}, p90 {pct(v['plain_sum']['p90'])}).",
        "",
        "All methods and statistics from the same calls (held-out median / p90):",
        "",
        *rows,
        "",
        f"Prediction: `cost(arch)` {res['prediction']['cost_us_median']} µs per architecture (median of "
        f"{res['prediction']['cost_calls']} random ones); differentiable `cost_gates` forward + backward "
        f"{res['prediction']['cost_gates_fwd_bwd_us_median']} µs (median of {res['prediction']['cost_gates_calls']}).",
        "",
        f"Figures: `benchmarks/results/latency-{lut['target_name']}.json`, plot "
        f"`benchmarks/results/latency-{lut['target_name']}.png`.",
    ])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", action="append", required=True, help="name in latency.targets (repeatable)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--image-size", type=int, default=None, help="default: params data.image_size")
    ap.add_argument("--num-classes", type=int, default=None, help="default: the synthetic data's class count")
    ap.add_argument("--calibration-archs", type=int, default=30)
    ap.add_argument("--held-out-archs", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--statistic", default=None, help="default: params latency.protocol.statistic")
    ap.add_argument("--calibration", default=None, help="method; default: params latency.calibration")
    ap.add_argument("--quiet-load", type=float, default=1.0)
    ap.add_argument("--wait-max", type=float, default=1800)
    args = ap.parse_args(argv)

    from tailor import latency
    from tailor.config import LatencyProtocol, load_params
    from tailor.latency_plot import plot_predicted_vs_measured
    from tailor.space import SearchSpace
    from tailor.utils import atomic_write_json, code_version

    p = load_params(args.params)
    for name in args.target:
        latency.get_target(p.latency, name)
    cfg = p.latency.model_copy(update={"calibration": args.calibration or p.latency.calibration})
    image_size = args.image_size or p.data.image_size
    num_classes = args.num_classes or p.data.synthetic.superclasses * p.data.synthetic.classes_per_superclass
    protocol = LatencyProtocol(warmup=args.warmup, repeats=args.repeats, rounds=args.rounds,
                               discard_preempted=p.latency.protocol.discard_preempted,
                               statistic=args.statistic or p.latency.protocol.statistic)
    space = SearchSpace(p.space, image_size)
    command = "python benchmarks/latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.target:
        quiet, waited = wait_for_quiet(args.quiet_load, args.wait_max)
        lut = latency.profile(cfg, name, space, num_classes, protocol=protocol, n_cal=args.calibration_archs,
                              n_held=args.held_out_archs)
        nets = lut["networks"]["calibration"] + lut["networks"]["held_out"]
        clean = sum(r["clean_calls"] for r in [*lut["entries"].values(), *nets]) / sum(
            r["calls"] for r in [*lut["entries"].values(), *nets])
        res = {"benchmark": "latency", "command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "code_version": code_version(), "quiet_load": args.quiet_load, "quiet": quiet, "waited_s": round(waited),
               "clean_fraction": clean, "summary": latency.summary(lut), "prediction": prediction_speed(lut),
               "lut": lut}
        atomic_write_json(RESULTS / f"latency-{name}.json", res)
        plot_predicted_vs_measured(lut, RESULTS / f"latency-{name}.png")
        upsert_section(RESULTS_MD, f"Latency LUT: {name}", markdown(res))
        print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()

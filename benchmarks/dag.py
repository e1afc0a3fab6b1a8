"""The whole DAG on a preset, stage by stage, timed: the real-data proof run.

    .venv/bin/python benchmarks/dag.py --preset configs/tin-sc10-cpu.yaml --work runs/tin-cpu

Calls the same stage functions, in the same order, as `dvc repro` (prepare-data, train-teacher,
train-supernet, train-stock, profile-latency, search-*, retrain per scenario, export, serve-check,
report), with outputs laid out as in the DVC workspace under --work. Unlike dvc.yaml's foreach,
retrain.scenarios may leave superclass null (every superclass), so a preset need not name a
dataset's superclasses. A stage is skipped when it finished under the same params as dvc.yaml
lists for it and the same versions of the stages it reads from (as `dvc repro` decides; delete
--work/done/<stage>.json to redo one), and
the training stages resume from their checkpoints, so a killed run continues when started again.

Writes benchmarks/results/dag-<name>.json (stage wall times, the report's summary), copies the
report, its pictures and every stage's metrics to benchmarks/results/dag-<name>/, and rewrites the "## DAG: <name>"
section of benchmarks/RESULTS.md with the headline table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, RESULTS_MD, ROOT, upsert_section  # noqa: E402

SEARCH_METHODS = ("generator", "random", "evolution", "nsga2")


def run(p, work: Path) -> dict:
    """Every stage in DAG order; returns ({stage: wall seconds}, the stages skipped as done earlier,
    whose seconds are those recorded when they ran)."""
    from tailor import stages
    from tailor.data import Meta
    from tailor.utils import atomic_write_json, fingerprint

    dump = p.model_dump(mode="json")
    legacy = fingerprint(dump)
    declared = stage_params()
    done_dir = work / "done"
    seconds: dict[str, float] = {}
    skipped: list[str] = []
    keys: dict[str, str] = {}

    def stage(name: str, fn, *args, after: tuple[str, ...] = (), **kwargs):
        keys[name] = key = fingerprint(params_subset(dump, declared.get(name.split("@")[0])),
                                       [keys[a] for a in after])
        marker = done_dir / f"{name}.json"
        done = json.loads(marker.read_text()) if marker.is_file() else {}
        if done.get("params") == legacy:
            # Written when a marker keyed on all params: this stage ran under exactly these params.
            done["params"] = key
            atomic_write_json(marker, done)
        if done.get("params") == key:
            seconds[name] = done["seconds"]  # as measured when it ran
            skipped.append(name)
            print(f"== {name}: done earlier", flush=True)
            return
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        seconds[name] = round(time.perf_counter() - t0, 1)
        atomic_write_json(marker, {"params": key, "seconds": seconds[name]})

    data, metrics, search = work / "data" / "prepared", work / "metrics", work / "search"
    teacher, supernet = work / "models" / "teacher.pt", work / "models" / "supernet.pt"
    stage("prepare-data", stages.prepare_data, p, data, metrics / "data.json")
    stage("train-teacher", stages.train_teacher, p, data, teacher, metrics / "teacher.json", work / "runs" / "train-teacher",
          after=("prepare-data",))
    stage("train-supernet", stages.train_supernet, p, data, teacher, supernet, metrics / "supernet.json",
          work / "runs" / "train-supernet", after=("prepare-data", "train-teacher"))
    stage("train-stock", stages.train_stock, p, data, work / "models" / "stock", metrics / "stock.json",
          work / "runs" / "train-stock", after=("prepare-data",))
    stage("profile-latency", stages.profile_latency, p, data, work / "latency", metrics / "latency.json",
          after=("prepare-data",))
    trained = ("prepare-data", "train-supernet", "profile-latency")  # a latency budget reads the LUT
    stage("search-predictor", stages.search_predictor, p, data, supernet, search / "predictor.pt", after=trained)
    for m in SEARCH_METHODS:
        stage(f"search-{m}", stages.search, p, m, data, supernet, search / f"{m}.json", search / "predictor.pt",
              search / "generator.pt" if m == "generator" else None,
              after=trained + (("search-predictor",) if m == "evolution" else ()))
    stage("search-collect", stages.search_collect, p, [search / f"{m}.json" for m in SEARCH_METHODS],
          search / "results.json", search / "table.md", metrics / "search.json",
          after=tuple(f"search-{m}" for m in SEARCH_METHODS))
    models = []
    for sc, budget in stages.retrain_scenarios(p, Meta.load(data)):
        sid = stages.scenario_id(sc, budget)
        models.append(work / "retrain" / sid / "model.pt")
        stage(f"retrain@{sid}", lambda sc=sc, budget=budget, sid=sid: stages.retrain(
            p, data, supernet, sc, budget, stages.choose_arch(p, search, sc, budget), work / "retrain" / sid / "model.pt",
            metrics / "retrain" / f"{sid}.json", work / "runs" / "retrain" / sid),
            after=("prepare-data", "train-supernet", "search-collect"))
    retrains = tuple(k for k in keys if k.startswith("retrain@"))
    stage("export", stages.export, p, models, data, work / "triton", metrics / "export.json", work / "onnx",
          after=("prepare-data",) + retrains)
    stage("serve-check", stages.serve_check, p, work / "triton", data, metrics / "serve.json",
          after=("prepare-data", "export"))
    stage("report", stages.report, p, metrics, search / "table.md", work / "reports" / "report.md",
          metrics / "report.json", work / "latency", search / "results.json", work / "reports" / "plots",
          after=tuple(keys))
    return seconds, skipped


def stage_params() -> dict[str, list[str] | None]:
    """dvc.yaml's params list per stage (a foreach stage under its own name)."""
    import yaml

    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: s.get("do", s).get("params") for name, s in doc.items()}


def params_subset(dump: dict, keys: list[str] | None) -> dict:
    """The params a stage declares ({dotted key: value}); as in DVC, a stage that declares none
    reruns only when a stage it reads from does."""
    if keys is None:
        return {}
    out = {}
    for k in keys:
        v = dump
        for part in k.split("."):
            v = v[part]
        out[k] = v
    return out


def headline_markdown(report_md: str) -> str:
    """The report's headline section (its table and mean lines), without its own heading."""
    lines = report_md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## Headline"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start + 1:end]).strip()


def section_markdown(report_md: str, prefix: str) -> str:
    lines = report_md.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(prefix)), None)
    if start is None:
        return ""
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end]).strip().replace("## ", "### ", 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", action="append", default=[], help="overlay(s) over params.yaml, in order")
    ap.add_argument("--work", required=True, help="the run's workspace (resumable)")
    ap.add_argument("--name", default=None, help="results name; default: the last preset's stem")
    args = ap.parse_args(argv)

    import torch

    from tailor.config import load_params
    from tailor.utils import atomic_write_json, code_version

    p = load_params(ROOT / "params.yaml", [Path(x) for x in args.preset])
    name = args.name or (Path(args.preset[-1]).stem if args.preset else "default")
    work = Path(args.work)
    load_start = [round(v, 2) for v in os.getloadavg()]
    t0 = time.perf_counter()
    seconds, skipped = run(p, work)
    total = round(time.perf_counter() - t0, 1)
    report_md = (work / "reports" / "report.md").read_text()
    out_dir = RESULTS / f"dag-{name}"
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(work / "reports", out_dir)
    shutil.copytree(work / "metrics", out_dir / "metrics")  # every stage's figures, per image where kept
    res = {"benchmark": "dag", "name": name,
           "command": "python benchmarks/dag.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "code_version": code_version(),
           "cpu_threads": torch.get_num_threads(), "loadavg_start": load_start,
           "loadavg_end": [round(v, 2) for v in os.getloadavg()],
           "seconds": seconds, "total_seconds_this_invocation": total,
           "stage_seconds_sum": round(sum(seconds.values()), 1), "skipped_as_done": skipped,
           "summary": json.loads((work / "metrics" / "report.json").read_text()),
           "params": p.model_dump(mode="json")}
    atomic_write_json(RESULTS / f"dag-{name}.json", res)
    body = [f"`{res['command']}` — {res['date']} (code {res['code_version']}, {res['cpu_threads']} CPU threads, "
            f"load average at start {load_start}, at end {res['loadavg_end']}).", "",
            f"Whole DAG: {res['stage_seconds_sum']} s of stages ({res['stage_seconds_sum'] / 60:.1f} min)"
            + (f"; timed when an earlier invocation ran them: {', '.join(skipped)}" if skipped else "")
            + ". Per stage: "
            + ", ".join(f"{k} {v} s" for k, v in seconds.items()) + ".", "",
            headline_markdown(report_md), "",
            section_markdown(report_md, "## Stock anchors"), "",
            f"Full report: [results/dag-{name}/report.md](results/dag-{name}/report.md); "
            f"figures: `benchmarks/results/dag-{name}.json`."]
    upsert_section(RESULTS_MD, f"DAG: {name}", "\n".join(body))
    print(json.dumps({"seconds": seconds, "headline": res["summary"].get("headline")}, indent=1))


if __name__ == "__main__":
    main()

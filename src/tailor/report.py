"""The report stage: one Markdown page (and a metrics summary) from every stage's metrics files.

It only reads what the stages wrote; a stage whose metrics are absent is listed as not run, so
the report also works for partial DAGs (e.g. `dvc repro train-supernet` then `tailor report`).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _scalars(d: dict, prefix: str = "") -> list[list]:
    """Flatten the scalar leaves of a metrics dict (lists and long histories left out)."""
    rows = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows += _scalars(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) or (isinstance(v, str) and len(v) < 80):
            rows.append([f"{prefix}{k}", round(v, 5) if isinstance(v, float) else v])
    return rows


def subnet_section(title: str, m: dict) -> tuple[str, dict]:
    rows, summary = [], {}
    for name, s in m["subnets"].items():
        rows.append([name, s["madds_m"], _pct(s["val_sc_top1_mean"]), _pct(s["test_sc_top1_mean"]),
                     _pct(s["test_top1"]), s["test_images_per_s"]])
        summary[name] = {"madds_m": s["madds_m"], "test_sc_top1_mean": s["test_sc_top1_mean"]}
    text = [f"## {title}", f"{m['epochs']} epochs, {m['train_seconds']} s of training on {m['device']}.", "",
            _table(["subnet", "MAdds (M)", "val sc-top-1", "test sc-top-1", "test all-class top-1", "test images/s"],
                   rows)]
    ordered = sorted(summary.values(), key=lambda s: s["madds_m"])
    if len(ordered) > 1:
        accs = [s["test_sc_top1_mean"] for s in ordered]
        monotone = all(a < b for a, b in zip(accs, accs[1:]))
        text += ["", f"Larger subnets are {'' if monotone else 'NOT '}more accurate here "
                     f"(test superclass-restricted top-1 {' < '.join(_pct(a) for a in accs)} by MAdds)."]
        summary["larger_is_more_accurate"] = monotone
    return "\n".join(text), summary


def _pts(c: dict) -> str:
    """A difference in points with its CI, e.g. '+3.2 [+0.4, +6.0]'."""
    return f"{100 * c['diff']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]"


def stock_section(stock: dict, supernet: dict | None) -> tuple[str, dict]:
    """The stock anchors, and each supernet subnet beside the best of them at <= its MAdds."""
    from tailor.headline import subnet_rows

    rows = [[n, f"{m['madds'] / 1e6:.2f}", f"{m['params'] / 1e6:.2f}", m["epochs"], _pct(m["val_sc_top1_mean"]),
             _pct(m["test_sc_top1_mean"]), _pct(m.get("test_top1")),
             m.get("ort_cpu_latency_ms", {}).get("batch_1", "-"), m["train_seconds"]]
            for n, m in stock["models"].items()]
    text = ["## Stock anchors (torchvision MobileNetV3, same loop, data and augmentation)",
            f"{stock['epochs']} epochs each (>= the teacher's and supernet's together), {stock['seconds']} s in all "
            f"on {stock['device']}. MAdds with the all-class classifier; onnxruntime CPU latency at batch 1 "
            "timed as `tailor export` times the tailored nets.", "",
            _table(["network", "MAdds (M)", "params (M)", "epochs", "val sc-top-1", "test sc-top-1",
                    "test all-class top-1", "ort ms (b=1)", "train s"], rows)]
    summary = {"models": {n: {"madds": m["madds"], "test_sc_top1_mean": m["test_sc_top1_mean"]}
                          for n, m in stock["models"].items()}}
    if stock.get("specialists"):
        sp = stock["specialists"]
        text += ["", f"Specialists: one {next(iter(sp.values()))['arch']} w{next(iter(sp.values()))['width']:g} per "
                     f"superclass, trained on its images alone for {stock['specialist_epochs']} epochs; mean test "
                     f"top-1 {_pct(sum(m['test_sc_top1_mean'] for m in sp.values()) / len(sp))}: "
                     + ", ".join(f"{sc} {_pct(m['test_sc_top1_mean'])}" for sc, m in sp.items()) + "."]
        summary["specialists_mean"] = sum(m["test_sc_top1_mean"] for m in sp.values()) / len(sp)
    if supernet:
        srows, sub = [], {}
        for r in subnet_rows(stock, supernet):
            st = r.get("stock")
            srows.append([r["subnet"], f"{r['madds'] / 1e6:.2f}", _pct(r["test_top1"]),
                          st["name"] if st else "none at <= MAdds", f"{st['madds'] / 1e6:.2f}" if st else "-",
                          _pct(st["test_top1"]) if st else "-", _pts(st) if st else "-"])
            sub[r["subnet"]] = st and {k: st[k] for k in ("name", "diff", "lo", "hi")}
        text += ["", "Supernet subnets (BN recalibrated, no retraining) against the best stock generalist (by val) "
                     "at <= their MAdds; difference in points, 95% paired bootstrap CI over test images:", "",
                 _table(["subnet", "MAdds (M)", "test sc-top-1", "best stock at <= MAdds", "its MAdds (M)",
                         "its test sc-top-1", "subnet - stock (pts)"], srows)]
        summary["subnets_vs_stock"] = sub
    return "\n".join(text), summary


def headline_section(stock: dict, retrains: list[dict], export: dict | None) -> tuple[str, dict] | None:
    """Every retrained scenario beside the best stock net at <= its MAdds and at <= its latency."""
    from tailor.headline import summary as compare

    res = compare(stock, retrains, export)
    if not res["rows"]:
        return None
    rows = []
    for r in res["rows"]:
        m, lat, sp = r.get("stock_madds"), r.get("stock_latency"), r.get("specialist")
        eq = r.get("stock_equal_cost")
        rows.append([r["superclass"], f"{r['budget']:g}", f"{r['madds'] / 1e6:.2f}", _pct(r["test_top1"]),
                     f"{m['name']} ({m['madds'] / 1e6:.2f}M, {_pct(m['test_top1'])})" if m else "none at <= MAdds",
                     _pts(m) if m else "-", f"{m['cost_ratio']:.2f}" if m else "-",
                     f"{eq['name']} ({eq['madds'] / 1e6:.2f}M): {_pts(eq)}" if eq else "-",
                     f"{lat['name']} ({lat['latency_ms']:.3f} ms, {_pct(lat['test_top1'])})" if lat else "-",
                     _pts(lat) if lat else "-",
                     _pts(sp) if sp else "-"])
    text = ["## Headline: tailored networks vs stock MobileNetV3",
            "Each retrained scenario (classifier over its superclass) against the stock generalist with the best "
            "validation accuracy among those at <= its MAdds (classifier sliced to the superclass, as deployed) "
            "and at <= its measured onnxruntime latency (batch 1, this machine), and against the superclass's "
            "specialist. Differences: tailored - stock test top-1 in points, [95% paired bootstrap CI over the "
            "superclass's test images]. Cost ratio: tailored MAdds / stock MAdds. Also the dearest stock net at "
            "<= its MAdds (the same cost class), which need not be the best one.", "",
            _table(["superclass", "budget", "MAdds (M)", "tailored test top-1", "best stock at <= MAdds",
                    "diff (pts)", "cost ratio", "dearest stock at <= MAdds: diff (pts)", "best stock at <= latency",
                    "diff (pts)", "vs specialist (pts)"], rows), ""]
    for key, label in (("stock_madds", "best stock at <= MAdds"), ("stock_equal_cost", "dearest stock at <= MAdds"),
                       ("stock_latency", "best stock at <= latency"), ("specialist", "the specialist")):
        o = res[key]
        if o:
            text.append(f"- Mean over {o['scenarios']} scenarios, tailored - {label}: **{_pts(o)}** points "
                        f"(wins / losses with the scenario's CI excluding 0: {o['wins']} / {o['losses']}"
                        + ("; the CI includes 0: a tie" if o["lo"] <= 0 <= o["hi"] else "") + ").")
    return "\n".join(text), {k: res[k] and {kk: res[k][kk] for kk in ("diff", "lo", "hi", "scenarios", "wins", "losses")}
                             for k in ("stock_madds", "stock_equal_cost", "stock_latency", "specialist")}


WITHIN = 0.05  # a deployed net's measured latency should be within 5% of its LUT prediction


def latency_section(export: dict, lut_dir: Path) -> tuple[str, dict] | None:
    """The chosen (exported) networks' latency: predicted by each LUT of lut_dir, beside the exported
    ONNX file timed by the export stage under the same target's conditions and protocol
    (tailor.latency.measure_deployed: session options, batch size, interleaved rounds, statistic).

    The LUT's fixed parts and calibration nets are the deployed form (uint8 input and normalisation,
    the widest superclass's classifier, probs), so the prediction describes the served artifact.
    Nets searched under a latency budget (budget_unit "ms") are also checked against budget + 5%.
    Export measures the machine it runs on: the target's machine in `dvc repro` on one host.
    """
    from tailor.latency import latency_model, load_lut, lut_space
    from tailor.space import Arch

    luts = sorted(Path(lut_dir).glob("*.json")) if lut_dir and Path(lut_dir).is_dir() else []
    rows, summary, statistics_used = [], {}, set()
    for path in luts:
        lut = load_lut(path)
        statistics_used.add(lut["protocol"]["statistic"])
        model = latency_model(lut)
        t, name_t = lut["target"], lut["target_name"]
        errs, over = [], []
        space = lut_space(lut)
        for name, m in export["models"].items():
            try:
                predicted = model.cost(space.validate(Arch.parse(m["arch"])))
            except ValueError as err:
                raise ValueError(f"{path}: does not describe exported model {name} ({err}); "
                                 "the LUT and the models come from different params") from None
            meas = m.get("target_latency", {}).get(name_t)
            measured = None if meas is None else meas["ms"]
            err = None if measured is None else (predicted - measured) / measured
            # budget_abs: a fraction budget resolved to ms (absent in files from before it was recorded)
            budget_ms = float(m.get("budget_abs") or m["budget"]) if m.get("budget_unit") == "ms" else None
            if err is not None:
                errs.append(err)
                if budget_ms is not None and measured > budget_ms * (1 + WITHIN):
                    over.append(name)
            rows.append([name, m["arch"], name_t, f"{t['runtime']} {t['device']} {t['dtype']}, batch "
                         f"{t['batch_size']}, {t['threads']} threads", f"{predicted:.4f}",
                         "-" if measured is None else f"{measured:.4f}",
                         "-" if err is None else f"{100 * err:+.1f}%",
                         "-" if budget_ms is None else f"{budget_ms:.4f}"])
        if errs:
            within = sum(abs(e) <= WITHIN for e in errs)
            summary[name_t] = {"models": len(errs), "median_abs_rel_err": round(statistics.median(map(abs, errs)), 4),
                               "max_abs_rel_err": round(max(map(abs, errs)), 4),
                               "within_5pct": within, "share_within_5pct": round(within / len(errs), 4),
                               "over_budget_plus_5pct": over}
    if not rows:
        return None
    text = ["## Chosen networks: LUT-predicted vs deployed latency",
            "Predicted: the calibrated lookup table of each profiled target, whose fixed parts and calibration "
            "nets are timed as exported (uint8 NHWC input and normalisation, the widest superclass's classifier, "
            "logits and probs). Measured: the export stage's timing of each exported ONNX file under the same "
            "target's session options, batch size and protocol (statistic "
            f"{', '.join(sorted(statistics_used))}), on the machine export "
            "ran on; '-' where the target cannot run the file there.", "",
            _table(["Triton model", "arch", "target", "target conditions", "predicted ms", "measured ms", "error",
                    "budget ms"], rows)]
    for name_t, v in summary.items():
        text.append(f"- {name_t}: {v['within_5pct']} of {v['models']} deployed nets within +-5% of the prediction "
                    f"(median |error| {100 * v['median_abs_rel_err']:.1f}%, max {100 * v['max_abs_rel_err']:.1f}%)"
                    + (f"; over their latency budget + 5%: {', '.join(v['over_budget_plus_5pct'])}"
                       if v["over_budget_plus_5pct"] else ""))
    return "\n".join(text), summary


def _first_lut(lut_dir: Path | None) -> dict | None:
    from tailor.latency import load_lut

    luts = sorted(Path(lut_dir).glob("*.json")) if lut_dir and Path(lut_dir).is_dir() else []
    return load_lut(luts[0]) if luts else None


def write_plots(metrics_dir: Path, search_results: Path | None, lut_dir: Path | None, plots_dir: Path,
                link_base: Path) -> list[str]:
    """The Pareto PNGs (per superclass: accuracy vs MAdds and vs latency) and the flat JSON files
    `dvc plots` reads (dvc.yaml's plots: section): Pareto points, every training curve and each
    latency table's predicted-vs-measured points. Returns the Markdown lines that show the PNGs (paths relative to link_base)."""
    import os

    from tailor.pareto import plot_grid, points
    from tailor.utils import atomic_write_json

    metrics_dir, plots_dir = Path(metrics_dir), Path(plots_dir)
    retrains = [json.loads(f.read_text()) for f in sorted((metrics_dir / "retrain").glob("*.json"))] \
        if (metrics_dir / "retrain").is_dir() else []
    search = _load(Path(search_results)) if search_results else None
    lut = _first_lut(lut_dir)
    rows = points(_load(metrics_dir / "supernet.json"), search, retrains, _load(metrics_dir / "stock.json"),
                  _load(metrics_dir / "export.json"), lut)
    atomic_write_json(plots_dir / "pareto.json", rows)
    # One file per network (DVC draws one line per file): plots/training/<network>.json.
    histories = {}
    for stage in ("teacher", "supernet"):
        histories[stage] = (_load(metrics_dir / f"{stage}.json") or {}).get("history", [])
    stock = _load(metrics_dir / "stock.json") or {}
    for name, m in [*stock.get("models", {}).items(), *((s["name"], s) for s in stock.get("specialists", {}).values())]:
        histories[f"stock-{name}"] = m.get("history", [])
    for r in retrains:
        histories[f"retrain-{r['superclass']}@{r['budget']:g}"] = r.get("history", [])
    import shutil

    shutil.rmtree(plots_dir / "training", ignore_errors=True)  # networks of an earlier run must not linger
    for name, history in histories.items():
        curve = [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in history]
        for c in curve:  # one loss column for every stage (the supernet's is CE + KD of its subnets)
            c.setdefault("loss", round(c.get("ce", 0.0) + c.get("kd", 0.0), 6))
        if curve:
            atomic_write_json(plots_dir / "training" / f"{name}.json", curve)
    # One scatter per profiled target: each profiled subnet's LUT prediction against its measured time.
    from tailor.latency import load_lut

    shutil.rmtree(plots_dir / "lut", ignore_errors=True)
    for path in sorted(Path(lut_dir).glob("*.json")) if lut_dir and Path(lut_dir).is_dir() else []:
        t = load_lut(path)
        pts = [{"arch": n["arch"], "measured_ms": n["measured_ms"], "predicted_ms": n["predicted_ms"], "set": kind}
               for kind in ("calibration", "held_out") for n in t["networks"][kind]]
        atomic_write_json(plots_dir / "lut" / f"{t['target_name']}.json", pts)
    lines = []
    madds = plot_grid(rows, "madds_m", "MAdds (M)", "Test top-1 vs MAdds, per superclass", plots_dir / "pareto-madds.png")
    lines.append(f"![accuracy vs MAdds]({os.path.relpath(madds, link_base)})")
    if lut is not None:
        lat = plot_grid(rows, "latency_ms", f"ms on {lut['target_name']} (LUT; stock: measured)",
                        "Test top-1 vs latency, per superclass", plots_dir / "pareto-latency.png")
        lines.append(f"![accuracy vs latency]({os.path.relpath(lat, link_base)})")
    return lines


def build_report(metrics_dir: Path, search_table: Path | None, lut_dir: Path | None = None) -> tuple[str, dict]:
    metrics_dir = Path(metrics_dir)
    parts = ["# tailor report", ""]
    summary: dict = {}
    missing = []

    data = _load(metrics_dir / "data.json")
    if data:
        parts += ["## Data", _table(["source", "classes", "superclasses", "train", "val", "test", "size"],
                                    [[data["source"], data["classes"], data["superclasses"], data["train_images"],
                                      data["val_images"], data["test_images"], data["image_size"]]]), ""]
    for stage, title in (("teacher", "Teacher (largest network, trained alone)"),
                         ("supernet", "Supernet subnets (BN recalibrated; superclass-restricted top-1)")):
        m = _load(metrics_dir / f"{stage}.json")
        if m:
            text, summary[stage] = subnet_section(title, m)
            parts += [text, ""]
        else:
            missing.append(stage)

    stock = _load(metrics_dir / "stock.json")
    if stock:
        text, summary["stock"] = stock_section(stock, _load(metrics_dir / "supernet.json"))
        parts += [text, ""]
    else:
        missing.append("train-stock")

    lat = _load(metrics_dir / "latency.json")
    if lat:
        parts += ["## Latency lookup table", _table(["metric", "value"], _scalars(lat)), ""]
    else:
        missing.append("profile-latency")

    search = _load(metrics_dir / "search.json")
    if search and search_table and Path(search_table).exists():
        parts += ["## Search: one architecture per scenario", Path(search_table).read_text().strip(), ""]
        summary["search"] = {k: v.get("mean_test_acc") for k, v in search.get("methods", {}).items()}
    else:
        missing.append("search")

    retrains = sorted((metrics_dir / "retrain").glob("*.json")) if (metrics_dir / "retrain").is_dir() else []
    if retrains:
        rows = []
        for f in retrains:
            r = json.loads(f.read_text())
            rows.append([r["superclass"], f"{r['budget']:g}", r["arch"], f"{r['madds'] / 1e6:.2f}", r["init"],
                         r["data"], r["epochs"], _pct(r["val_top1"]), _pct(r["test_top1"]), r["train_seconds"]])
        parts += ["## Retrained specialised networks (classifier over the superclass's classes only)",
                  _table(["superclass", "budget", "arch", "MAdds (M)", "init", "data", "epochs", "val top-1",
                          "test top-1", "train s"], rows), ""]
    else:
        missing.append("retrain")

    export = _load(metrics_dir / "export.json")
    if export:
        rows = [[name, f"{m['parity_max_abs']:.2e}", _pct(m.get("test_top1")), _pct(m.get("onnx_test_top1")),
                 ", ".join(f"{k}: {v} ms" for k, v in m.get("ort_cpu_latency_ms", {}).items()), m["onnx_bytes"]]
                for name, m in export["models"].items()]
        parts += [f"## Export (ONNX opset {export['opset']}, onnxruntime {export['onnxruntime']}; "
                  f"repository `{export['repository']}`)",
                  _table(["Triton model", "parity max abs", "test top-1 (torch)", "test top-1 (onnx)",
                          "onnxruntime CPU latency (median)", "bytes"], rows), ""]
        summary["export"] = {"max_parity_error": export["max_parity_error"], "passed": export.get("passed")}
        latency_part = latency_section(export, lut_dir)
        if latency_part:
            parts += [latency_part[0], ""]
            summary["chosen_latency"] = latency_part[1]
    else:
        missing.append("export")

    if stock and retrains:
        head = headline_section(stock, [json.loads(f.read_text()) for f in retrains], export)
        if head:
            # First thing a reader sees after the title.
            parts[2:2] = [head[0], ""]
            summary["headline"] = head[1]

    serve = _load(metrics_dir / "serve.json")
    if serve:
        rows = []
        for name, m in serve["models"].items():
            for proto, r in m.get("protocols", {}).items():
                lat1 = (r.get("latency") or [{}])
                best = max(lat1, key=lambda x: x.get("throughput_img_per_s", 0)) if lat1 else {}
                rows.append([name, proto, _pct(m.get("offline_accuracy")), _pct(r.get("accuracy")),
                             lat1[0].get("p50_ms") and round(lat1[0]["p50_ms"], 2),
                             lat1[0].get("p99_ms") and round(lat1[0]["p99_ms"], 2),
                             best.get("throughput_img_per_s") and round(best["throughput_img_per_s"], 1),
                             best.get("concurrency")])
        parts += ["## Serve-check (live Triton)", _table(
            ["model", "protocol", "offline acc", "served acc", "p50 ms (c=1)", "p99 ms (c=1)", "best img/s",
             "at concurrency"], rows), ""]
    else:
        missing.append("serve-check")

    if missing:
        parts += ["## Not run", ", ".join(missing), ""]
    summary["missing"] = missing
    return "\n".join(parts), summary


def report(metrics_dir: Path, search_table: Path | None, out_md: Path, summary_path: Path, provenance: dict,
           lut_dir: Path | None = None, search_results: Path | None = None, plots_dir: Path | None = None) -> dict:
    """The report page, its summary, and (in plots_dir, default: beside the page in plots/) the
    Pareto PNGs and `dvc plots` data."""
    from tailor.utils import atomic_write_json, atomic_write_text

    text, summary = build_report(metrics_dir, search_table, lut_dir)
    plots_dir = Path(plots_dir) if plots_dir else Path(out_md).parent / "plots"
    pictures = write_plots(metrics_dir, search_results, lut_dir, plots_dir, Path(out_md).parent)
    text += "\n## Pictures\n" + "\n\n".join(pictures) + "\n"
    text += f"\n---\ncode version `{provenance['code_version']}`\n"
    atomic_write_text(out_md, text)
    atomic_write_json(summary_path, {**summary, "code_version": provenance["code_version"]})
    return summary

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


def latency_section(export: dict, lut_dir: Path) -> tuple[str, dict] | None:
    """The chosen (exported) networks' latency: predicted by each LUT of lut_dir, and measured.

    The export stage times every model with onnxruntime on the CPU it runs on, at
    export.latency_batch_sizes; that is a measurement of a LUT's target when the target is
    onnxruntime on cpu at one of those batch sizes and the export ran on the target's machine (so
    in `dvc repro` on one machine; in Kubeflow only when export is placed on the target's nodes).
    The measured statistic is the LUT's own (min or median of the clean calls). The prediction uses
    the LUT's head, profiled for all classes, where the exported net has one superclass's classes;
    the difference is feature_channels x (classes dropped) MAdds in the last layer.
    """
    from tailor.latency import latency_model, load_lut, lut_space
    from tailor.space import Arch

    luts = sorted(Path(lut_dir).glob("*.json")) if lut_dir and Path(lut_dir).is_dir() else []
    rows, summary = [], {}
    for path in luts:
        lut = load_lut(path)
        model = latency_model(lut)
        t = lut["target"]
        measured_here = t["runtime"] == "onnxruntime" and t["device"] == "cpu"
        stat = lut["protocol"]["statistic"]
        errs = []
        space = lut_space(lut)
        for name, m in export["models"].items():
            try:
                predicted = model.cost(space.validate(Arch.parse(m["arch"])))
            except ValueError as err:
                raise ValueError(f"{path}: does not describe exported model {name} ({err}); "
                                 "the LUT and the models come from different params") from None
            detail = m.get("ort_cpu_latency_detail", {}).get(f"batch_{t['batch_size']}") if measured_here else None
            measured = None if detail is None else (detail["min_ms"] if stat == "min" else detail["ms"])
            err = None if measured is None else (predicted - measured) / measured
            if err is not None:
                errs.append(abs(err))
            rows.append([name, m["arch"], lut["target_name"], f"{t['runtime']} {t['device']} {t['dtype']}, batch "
                         f"{t['batch_size']}, {t['threads']} threads", f"{predicted:.4f}",
                         "-" if measured is None else f"{measured:.4f}",
                         "-" if err is None else f"{100 * err:+.1f}%"])
        if errs:
            summary[lut["target_name"]] = {"median_abs_rel_err": round(statistics.median(errs), 4),
                                           "models": len(errs)}
    if not rows:
        return None
    threads = export.get("intra_op_threads")
    text = ["## Chosen networks: LUT-predicted vs measured latency",
            "Predicted: the calibrated lookup table of each profiled target. Measured: the export stage's "
            f"onnxruntime CPU timing of the exported ONNX (intra-op threads {threads or 'onnxruntime default'}), "
            "in the LUT's statistic, shown only for onnxruntime-on-CPU targets at a batch size the export timed.",
            "", _table(["Triton model", "arch", "target", "target conditions", "predicted ms", "measured ms",
                        "error"], rows)]
    return "\n".join(text), summary


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

    lat = _load(metrics_dir / "latency.json")
    if lat:
        parts += ["## Latency lookup table", _table(["metric", "value"], _scalars(lat)), ""]
    else:
        missing.append("profile-latency")

    search = _load(metrics_dir / "search.json")
    if search and search_table and Path(search_table).exists():
        parts += ["## Search: one architecture per scenario", Path(search_table).read_text().strip(), ""]
        summary["search"] = {k: v.get("mean_val_acc") for k, v in search.get("methods", {}).items()}
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
           lut_dir: Path | None = None) -> dict:
    from tailor.utils import atomic_write_json, atomic_write_text

    text, summary = build_report(metrics_dir, search_table, lut_dir)
    text += f"\n---\ncode version `{provenance['code_version']}`\n"
    atomic_write_text(out_md, text)
    atomic_write_json(summary_path, {**summary, "code_version": provenance["code_version"]})
    return summary

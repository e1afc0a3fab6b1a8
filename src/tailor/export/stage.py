"""The export stage: retrained checkpoints -> parity-checked ONNX, onnxruntime accuracy and latency,
and a Triton model repository (a local directory or an S3 prefix)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tailor import data as datamod
from tailor.config import Params
from tailor.context import load_specialized
from tailor.data import Meta
from tailor.utils import atomic_dir, atomic_write_json, check_replaceable, code_version, file_hash, fingerprint, log


class ExportError(ValueError):
    """The export stage refused its input or its result (e.g. ONNX parity above tolerance)."""


def _superclass_test(meta: Meta, x: np.ndarray, y: np.ndarray, superclass: str, class_names: list[str],
                     source: str):
    """Test images (uint8 NHWC) of one superclass and their targets as indices into class_names."""

    classes = meta.classes_of(meta.superclass_index(superclass))
    names = [meta.classes[c] for c in classes]
    if list(class_names) != names:
        raise ExportError(f"{source}: classes {list(class_names)} differ from superclass {superclass!r}'s "
                          f"classes in the data {names}: model and data do not belong together")
    local = np.full(len(meta.classes), -1, np.int64)
    local[classes] = np.arange(len(classes))
    sel = local[y] >= 0
    return np.ascontiguousarray(x[sel]), local[y[sel]]


def _ort_top1(sess, images: np.ndarray, targets: np.ndarray, batch_size: int) -> float:
    from tailor.export import INPUT_NAME, LOGITS_NAME

    correct = 0
    for i in range(0, len(images), batch_size):
        (logits,) = sess.run([LOGITS_NAME], {INPUT_NAME: images[i:i + batch_size]})
        correct += int((logits.argmax(1) == targets[i:i + batch_size]).sum())
    return correct / max(1, len(images))


def _ort_latency(sess, images: np.ndarray, cfg) -> dict:
    """onnxruntime wall time per call at each of cfg.latency_batch_sizes, on real images (repeated
    when a batch needs more than there are). "ms" is the median over the calls during which no
    other process preempted this one (getrusage involuntary switches, as profile-latency does),
    or over all calls when fewer than a quarter ran clean: on a shared machine the preempted ones
    time the load, not the model."""
    import resource

    from tailor.export import INPUT_NAME, LOGITS_NAME, PROBS_NAME

    out = {}
    for b in cfg.latency_batch_sizes:
        feed = {INPUT_NAME: np.ascontiguousarray(np.resize(images, (b, *images.shape[1:])))}
        for _ in range(cfg.latency_warmup):
            sess.run([LOGITS_NAME, PROBS_NAME], feed)
        times, clean = [], []
        for _ in range(cfg.latency_repeats):
            switches = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
            t = time.perf_counter()
            sess.run([LOGITS_NAME, PROBS_NAME], feed)
            times.append((time.perf_counter() - t) * 1e3)
            if resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw == switches:
                clean.append(times[-1])
        use = clean if len(clean) >= max(3, len(times) // 4) else times
        out[f"batch_{b}"] = {"ms": float(np.median(use)), "p90_ms": float(np.percentile(use, 90)),
                             "min_ms": float(min(times)), "calls": len(times), "used_calls": len(use)}
    return out


def _deployed_latency(p: Params, onnx_files: dict[str, Path], image_size: int) -> dict[str, dict]:
    """{model: {target: stats}}: every exported file timed under each profiled latency target that can
    run it here (latency.measure_deployed), so the report sets the LUT's prediction beside the
    deployed artifact measured the same way. Meaningful where export runs on the target's machine:
    `dvc repro` on one machine; in Kubeflow only when export is placed on the target's nodes."""
    from tailor import latency

    out: dict[str, dict] = {name: {} for name in onnx_files}
    for tname in p.latency.target:
        target = latency.get_target(p.latency, tname)
        if not latency.measurable_here(target):
            continue
        stats = latency.measure_deployed(tname, target, p.latency.protocol, onnx_files, image_size)
        for name, st in stats.items():
            out[name][tname] = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in st.items()}
    return out


def export(p: Params, model_paths: list[Path], data_dir: Path, repo_out: str | Path, metrics_path: Path,
           onnx_dir: Path | None = None, force: bool = False) -> dict:
    """Retrained scenario checkpoints -> ONNX + a Triton model repository (local dir or s3://bucket/prefix).

    Per model: ONNX with provenance metadata, parity against PyTorch on real test images of its
    superclass (the stage fails above export.parity_tolerance), onnxruntime accuracy on the whole
    superclass test split and CPU latency; then <repo>/<model>/{config.pbtxt,1/model.onnx,labels.txt}
    with the model named after its scenario. The repository appears whole or not at all: built in
    a temporary directory and renamed into place (locally) or uploaded as a complete-or-absent
    prefix (S3). onnx_dir, when given, gets <model>.onnx copies. A local repo or onnx_dir that
    holds files tailor did not write is refused unless `force` (utils.check_replaceable).
    """
    import json
    import shutil
    import tempfile

    import onnxruntime

    from tailor.export import export_onnx, parity, s3_client, triton_model_name, upload_repository, write_model
    from tailor.export.onnx_export import ort_session

    cfg = p.export
    model_paths = [Path(m) for m in model_paths]
    if not model_paths:
        raise ExportError("export: no model checkpoints given")
    repo_is_s3 = str(repo_out).startswith("s3://")
    if repo_is_s3:
        from tailor.export import parse_s3_url

        parse_s3_url(str(repo_out))  # a bad URL fails before minutes of work
    else:
        check_replaceable(Path(repo_out), force)
    if onnx_dir is not None:
        check_replaceable(Path(onnx_dir), force)
    t0 = time.perf_counter()
    meta = Meta.load(data_dir)
    x_test, y_test = datamod.load_split(data_dir, "test")
    export_version = code_version()
    models: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tailor-export-") as tmp:
        staged_onnx = Path(tmp) / "onnx"
        labels: dict[str, list[str]] = {}
        for path in model_paths:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such model checkpoint (run `tailor retrain` for its scenario)")
            net, ck = load_specialized(path)
            m = ck.get("metrics", {})
            unit = m.get("budget_unit", "MAdds")  # checkpoints from before budget_unit was recorded
            name = triton_model_name(ck["superclass"], ck["budget"], unit)
            if name in models:
                raise ExportError(f"{path} and {models[name]['checkpoint']} are the same scenario ({name})")
            images, targets = _superclass_test(meta, x_test, y_test, ck["superclass"], ck["class_names"], str(path))
            metadata = {"model_name": name, "arch": ck["arch"], "superclass": ck["superclass"],
                        "budget": repr(float(ck["budget"])), "budget_unit": unit,
                        "classes": json.dumps(ck["class_names"]), "test_top1": repr(m.get("test_top1")),
                        "code_version": export_version, "model_code_version": ck["code_version"],
                        "params_hash": fingerprint(ck["params"]), "checkpoint_hash": file_hash(path),
                        "export_params_hash": fingerprint(cfg.model_dump(mode="json"))}
            onnx_path = export_onnx(net, staged_onnx / f"{name}.onnx", ck["image_size"], ck["mean"], ck["std"],
                                    cfg.opset, metadata)
            rng = np.random.default_rng(p.seed)
            pick = np.sort(rng.permutation(len(images))[:cfg.parity_images])
            err = parity(onnx_path, net, images[pick])
            sess = ort_session(onnx_path, cfg.intra_op_threads)
            lat = _ort_latency(sess, images, cfg)
            models[name] = {
                "checkpoint": str(path), "superclass": ck["superclass"], "budget": ck["budget"], "budget_unit": unit,
                "budget_abs": m.get("budget_abs"), "arch": ck["arch"], "madds": m.get("madds"), "classes": len(ck["classes"]),
                "parity_max_abs": err, "parity_images": int(len(pick)), "parity_ok": err <= cfg.parity_tolerance,
                "test_top1": m.get("test_top1"),
                "onnx_test_top1": round(_ort_top1(sess, images, targets, cfg.max_batch_size), 5),
                "test_images": int(len(images)), "onnx_bytes": onnx_path.stat().st_size,
                "ort_cpu_latency_ms": {k: round(v["ms"], 4) for k, v in lat.items()},
                "ort_cpu_latency_detail": lat}
            labels[name] = list(ck["class_names"])
            log(f"export {name}: parity {err:.2e}, onnxruntime top-1 {models[name]['onnx_test_top1']}, "
                + ", ".join(f"{k} {v}ms" for k, v in models[name]["ort_cpu_latency_ms"].items()))

        deployed = _deployed_latency(p, {n: staged_onnx / f"{n}.onnx" for n in models}, meta.image_size)
        for name, by_target in deployed.items():
            models[name]["target_latency"] = by_target
        metrics = {"repository": str(repo_out), "opset": cfg.opset, "parity_tolerance": cfg.parity_tolerance,
                   "max_parity_error": max(e["parity_max_abs"] for e in models.values()),
                   "intra_op_threads": cfg.intra_op_threads, "onnxruntime": onnxruntime.__version__,
                   "models": models}
        bad = sorted(n for n, e in models.items() if not e["parity_ok"])
        if bad:
            metrics.update(passed=False, seconds=round(time.perf_counter() - t0, 2))
            atomic_write_json(metrics_path, metrics)
            raise ExportError(f"ONNX parity above export.parity_tolerance {cfg.parity_tolerance:g} for "
                              + ", ".join(f"{n} ({models[n]['parity_max_abs']:.3g})" for n in bad))

        def write_repo(root: Path) -> None:
            for name in models:
                write_model(root, name, staged_onnx / f"{name}.onnx", labels[name], cfg)

        if repo_is_s3:
            write_repo(Path(tmp) / "repo")
            upload_repository(Path(tmp) / "repo", str(repo_out), s3_client(cfg.s3), overwrite=True)
        else:
            with atomic_dir(Path(repo_out), force) as d:
                write_repo(d)
        if onnx_dir is not None:
            with atomic_dir(Path(onnx_dir), force) as d:
                for name in models:
                    shutil.copyfile(staged_onnx / f"{name}.onnx", d / f"{name}.onnx")
    metrics.update(passed=True, seconds=round(time.perf_counter() - t0, 2))
    atomic_write_json(metrics_path, metrics)
    log(f"export: {len(models)} model(s) -> {repo_out}, max parity error {metrics['max_parity_error']:.2e}")
    return metrics

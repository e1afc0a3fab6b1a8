"""serve-check: drive a running Triton server with tritonclient (HTTP and gRPC) and measure it.

For each protocol: wait for readiness, read the repository index, load the model (explicit model
control, optionally with a config override), read its config back, send real test images in
batches (accuracy against the offline figure, top-1 label strings from the served labels file),
measure latency percentiles and throughput at a few concurrency levels (bounded request counts,
like perf_analyzer's concurrency mode), then unload. Every wait and loop is bounded.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tailor import data as datamod
from tailor.config import Params
from tailor.data import Meta
from tailor.export.onnx_export import INPUT_NAME, LOGITS_NAME, PROBS_NAME
from tailor.export.settings import ServeConfig
from tailor.export.triton import config_from_json, config_to_json, mc
from tailor.utils import atomic_write_json, log

POLL_S = 0.1


class ServeCheckError(RuntimeError):
    """serve-check found a problem; `metrics` holds what was measured up to then."""

    def __init__(self, message: str, metrics: dict | None = None):
        super().__init__(message)
        self.metrics = metrics or {}


# ---------------------------------------------------------------- clients
def _module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    return module


class Client:
    """One tritonclient client with the calls serve-check needs, the same for HTTP and gRPC.

    Timeouts: HTTP clients carry them per connection (so an HTTP Client is made per timeout),
    gRPC per call.
    """

    def __init__(self, protocol: str, url: str, timeout_s: float):
        self.protocol, self.url, self.timeout_s = protocol, url, timeout_s
        self.module = _module(protocol)
        if protocol == "http":
            self._c = self.module.InferenceServerClient(
                url, connection_timeout=timeout_s, network_timeout=timeout_s
            )
            self._kw: dict[str, Any] = {}
        else:
            self._c = self.module.InferenceServerClient(url)
            self._kw = {"client_timeout": timeout_s}

    def close(self):
        self._c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def is_server_ready(self) -> bool:
        return bool(self._c.is_server_ready(**self._kw))

    def is_model_ready(self, name: str) -> bool:
        return bool(self._c.is_model_ready(name, **self._kw))

    def repository_index(self) -> list[dict]:
        """[{name, version?, state?}] of every model the server's repositories hold."""
        if self.protocol == "http":
            models = self._c.get_model_repository_index()
        else:
            models = self._c.get_model_repository_index(as_json=True, **self._kw).get("models", [])
        return [{k: m[k] for k in ("name", "version", "state") if k in m} for m in models]

    def load(self, name: str, config_override: str | None = None) -> None:
        self._c.load_model(name, config=config_override, **self._kw)

    def unload(self, name: str) -> None:
        self._c.unload_model(name, **self._kw)

    def model_config(self, name: str) -> mc.ModelConfig:
        if self.protocol == "http":
            return config_from_json(self._c.get_model_config(name))
        return config_from_json(self._c.get_model_config(name, as_json=True, **self._kw)["config"])

    def infer(self, name: str, images: np.ndarray, class_count: int = 0):
        """-> (logits [N, C] float32, top-`class_count` "score:index:label" strings or None)."""
        m = self.module
        inp = m.InferInput(INPUT_NAME, list(images.shape), "UINT8")
        if self.protocol == "http":
            inp.set_data_from_numpy(images, binary_data=True)
            outputs = [m.InferRequestedOutput(LOGITS_NAME, binary_data=True)]
            if class_count:
                outputs.append(m.InferRequestedOutput(PROBS_NAME, binary_data=True, class_count=class_count))
        else:
            inp.set_data_from_numpy(images)
            outputs = [m.InferRequestedOutput(LOGITS_NAME)]
            if class_count:
                outputs.append(m.InferRequestedOutput(PROBS_NAME, class_count=class_count))
        result = self._c.infer(name, [inp], outputs=outputs, **self._kw)
        top = result.as_numpy(PROBS_NAME) if class_count else None
        return result.as_numpy(LOGITS_NAME), top


def _wait(predicate, timeout_s: float, what: str) -> float:
    """Poll `predicate` until true or `timeout_s`; returns the seconds waited."""
    start = time.monotonic()
    last_error = None
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except Exception as e:  # noqa: BLE001  (not up yet: connection refused and the like)
            last_error = e
        if time.monotonic() - start > timeout_s:
            detail = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
            raise ServeCheckError(f"timed out after {timeout_s:.1f}s waiting for {what}{detail}")
        time.sleep(POLL_S)


def wait_server_ready(client: Client, timeout_s: float) -> float:
    return _wait(client.is_server_ready, timeout_s, f"the server at {client.url} to be ready")


def load_model(client: Client, name: str, timeout_s: float, config_override: mc.ModelConfig | dict | str | None = None) -> float:
    """Load `name` (explicit model control) and wait until it is ready; returns seconds taken."""
    override = None
    if isinstance(config_override, mc.ModelConfig):
        override = config_to_json(config_override)
    elif isinstance(config_override, dict):
        override = json.dumps(config_override)
    elif config_override is not None:
        override = str(config_override)
    start = time.monotonic()
    client.load(name, override)
    _wait(lambda: client.is_model_ready(name), timeout_s, f"model {name!r} to be ready")
    return time.monotonic() - start


def unload_model(client: Client, name: str, timeout_s: float) -> float:
    """Unload `name` and wait until it is gone; returns seconds taken.

    The unload request returns at once and the model stays UNLOADING for a while (the server
    is not ready meanwhile, under strict readiness), so wait for the index to say so.
    """
    start = time.monotonic()
    client.unload(name)

    def gone() -> bool:
        states = {e.get("state") for e in client.repository_index() if e["name"] == name}
        return not client.is_model_ready(name) and not states & {"READY", "LOADING", "UNLOADING"}

    _wait(gone, timeout_s, f"model {name!r} to unload")
    return time.monotonic() - start


def override_config(config: mc.ModelConfig, **changes) -> mc.ModelConfig:
    """A copy of `config` with some serving knobs changed, for a load-time override.

    changes: instance_count, max_queue_delay_us, preferred_batch_sizes.
    """
    out = mc.ModelConfig()
    out.CopyFrom(config)
    unknown = set(changes) - {"instance_count", "max_queue_delay_us", "preferred_batch_sizes"}
    if unknown:
        raise ValueError(f"cannot override {sorted(unknown)}")
    if "instance_count" in changes:
        for g in out.instance_group:
            g.count = changes["instance_count"]
    if "max_queue_delay_us" in changes:
        out.dynamic_batching.max_queue_delay_microseconds = changes["max_queue_delay_us"]
    if "preferred_batch_sizes" in changes:
        del out.dynamic_batching.preferred_batch_size[:]
        out.dynamic_batching.preferred_batch_size.extend(changes["preferred_batch_sizes"])
    return out


def interface_differences(served: mc.ModelConfig, expected: mc.ModelConfig) -> list[str]:
    """What differs between two configs in what a client sees: I/O, batching, labels."""
    diffs = []
    for field in ("max_batch_size", "input", "output", "dynamic_batching"):
        if getattr(served, field) != getattr(expected, field):
            diffs.append(field)
    return diffs


# ---------------------------------------------------------------- measuring
def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def evaluate(
    client: Client,
    name: str,
    images: np.ndarray,
    targets: np.ndarray,
    batch_size: int,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Top-1 accuracy of the served model on `images` (uint8 NHWC) against `targets` (class ids).

    With `class_names`, also asks Triton's classification extension for the top-1 label and
    counts where it disagrees with class_names[argmax logits] (checks the served labels file).
    """
    correct, label_mismatches = 0, 0
    for sl in _batches(len(images), batch_size):
        logits, top = client.infer(name, np.ascontiguousarray(images[sl]), class_count=1 if class_names else 0)
        if logits.shape != (sl.stop - sl.start, logits.shape[1]):
            raise ServeCheckError(f"{name}: logits of shape {logits.shape} for a batch of {sl.stop - sl.start}")
        pred = logits.argmax(axis=1)
        correct += int((pred == targets[sl]).sum())
        if class_names:
            for p, entry in zip(pred, top.reshape(len(pred), -1)[:, 0]):
                # "score:index:label"; only the label may itself contain ':'
                _, index, label = entry.decode().split(":", 2)
                if int(index) != p or label != class_names[p]:
                    label_mismatches += 1
    n = len(images)
    return {"images": n, "accuracy": correct / n if n else float("nan"), "label_mismatches": label_mismatches}


def measure_latency(
    protocol: str,
    url: str,
    name: str,
    images: np.ndarray,
    concurrency: int,
    requests: int,
    batch_size: int,
    request_timeout_s: float,
    wall_timeout_s: float,
) -> dict:
    """`concurrency` workers (one client each) send `requests` requests in all, each of
    `batch_size` images; stops early at `wall_timeout_s`. Latencies are client-side, in ms."""
    batch = np.ascontiguousarray(np.resize(images, (batch_size, *images.shape[1:])))
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + wall_timeout_s

    def take_ticket() -> bool:
        nonlocal issued
        with lock:
            if issued >= requests or time.monotonic() > deadline:
                return False
            issued += 1
            return True

    def worker():
        with Client(protocol, url, request_timeout_s) as client:
            try:
                client.infer(name, batch)  # warm-up: connection set-up is not latency
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                return
            while take_ticket():
                t0 = time.perf_counter()
                try:
                    client.infer(name, batch)
                except Exception as e:  # noqa: BLE001
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1e3)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        # Workers end by themselves (ticket count, deadline, per-request timeout); the join
        # bound is a last resort so that a hung client cannot hang serve-check.
        t.join(timeout=max(0.0, deadline - time.monotonic()) + 2 * request_timeout_s + 5)
    elapsed = time.perf_counter() - start
    lat = np.asarray(latencies)
    out = {
        "concurrency": concurrency,
        "batch_size": batch_size,
        "requests": int(lat.size),
        "errors": len(errors),
        "throughput_img_per_s": float(lat.size * batch_size / elapsed) if elapsed > 0 else 0.0,
    }
    for q in (50, 90, 99):
        out[f"p{q}_ms"] = float(np.percentile(lat, q)) if lat.size else None
    if errors:
        out["first_error"] = errors[0]
    return out


# ---------------------------------------------------------------- the check
def check_model(
    urls: Mapping[str, str],
    name: str,
    images: np.ndarray,
    targets: np.ndarray,
    offline_accuracy: float,
    cfg: ServeConfig,
    *,
    class_names: Sequence[str] | None = None,
    expected_config: mc.ModelConfig | None = None,
    config_override: mc.ModelConfig | dict | str | None = None,
) -> dict:
    """Run the whole check over every protocol in cfg.protocols; returns JSON-serialisable metrics.

    urls: protocol -> "host:port" (e.g. {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}).
    Raises ServeCheckError (with .metrics) when the accuracy differs from `offline_accuracy` by
    more than cfg.accuracy_tolerance, labels disagree, the served interface differs from
    `expected_config`, or latency requests failed.
    """
    images = np.asarray(images)
    targets = np.asarray(targets)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if len(images) != len(targets) or len(images) == 0:
        raise ValueError(f"{len(images)} images for {len(targets)} targets")
    images, targets = images[: cfg.max_images], targets[: cfg.max_images]

    metrics: dict[str, Any] = {"model": name, "offline_accuracy": float(offline_accuracy), "protocols": {}}
    problems: list[str] = []
    for protocol in cfg.protocols:
        if protocol not in urls:
            raise ValueError(f"no URL given for protocol {protocol!r}")
        m: dict[str, Any] = {"url": urls[protocol]}
        metrics["protocols"][protocol] = m
        try:
            _check_protocol(protocol, urls[protocol], name, images, targets, offline_accuracy, cfg,
                            class_names, expected_config, config_override, m, problems)
        except Exception as e:  # a broken step (server down, load refused): stop here
            problems.append(f"{protocol}: {e}" if isinstance(e, ServeCheckError) else f"{protocol}: {type(e).__name__}: {e}")
            metrics["passed"], metrics["problems"] = False, problems
            raise ServeCheckError(f"serve-check of {name!r} failed: " + "; ".join(problems), metrics) from e
    metrics["passed"], metrics["problems"] = not problems, problems
    if problems:
        raise ServeCheckError(f"serve-check of {name!r} failed: " + "; ".join(problems), metrics)
    return metrics


def _check_protocol(protocol, url, name, images, targets, offline_accuracy, cfg, class_names,
                    expected_config, config_override, m, problems):
    with Client(protocol, url, cfg.load_timeout_s) as control:
        m["ready_wait_s"] = wait_server_ready(control, cfg.ready_timeout_s)
        m["index"] = control.repository_index()
        if name not in {e["name"] for e in m["index"]}:
            raise ServeCheckError(f"model {name!r} is not in the repository index {m['index']}")
        m["load_s"] = load_model(control, name, cfg.load_timeout_s, config_override)
        try:
            served = control.model_config(name)
            m["config"] = {
                "max_batch_size": served.max_batch_size,
                "inputs": {i.name: [mc.DataType.Name(i.data_type), list(i.dims)] for i in served.input},
                "outputs": {o.name: [mc.DataType.Name(o.data_type), list(o.dims)] for o in served.output},
                "instance_count": sum(g.count for g in served.instance_group),
                "max_queue_delay_us": served.dynamic_batching.max_queue_delay_microseconds,
            }
            if expected_config is not None:
                diffs = interface_differences(served, expected_config)
                if diffs:
                    problems.append(f"{protocol}: served config differs from the exported one in {diffs}")

            with Client(protocol, url, cfg.request_timeout_s) as client:
                m.update(evaluate(client, name, images, targets, cfg.batch_size, class_names))
            m["accuracy_abs_diff"] = abs(m["accuracy"] - offline_accuracy)
            m["accuracy_ok"] = m["accuracy_abs_diff"] <= cfg.accuracy_tolerance
            if not m["accuracy_ok"]:
                problems.append(
                    f"{protocol}: accuracy {m['accuracy']:.4f} vs offline {offline_accuracy:.4f} "
                    f"(tolerance {cfg.accuracy_tolerance})"
                )
            if m["label_mismatches"]:
                problems.append(f"{protocol}: {m['label_mismatches']} top-1 labels disagree with the class names")

            m["latency"] = [
                measure_latency(protocol, url, name, images, c, cfg.requests_per_concurrency,
                                cfg.latency_batch_size, cfg.request_timeout_s, cfg.latency_timeout_s)
                for c in cfg.concurrencies
            ]
            failed = [lv for lv in m["latency"] if lv["errors"] or not lv["requests"]]
            if failed:
                problems.append(f"{protocol}: latency requests failed: {failed[0].get('first_error', 'none completed')}")
        except BaseException:
            # Unload anyway, but let the original error be the one reported.
            try:
                m["unload_s"] = unload_model(control, name, cfg.load_timeout_s)
            except Exception as e:  # noqa: BLE001
                m["unload_error"] = f"{type(e).__name__}: {e}"
            raise
        m["unload_s"] = unload_model(control, name, cfg.load_timeout_s)


# ---------------------------------------------------------------- the serve-check stage
def _host_port(url: str, option: str) -> str:
    """tritonclient's 'host:port' from 'http://host:port', 'grpc://host:port' or 'host:port'."""
    from urllib.parse import urlparse

    text = url if "://" in url else f"tcp://{url}"
    u = urlparse(text)
    try:
        port = u.port  # raises for a port outside 0-65535
    except ValueError as e:
        raise ValueError(f"{option} {url!r}: {e}") from None
    if u.scheme not in ("http", "grpc", "tcp") or not u.hostname or not port or u.path not in ("", "/"):
        raise ValueError(f"{option} {url!r}: expected host:port or http://host:port (TLS is not supported)")
    return f"{u.hostname}:{u.port}"


def _repository_models(repo: Path) -> list[Path]:
    dirs = sorted(d for d in repo.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / "config.pbtxt").is_file())
    if not dirs:
        raise FileNotFoundError(f"{repo}: no models (no <model>/config.pbtxt); run `tailor export` first")
    return dirs


def serve_check(p: Params, repo: str | Path, data_dir: Path, metrics_path: Path, url: str | None = None,
                grpc_url: str | None = None, work_dir: Path | None = None) -> dict:
    """Check that Triton serves the exported repository as exported: accuracy, labels, latency.

    With `url` (HTTP) and/or `grpc_url`, a running Triton that serves `repo` is checked over the
    protocols of serve.protocols that have a URL. Without either, the nvidia-pytriton wheel's
    tritonserver is started on 127.0.0.1 (free ports, explicit model control) over the
    python-backend twins of the repository's models (see docs/serving.md). Per model: load, the
    served config against the exported one, the superclass's real test images (top-1 against the
    same model.onnx run by onnxruntime here on the same images, and the served labels), latency
    percentiles and throughput per concurrency, unload. The metrics are written also when the
    check fails; then ServeCheckError is raised.
    """
    import tempfile

    from tailor.export import python_backend_twin, read_config, read_signature
    from tailor.export.onnx_export import ort_session
    from tailor.export.stage import _ort_top1, _superclass_test

    cfg = p.serve
    urls = {k: _host_port(v, opt) for k, v, opt in (("http", url, "--url"), ("grpc", grpc_url, "--grpc-url")) if v}
    protocols = [pr for pr in cfg.protocols if pr in urls] if urls else list(cfg.protocols)
    if urls and not protocols:
        raise ValueError(f"serve.protocols is {cfg.protocols}, but URLs were given only for {sorted(urls)}")
    t0 = time.perf_counter()
    meta = Meta.load(data_dir)
    x_test, y_test = datamod.load_split(data_dir, "test")
    metrics: dict = {"repository": str(repo), "protocols": protocols, "models": {}, "problems": []}
    problems = metrics["problems"]
    with tempfile.TemporaryDirectory(prefix="tailor-serve-check-", dir=work_dir) as tmp:
        tmp = Path(tmp)
        repo_dir = Path(repo)
        if str(repo).startswith("s3://"):
            from tailor.export import download_repository, s3_client

            repo_dir = tmp / "repository"
            download_repository(str(repo), repo_dir, s3_client(p.export.s3))
        elif not repo_dir.is_dir():
            raise FileNotFoundError(f"{repo}: no such model repository (run `tailor export` first)")
        # Everything about each model comes from the repository itself (ONNX metadata, labels.txt),
        # and its images from the data: a repository that does not match the data is refused here.
        plan = {}
        for model_dir in _repository_models(repo_dir):
            onnx_path = model_dir / "1" / "model.onnx"
            info = read_signature(onnx_path).metadata
            if "superclass" not in info:
                raise ValueError(f"{onnx_path}: no 'superclass' in its metadata; was it written by `tailor export`?")
            labels = (model_dir / "labels.txt").read_text().splitlines()
            images, targets = _superclass_test(meta, x_test, y_test, info["superclass"], labels, str(model_dir))
            if len(images) > cfg.max_images:  # a seeded sample over all classes, not the first classes only
                keep = np.sort(np.random.default_rng(p.seed).permutation(len(images))[:cfg.max_images])
                images, targets = images[keep], targets[keep]
            offline = _ort_top1(ort_session(onnx_path), images, targets, cfg.batch_size)
            test_top1 = info.get("test_top1")
            plan[model_dir.name] = dict(dir=model_dir, labels=labels, images=images, targets=targets, offline=offline,
                                        superclass=info["superclass"],
                                        retrain_test_top1=None if test_top1 in (None, "None") else float(test_top1))

        server = None
        try:
            if urls:
                metrics["server"] = {"mode": "external", "urls": urls}
            else:
                from tailor.serve_local import TritonServer

                twins = tmp / "twins"
                for entry in plan.values():
                    python_backend_twin(entry["dir"], twins)
                server = TritonServer(str(twins), tmp / "server")
                urls = server.urls
                metrics["server"] = {"mode": "bundled tritonserver (nvidia-pytriton), python-backend twins",
                                     "urls": urls}
            metrics["server"]["version"] = _server_version(urls)
            run_cfg = cfg.model_copy(update={"protocols": protocols})
            for name, entry in plan.items():
                m = {"superclass": entry["superclass"], "images": int(len(entry["images"])),
                     "offline_source": "the repository's model.onnx, onnxruntime CPU, same images",
                     "retrain_test_top1": entry["retrain_test_top1"]}
                try:
                    m.update(check_model(urls, name, entry["images"], entry["targets"], entry["offline"], run_cfg,
                                         class_names=entry["labels"], expected_config=read_config(entry["dir"])))
                except ServeCheckError as e:
                    m.update(e.metrics)
                    problems.append(str(e))
                m["latency_summary"] = {
                    pr: {f"c{lv['concurrency']}": {k: lv[k] for k in ("p50_ms", "p90_ms", "p99_ms", "throughput_img_per_s")}
                         for lv in pm.get("latency", [])}
                    for pr, pm in m.get("protocols", {}).items()}
                metrics["models"][name] = m
                log(f"serve-check {name}: " + ", ".join(
                    f"{pr} top-1 {pm.get('accuracy')} (offline {entry['offline']:.4f})"
                    for pr, pm in m.get("protocols", {}).items()))
        except Exception as e:  # the server would not start, died, ...: still write what is known
            problems.append(f"{type(e).__name__}: {e}")
        finally:
            if server is not None:
                if problems:
                    metrics["server"]["log_tail"] = server.log_tail(3000)
                server.stop()
    metrics["passed"] = not problems
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(metrics_path, metrics)
    if problems:
        raise ServeCheckError("; ".join(problems), metrics)
    log(f"serve-check: {len(plan)} model(s) passed over {', '.join(protocols)}")
    return metrics


def _server_version(urls: dict[str, str]) -> str | None:
    try:
        if "http" in urls:
            import tritonclient.http as client

            with client.InferenceServerClient(urls["http"], connection_timeout=10, network_timeout=10) as c:
                return c.get_server_metadata().get("version")
        import tritonclient.grpc as client

        with client.InferenceServerClient(urls["grpc"]) as c:
            return c.get_server_metadata(as_json=True, client_timeout=10).get("version")
    except Exception:  # noqa: BLE001  (informational; readiness is checked by serve-check itself)
        return None

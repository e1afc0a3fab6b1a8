"""serve-check against a live tritonserver (the binary bundled by nvidia-pytriton) on 127.0.0.1.

That build has only the python backend, so the exported onnxruntime_onnx model is served through
its python-backend twin: the same model.onnx run by onnxruntime, under the same inputs, outputs,
dims, labels, max_batch_size and dynamic batching (see docs/serving.md for what this does and
does not cover).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from servers import export_settings, moto_server, running_triton, s3_env, sample_images, serve_settings, tiny_cnn  # noqa: F401

from tailor.export import (
    S3Config,
    export_onnx,
    python_backend_twin,
    read_config,
    s3_client,
    triton_model_name,
    triton_repository_url,
    upload_repository,
    write_model,
)
from tailor.export.onnx_export import ort_session
from tailor.serve import (
    Client,
    ServeCheckError,
    evaluate,
    load_model,
    override_config,
    check_model as serve_check,
    unload_model,
    wait_server_ready,
)

LABELS = ["crab", "eel", "jellyfish", "octopus", "seal"]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
N_IMAGES = 64


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """An exported model, its Triton dir, its python-backend twin, and labelled test images."""
    root = tmp_path_factory.mktemp("live")
    model = tiny_cnn()
    onnx_path = export_onnx(model, root / "model.onnx", 32, MEAN, STD)
    name = triton_model_name("sea_life", 3.5, "MMAdds")
    exported_dir = write_model(root / "exported", name, onnx_path, LABELS, export_settings())
    twin_dir = python_backend_twin(exported_dir, root / "twin")

    images = sample_images(N_IMAGES, seed=0)
    x = (torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255 - 0.5) / 0.25
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    # Targets agree with the model on 3/4 of the images, so the accuracy is neither 0 nor 1.
    targets = pred.copy()
    targets[::4] = (pred[::4] + 1) % len(LABELS)
    offline = float((pred == targets).mean())
    assert offline == 0.75
    assert len(set(pred)) >= 4  # several classes predicted, so label checks mean something
    return dict(root=root, name=name, onnx=onnx_path, exported=exported_dir, twin=twin_dir,
                images=images, targets=targets, offline=offline)


@pytest.fixture(scope="module")
def triton(scenario):
    with running_triton(str(scenario["twin"].parent), scenario["root"] / "triton") as server:
        yield server


def test_serve_check_over_http_and_grpc(triton, scenario):
    metrics = serve_check(
        triton.urls,
        scenario["name"],
        scenario["images"],
        scenario["targets"],
        scenario["offline"],
        serve_settings(),
        class_names=LABELS,
        expected_config=read_config(scenario["exported"]),
    )
    json.dumps(metrics)  # JSON-serialisable as it is
    assert metrics["passed"] and metrics["problems"] == []
    assert set(metrics["protocols"]) == {"http", "grpc"}
    for protocol, m in metrics["protocols"].items():
        assert scenario["name"] in {e["name"] for e in m["index"]}, protocol
        assert m["images"] == N_IMAGES
        assert m["accuracy"] == pytest.approx(scenario["offline"], abs=1 / N_IMAGES)
        assert m["label_mismatches"] == 0
        assert m["config"]["inputs"] == {"images": ["TYPE_UINT8", [32, 32, 3]]}
        assert m["config"]["outputs"] == {"logits": ["TYPE_FP32", [5]], "probs": ["TYPE_FP32", [5]]}
        assert m["config"]["max_batch_size"] == 16
        assert [lv["concurrency"] for lv in m["latency"]] == [1, 2]
        for lv in m["latency"]:
            assert lv["requests"] == 20 and lv["errors"] == 0
            assert 0 < lv["p50_ms"] <= lv["p90_ms"] <= lv["p99_ms"]
            assert lv["throughput_img_per_s"] > 0
        assert m["unload_s"] >= 0
    with Client("http", triton.urls["http"], 10) as c:
        assert not c.is_model_ready(scenario["name"])  # serve-check unloads what it loaded


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_outputs_match_onnxruntime(triton, scenario, protocol):
    name = scenario["name"]
    batch = scenario["images"][:5]
    ref_logits, ref_probs = ort_session(scenario["onnx"]).run(["logits", "probs"], {"images": batch})
    with Client(protocol, triton.urls[protocol], 20) as c:
        wait_server_ready(c, 30)
        load_model(c, name, 60)
        try:
            logits, top = c.infer(name, batch, class_count=2)
        finally:
            unload_model(c, name, 60)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    # Classification extension: "score:index:label", best first, labels from labels.txt.
    first = [e.decode().split(":") for e in top[:, 0]]
    assert [int(i) for _, i, _ in first] == list(ref_probs.argmax(1))
    assert [lab for _, _, lab in first] == [LABELS[i] for i in ref_probs.argmax(1)]
    np.testing.assert_allclose([float(s) for s, _, _ in first], ref_probs.max(1), atol=1e-5)


def test_load_with_config_override_then_plain_load(triton, scenario):
    name = scenario["name"]
    override = override_config(read_config(scenario["twin"]), instance_count=2, max_queue_delay_us=1234)
    with Client("http", triton.urls["http"], 60) as http:
        load_model(http, name, 60, config_override=override)
        try:
            cfg = http.model_config(name)
            assert [g.count for g in cfg.instance_group] == [2]
            assert cfg.dynamic_batching.max_queue_delay_microseconds == 1234
            assert list(cfg.input[0].dims) == [32, 32, 3]
            acc = evaluate(http, name, scenario["images"], scenario["targets"], 16)
            assert acc["accuracy"] == pytest.approx(scenario["offline"], abs=1 / N_IMAGES)
        finally:
            unload_model(http, name, 60)
    # The override lives only as long as that load: a plain load reads config.pbtxt again.
    with Client("grpc", triton.urls["grpc"], 60) as grpc:
        load_model(grpc, name, 60)
        try:
            cfg = grpc.model_config(name)
            assert [g.count for g in cfg.instance_group] == [1]
            assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
        finally:
            unload_model(grpc, name, 60)


def test_serve_check_fails_on_accuracy_mismatch_and_still_unloads(triton, scenario):
    cfg = serve_settings(protocols=["grpc"], concurrencies=[1], requests_per_concurrency=2)
    with pytest.raises(ServeCheckError, match="accuracy") as err:
        serve_check(triton.urls, scenario["name"], scenario["images"], scenario["targets"],
                    scenario["offline"] - 0.3, cfg)
    assert err.value.metrics["passed"] is False
    with Client("grpc", triton.urls["grpc"], 10) as c:
        assert not c.is_model_ready(scenario["name"])


def test_serve_check_reports_unknown_model(triton, scenario):
    cfg = serve_settings(protocols=["http"])
    with pytest.raises(ServeCheckError, match="not in the repository index"):
        serve_check(triton.urls, "no_such_model", scenario["images"], scenario["targets"], 0.5, cfg)


def test_serve_check_detects_a_wrong_labels_file(triton, scenario):
    # A second model in the served repository whose labels.txt is in the wrong order.
    bad = python_backend_twin(scenario["exported"], scenario["twin"].parent, name="sea_life_badlabels")
    (bad / "labels.txt").write_text("\n".join(reversed(LABELS)) + "\n")
    cfg = serve_settings(protocols=["http"], concurrencies=[1], requests_per_concurrency=2)
    with pytest.raises(ServeCheckError, match="labels disagree") as err:
        serve_check(triton.urls, "sea_life_badlabels", scenario["images"], scenario["targets"],
                    scenario["offline"], cfg, class_names=LABELS)
    m = err.value.metrics["protocols"]["http"]
    assert m["accuracy_ok"] and m["label_mismatches"] > 0  # only the labels are wrong


def test_repository_served_from_s3(scenario, s3_env, tmp_path):
    """Triton reads the repository from s3://host:port/bucket/prefix on the moto server."""
    client = s3_client(S3Config(max_attempts=2, connect_timeout_s=2.0, read_timeout_s=10.0))
    client.create_bucket(Bucket="triton-repo")
    local = tmp_path / "repo"
    shutil.copytree(scenario["twin"], local / scenario["name"])
    upload_repository(local, "s3://triton-repo/serving/v1", client)
    repo_url = triton_repository_url("s3://triton-repo/serving/v1")
    assert repo_url == f"s3://127.0.0.1:{s3_env.port}/triton-repo/serving/v1"

    with running_triton(repo_url, tmp_path / "triton", extra_env=s3_env.env) as server:
        with Client("http", server.urls["http"], 60) as c:
            assert {e["name"] for e in c.repository_index()} == {scenario["name"]}
            load_model(c, scenario["name"], 60)
            try:
                acc = evaluate(c, scenario["name"], scenario["images"], scenario["targets"], 16, LABELS)
            finally:
                unload_model(c, scenario["name"], 60)
    assert acc["accuracy"] == pytest.approx(scenario["offline"], abs=1 / N_IMAGES)
    assert acc["label_mismatches"] == 0

"""The retrain -> export -> serve-check stages on the tiny pipeline: a retrained scenario exported
to ONNX and a Triton repository (locally and to S3 on a moto server), then checked on the bundled
tritonserver that serve-check starts by itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, TINY
from servers import moto_server, s3_env  # noqa: F401  (pytest fixtures)

import tailor.export
from tailor import stages
from tailor.data import Meta
from tailor.export import (
    check_config,
    download_repository,
    read_config,
    read_signature,
    s3_client,
)
from tailor.export.triton import ONNX_PLATFORM
from tailor.search.common import SearchError
from tailor.serve_local import free_port
from tailor.utils import fingerprint

NAME = "sc0__madds_300000"  # tests/tiny.yaml's scenario: sc0 at 300000 MAdds


@pytest.fixture(scope="module")
def retrained(tiny_run, tmp_path_factory):
    p = tiny_run["params"]
    root = tmp_path_factory.mktemp("stages_export")
    s = p.retrain.scenarios[0]
    arch = stages.choose_arch(p, root / "no-search-yet", s.superclass, s.budget)  # the explicit arch
    assert str(arch) == s.arch
    model = root / "retrain" / stages.scenario_id(s.superclass, s.budget) / "model.pt"
    metrics = stages.retrain(p, tiny_run["data"], tiny_run["supernet"], s.superclass, s.budget, arch, model,
                             root / "metrics" / "retrain.json", root / "runs" / "retrain")
    return {"p": p, "root": root, "data": tiny_run["data"], "supernet": tiny_run["supernet"], "model": model,
            "metrics": metrics}


@pytest.fixture(scope="module")
def exported(retrained):
    r = retrained
    metrics = stages.export(r["p"], [r["model"]], r["data"], r["root"] / "triton", r["root"] / "metrics" / "export.json",
                            r["root"] / "onnx")
    return {**r, "export": metrics, "repo": r["root"] / "triton"}


def test_choose_arch_from_params_or_search_results(retrained, tmp_path):
    p = retrained["p"]
    assert retrained["metrics"]["budget_unit"] == "MAdds"
    assert stages.scenario_id("sc0", 300000.0) == "sc0__300000"  # as dvc.yaml's foreach spells it
    with pytest.raises(FileNotFoundError, match="no search results.*--arch"):
        stages.choose_arch(p, tmp_path, "sc1", 600000)  # no explicit arch for this scenario
    arch = "k3e3.k3e3_k3e3.k3e3_k3e3.k3e3_k3e3.k3e3_k3e3.k3e3"
    other = "k3e3.k3e3_k3e3.k3e3_k3e3.k3e3_k3e3.k3e3_k5e3.k3e3"
    # Retrain takes the pick of the first of search.seeds, whatever order the rows come in.
    rows = [{"superclass": "sc1", "budget": 600000.0, "arch": other, "seed": 4},
            {"superclass": "sc1", "budget": 600000.0, "arch": arch, "seed": 7}]
    doc = {"cost": {"kind": "madds", "unit": "MAdds"}, "seeds": [7, 4], "methods": {p.retrain.method: {"rows": rows}}}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    assert str(stages.choose_arch(p, tmp_path, "sc1", 600000)) == arch
    with pytest.raises(SearchError, match="no scenario sc2"):
        stages.choose_arch(p, tmp_path, "sc2", 600000)
    doc["cost"]["unit"] = "ms"
    (tmp_path / "results.json").write_text(json.dumps(doc))
    with pytest.raises(SearchError, match="budgets are in ms"):
        stages.choose_arch(p, tmp_path, "sc1", 600000)


def test_retrain_recomputes_bn_statistics_on_its_training_data(retrained, tmp_path):
    """With retrain.data 'superclass' a retrain takes few steps, so the momentum average of the BN
    statistics still held much of the supernet's shared statistics (test top-1 0.56 instead of 0.99
    on the default data): the saved statistics must be those of the superclass's training images."""
    from tailor import data as datamod
    from tailor.data import Batches
    from tailor.supernet import recalibrate_bn

    p = retrained["p"]
    p = p.model_copy(update={"retrain": p.retrain.model_copy(update={"data": "superclass"})})
    s = p.retrain.scenarios[0]
    arch = stages.choose_arch(p, tmp_path, s.superclass, s.budget)
    stages.retrain(p, retrained["data"], retrained["supernet"], s.superclass, s.budget, arch, tmp_path / "model.pt",
                   tmp_path / "metrics.json", tmp_path / "run")
    net, ck = stages.load_specialized(tmp_path / "model.pt")
    x, y = datamod.load_split(retrained["data"], "train")
    sel = np.isin(y, ck["classes"])
    b = Batches(x[sel], y[sel], Meta.load(retrained["data"]), torch.device("cpu"), p.runtime.bn_recal_batch_size)
    it = b.epoch(p.seed, augment=False, drop_last=False)
    fresh, _ = stages.load_specialized(tmp_path / "model.pt")
    with torch.no_grad():
        recalibrate_bn(fresh, [next(it)[0] for _ in range(min(p.runtime.bn_recal_batches, b.num_batches(False)))])
    saved = {k: v for k, v in net.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    assert saved
    for k, v in saved.items():
        torch.testing.assert_close(v, fresh.state_dict()[k], rtol=1e-4, atol=1e-5, msg=k)


def test_export_writes_a_checked_repository(exported):
    p, m, repo = exported["p"], exported["export"], exported["repo"]
    assert m["passed"] and list(m["models"]) == [NAME]
    e = m["models"][NAME]
    assert e["parity_max_abs"] <= 1e-4 and e["parity_images"] == 16
    # fp32 on CPU: the exported file classifies the superclass's test images as PyTorch did in retrain
    assert e["onnx_test_top1"] == pytest.approx(exported["metrics"]["test_top1"], abs=1e-5)
    assert e["test_top1"] == exported["metrics"]["test_top1"] and e["test_images"] == 16
    assert set(e["ort_cpu_latency_ms"]) == {"batch_1", "batch_4"} and all(v > 0 for v in e["ort_cpu_latency_ms"].values())
    # timed again as profile-latency times its nets, under each profiled target that can run an ONNX file here
    pr, targets = p.latency.protocol, [t for t in p.latency.target if p.latency.targets[t].runtime == "onnxruntime"]
    assert targets and list(e["target_latency"]) == targets
    assert all(v["calls"] == pr.repeats * pr.rounds and v["ms"] > 0 for v in e["target_latency"].values())
    assert e["onnx_bytes"] == (repo / NAME / "1" / "model.onnx").stat().st_size
    assert json.loads((exported["root"] / "metrics" / "export.json").read_text()) == m

    assert sorted(x.name for x in repo.iterdir()) == [".tailor-output", NAME]  # the marker: a later export may replace it
    model_dir = repo / NAME
    assert sorted(x.relative_to(model_dir).as_posix() for x in model_dir.rglob("*") if x.is_file()) == [
        "1/model.onnx", "config.pbtxt", "labels.txt"]
    meta = Meta.load(exported["data"])
    labels = (model_dir / "labels.txt").read_text().splitlines()
    assert labels == [meta.classes[c] for c in meta.classes_of(0)]
    sig = read_signature(model_dir / "1" / "model.onnx")
    check_config(read_config(model_dir), NAME, sig, platform=ONNX_PLATFORM, labels=labels)  # Triton's schema + graph
    assert read_config(model_dir).max_batch_size == p.export.max_batch_size
    ck = torch.load(exported["model"], map_location="cpu", weights_only=False)
    assert sig.metadata["arch"] == ck["arch"] and sig.metadata["superclass"] == "sc0"
    assert sig.metadata["params_hash"] == fingerprint(ck["params"]) and sig.metadata["budget_unit"] == "MAdds"
    assert sig.opset >= 17
    assert (exported["root"] / "onnx" / f"{NAME}.onnx").read_bytes() == (model_dir / "1" / "model.onnx").read_bytes()
    assert not [x for x in exported["root"].iterdir() if x.name.startswith(".")]  # no staging left behind


def test_export_fails_on_parity_and_writes_no_repository(retrained, monkeypatch, tmp_path):
    monkeypatch.setattr(tailor.export, "parity", lambda *a, **k: 0.5)
    with pytest.raises(stages.ExportError, match=f"parity above export.parity_tolerance.*{NAME}"):
        stages.export(retrained["p"], [retrained["model"]], retrained["data"], tmp_path / "triton",
                      tmp_path / "export.json", tmp_path / "onnx")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["export.json"]
    m = json.loads((tmp_path / "export.json").read_text())
    assert m["passed"] is False and m["models"][NAME]["parity_ok"] is False


def test_export_to_s3(exported, s3_env, tmp_path):
    client = s3_client(exported["p"].export.s3)
    client.create_bucket(Bucket="tailor-models")
    url = "s3://tailor-models/serving/v1"
    m = stages.export(exported["p"], [exported["model"]], exported["data"], url, tmp_path / "export.json")
    assert m["passed"] and m["repository"] == url
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="tailor-models")["Contents"])
    assert keys == [f"serving/v1/{NAME}/1/model.onnx", f"serving/v1/{NAME}/config.pbtxt", f"serving/v1/{NAME}/labels.txt"]
    down = tmp_path / "down"
    download_repository(url, down, client)
    for rel in ("config.pbtxt", "labels.txt"):
        assert (down / NAME / rel).read_bytes() == (exported["repo"] / NAME / rel).read_bytes()
    assert read_signature(down / NAME / "1" / "model.onnx").metadata["arch"] == exported["metrics"]["arch"]


def test_serve_check_on_the_bundled_tritonserver(exported):
    pytest.importorskip("pytriton")
    metrics_path = exported["root"] / "metrics" / "serve.json"
    m = stages.serve_check(exported["p"], exported["repo"], exported["data"], metrics_path)
    assert m["passed"] and m["problems"] == []
    assert m["server"]["mode"].startswith("bundled") and m["server"]["version"]
    assert json.loads(metrics_path.read_text()) == m
    e = m["models"][NAME]
    offline = exported["metrics"]["test_top1"]
    assert e["images"] == 16 and e["retrain_test_top1"] == offline
    assert set(e["protocols"]) == {"http", "grpc"}
    for protocol, pm in e["protocols"].items():
        assert pm["accuracy"] == pytest.approx(offline, abs=1e-5), protocol  # served == offline
        assert pm["accuracy_ok"] and pm["label_mismatches"] == 0
        assert pm["config"]["inputs"] == {"images": ["TYPE_UINT8", [16, 16, 3]]}
        assert [lv["concurrency"] for lv in pm["latency"]] == [1, 2]
        for lv in pm["latency"]:
            assert lv["requests"] == 10 and lv["errors"] == 0
            assert 0 < lv["p50_ms"] <= lv["p90_ms"] <= lv["p99_ms"] and lv["throughput_img_per_s"] > 0
        assert set(e["latency_summary"][protocol]) == {"c1", "c2"}


def test_cli_serve_check_writes_metrics_and_fails_without_a_server(exported, tmp_path):
    overlay = tmp_path / "fast.yaml"
    overlay.write_text(yaml.safe_dump({"serve": {"ready_timeout_s": 1}}))
    metrics = tmp_path / "serve.json"
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.pop("TRITON_GRPC_URL", None)
    r = subprocess.run([sys.executable, "-m", "tailor.cli", "serve-check", "--params", ROOT / "params.yaml",
                        "--preset", TINY, "--preset", overlay, "--repo", exported["repo"], "--data", exported["data"],
                        "--metrics", metrics, "--url", f"http://127.0.0.1:{free_port()}"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "serve-check failed" in r.stderr and "timed out" in r.stderr
    m = json.loads(metrics.read_text())
    assert m["passed"] is False and m["protocols"] == ["http"] and m["server"]["mode"] == "external"
    assert m["models"][NAME]["protocols"]["http"]["url"].startswith("127.0.0.1:")


def test_serve_check_refuses_a_repository_that_does_not_match_the_data(exported, tmp_path):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(exported["repo"], repo)
    (repo / NAME / "labels.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="do not belong together"):
        stages.serve_check(exported["p"], repo, exported["data"], tmp_path / "serve.json")
    with pytest.raises(ValueError, match="TLS"):
        stages.serve_check(exported["p"], exported["repo"], exported["data"], tmp_path / "serve.json",
                           url="https://triton:8000")

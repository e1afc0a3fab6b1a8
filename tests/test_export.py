"""ONNX export, Triton repository writer and python-backend twin (no server needed)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from pydantic import ValidationError
from servers import export_settings, tiny_cnn

from tailor.export import (
    ExportConfig,
    TritonConfigError,
    build_config_text,
    check_config,
    export_onnx,
    parity,
    parse_config,
    python_backend_twin,
    read_config,
    read_signature,
    triton_model_name,
    write_model,
)
from tailor.export.onnx_export import ort_session
from tailor.export.triton import ONNX_PLATFORM, PYTHON_BACKEND

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LABELS = ["crab", "eel", "jellyfish", "octopus", "seal"]


@pytest.fixture(scope="module")
def model():
    return tiny_cnn()


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    meta = {"arch": "d2-e3-k5", "superclass": "sea_life", "code_version": "abc123", "params_hash": "f00d"}
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx", 32, MEAN, STD, 17, meta)


def images(n, seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- ONNX
def test_export_signature_checker_and_metadata(onnx_file):
    proto = onnx.load(str(onnx_file))
    onnx.checker.check_model(proto, full_check=True)
    sig = read_signature(onnx_file)
    assert sig.opset >= 17
    assert [(t.name, t.dtype, t.shape) for t in sig.inputs] == [("images", "uint8", (-1, 32, 32, 3))]
    assert [(t.name, t.dtype, t.shape) for t in sig.outputs] == [
        ("logits", "float32", (-1, 5)),
        ("probs", "float32", (-1, 5)),
    ]
    # the batch axis is symbolic in the graph, not a fixed 2 from the dummy input
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert sig.metadata["arch"] == "d2-e3-k5"
    assert sig.metadata["superclass"] == "sea_life"
    assert sig.metadata["code_version"] == "abc123"
    assert sig.metadata["params_hash"] == "f00d"
    assert [float(x) for x in sig.metadata["tailor.mean"].split(",")] == list(MEAN)


@pytest.mark.parametrize("n", [1, 3, 16])
def test_parity_with_pytorch_for_any_batch(onnx_file, model, n):
    assert parity(onnx_file, model, images(n, seed=n)) <= 1e-4


def test_normalisation_inside_graph_matches_reference(onnx_file, model):
    x = images(4, seed=7)
    logits, probs = ort_session(onnx_file).run(["logits", "probs"], {"images": x})
    # Reference written independently of the wrapper: (pixel/255 - mean)/std, NCHW.
    ref_in = (torch.from_numpy(x).float().permute(0, 3, 1, 2) / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(
        STD
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model(ref_in).numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == logits.argmax(1)).all()


def test_parity_detects_a_different_model(onnx_file):
    other = tiny_cnn(seed=1)
    assert parity(onnx_file, other, images(4)) > 1e-3


class _OneLogitShifted(torch.nn.Module):
    """The model with one logit of one image moved by `delta`: a single-entry disagreement."""

    def __init__(self, base, delta):
        super().__init__()
        self.base, self.delta = base, delta

    def forward(self, x):
        y = self.base(x).clone()
        y[-1, 0] += self.delta
        return y


@pytest.mark.parametrize("delta", [2e-4, 5e-3])
def test_parity_is_the_largest_single_disagreement(onnx_file, model, delta):
    """Parity is a max over every logit and probability: one entry off by delta, out of 8 x classes,
    must show as >= delta (a mean would hide it), and probabilities count on their own."""
    got = parity(onnx_file, _OneLogitShifted(model, delta), images(8))
    assert delta * 0.9 <= got <= delta * 1.1 + 1e-5


def test_parity_counts_probabilities_on_their_own(onnx_file, model, monkeypatch):
    from tailor.export import onnx_export

    class ProbsOff(onnx_export.UInt8Classifier):
        def forward(self, images):
            logits, probs = super().forward(images)
            bump = torch.zeros_like(probs)
            bump[0, 0] = 1e-3
            return logits, probs + bump

    monkeypatch.setattr(onnx_export, "UInt8Classifier", ProbsOff)
    assert parity(onnx_file, model, images(4)) >= 0.9e-3  # logits agree exactly; one probability is off


def test_export_restores_training_mode_and_is_atomic(tmp_path):
    model = tiny_cnn().train()
    export_onnx(model, tmp_path / "ok.onnx", 32, MEAN, STD)
    assert model.training

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        export_onnx(Broken(), tmp_path / "broken.onnx", 32, MEAN, STD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.onnx"]  # no temp file, no partial file


def test_export_rejects_bad_arguments(tmp_path, model):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", 32, MEAN, STD, opset=13)
    with pytest.raises(TypeError, match="str to str"):
        export_onnx(model, tmp_path / "m.onnx", 32, MEAN, STD, metadata={"budget": 3.5})
    with pytest.raises(ValueError, match="std"):
        export_onnx(model, tmp_path / "m.onnx", 32, MEAN, (0.2, 0.0, 0.2))
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- names
@pytest.mark.parametrize(
    "args, expected",
    [
        (("sea_life", 3.5, "MMAdds"), "sea_life__mmadds_3p5"),
        (("sea_life", 10, "mmadds"), "sea_life__mmadds_10"),
        (("vehicles-2", 0.25, "ms"), "vehicles-2__ms_0p25"),
        (("x", 1e-3, "ms"), "x__ms_0p001"),
    ],
)
def test_triton_model_name(args, expected):
    assert triton_model_name(*args) == expected


@pytest.mark.parametrize(
    "args, match",
    [
        (("sea life", 3.5, "MMAdds"), r"invalid Triton model name 'sea life'.*\[' '\]"),
        (("sea/life", 3.5, "MMAdds"), "invalid Triton model name"),
        (("", 3.5, "MMAdds"), "empty"),
        (("sea_life", 0, "MMAdds"), "positive finite"),
        (("sea_life", float("nan"), "MMAdds"), "positive finite"),
        (("sea_life", -1.0, "MMAdds"), "positive finite"),
        (("sea_life", 3.5, "M Adds"), "unit"),
    ],
)
def test_triton_model_name_errors(args, match):
    with pytest.raises(ValueError, match=match):
        triton_model_name(*args)


# ---------------------------------------------------------------- settings
def test_export_config_is_strict_and_validated():
    cfg = export_settings()
    with pytest.raises(ValidationError):
        ExportConfig(**{**cfg.model_dump(), "unknown_key": 1})
    with pytest.raises(ValidationError, match="preferred_batch_sizes"):
        export_settings(preferred_batch_sizes=[4, 32])
    with pytest.raises(ValidationError, match="tensorrt"):
        export_settings(tensorrt=True, instance_kind="cpu")
    with pytest.raises(ValidationError):
        export_settings(opset=16)
    with pytest.raises(ValidationError):
        cfg.max_batch_size = 3  # frozen
    missing = cfg.model_dump()
    del missing["max_queue_delay_us"]
    with pytest.raises(ValidationError, match="max_queue_delay_us"):
        ExportConfig(**missing)  # no defaults


# ---------------------------------------------------------------- Triton repository
def test_write_model_layout_and_config(onnx_file, tmp_path):
    name = triton_model_name("sea_life", 3.5, "MMAdds")
    model_dir = write_model(tmp_path / "repo", name, onnx_file, LABELS, export_settings())
    files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    assert files == ["1/model.onnx", "config.pbtxt", "labels.txt"]
    assert (model_dir / "labels.txt").read_text().splitlines() == LABELS
    assert (model_dir / "1" / "model.onnx").read_bytes() == onnx_file.read_bytes()
    assert [p.name for p in (tmp_path / "repo").iterdir()] == [name]  # no staging dir left

    cfg = read_config(model_dir)
    assert cfg.name == name and cfg.platform == ONNX_PLATFORM and cfg.max_batch_size == 16
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("images", [32, 32, 3])]
    assert [(o.name, list(o.dims), o.label_filename) for o in cfg.output] == [
        ("logits", [5], ""),
        ("probs", [5], "labels.txt"),
    ]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(cfg.instance_group[0].KIND_CPU, 1)]
    assert not cfg.HasField("optimization")  # "all" = the backend's default
    assert cfg.parameters["intra_op_thread_count"].string_value == "1"


def test_write_model_gpu_tensorrt_and_graph_level(onnx_file, tmp_path):
    cfg_gpu = export_settings(instance_kind="gpu", instance_count=2, tensorrt=True, graph_optimization_level="basic")
    cfg = read_config(write_model(tmp_path, "m_gpu", onnx_file, LABELS, cfg_gpu))
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(cfg.instance_group[0].KIND_GPU, 2)]
    assert cfg.optimization.graph.level == -1
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"


def test_write_model_replaces_previous_version(onnx_file, tmp_path):
    write_model(tmp_path, "m", onnx_file, LABELS, export_settings())
    (tmp_path / "m" / "stale.txt").write_text("old")
    write_model(tmp_path, "m", onnx_file, LABELS, export_settings(max_batch_size=32))
    assert not (tmp_path / "m" / "stale.txt").exists()
    assert read_config(tmp_path / "m").max_batch_size == 32
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.mark.parametrize(
    "labels, match",
    [
        (LABELS[:4], "4 labels"),
        (["a", "b", "c", "d", "a"], "not unique"),
        (["a", "b", "c", "d", "e\nf"], "single-line"),
    ],
)
def test_write_model_rejects_bad_labels_and_writes_nothing(onnx_file, tmp_path, labels, match):
    with pytest.raises(ValueError, match=match):
        write_model(tmp_path / "repo", "m", onnx_file, labels, export_settings())
    assert not (tmp_path / "repo").exists() or not list((tmp_path / "repo").iterdir())


def test_write_model_rejects_invalid_name(onnx_file, tmp_path):
    with pytest.raises(ValueError, match="invalid Triton model name"):
        write_model(tmp_path, "../evil", onnx_file, LABELS, export_settings())


def test_config_check_catches_mismatch_with_onnx_graph(onnx_file):
    sig = read_signature(onnx_file)
    good = build_config_text("m", sig, export_settings())
    check_config(parse_config(good), "m", sig, platform=ONNX_PLATFORM, labels=LABELS)
    cases = {
        "dims": good.replace("dims: [32, 32, 3]", "dims: [64, 64, 3]"),
        "data_type": good.replace("TYPE_UINT8", "TYPE_FP32"),
        "names": good.replace('name: "probs"', 'name: "prob"'),
        "label_filename": good.replace('label_filename: "labels.txt"', ""),
        "platform": good.replace(ONNX_PLATFORM, "tensorrt_plan"),
        "preferred_batch_size": good.replace("preferred_batch_size: 8", "preferred_batch_size: 64"),
    }
    for what, text in cases.items():
        with pytest.raises(TritonConfigError, match=what):
            check_config(parse_config(text), "m", sig, platform=ONNX_PLATFORM, labels=LABELS)
    with pytest.raises(TritonConfigError, match="name"):
        check_config(parse_config(good), "other", sig, platform=ONNX_PLATFORM)
    with pytest.raises(TritonConfigError, match="does not parse"):
        parse_config(good.replace("max_batch_size: 16", "max_batch_size: sixteen"))
    with pytest.raises(TritonConfigError, match="does not parse"):
        parse_config(good + "\nnot_a_field: 1\n")


# ---------------------------------------------------------------- python-backend twin
def test_python_backend_twin_keeps_the_interface(onnx_file, tmp_path):
    gpu = export_settings(instance_kind="gpu", tensorrt=True, graph_optimization_level="extended")
    exported_dir = write_model(tmp_path / "repo", "sea_life__mmadds_3p5", onnx_file, LABELS, gpu)
    twin_dir = python_backend_twin(exported_dir, tmp_path / "twin")
    exported, twin = read_config(exported_dir), read_config(twin_dir)
    assert twin.backend == PYTHON_BACKEND and twin.platform == ""
    assert twin.name == exported.name
    for field in ("input", "output", "max_batch_size", "dynamic_batching", "parameters"):
        assert getattr(twin, field) == getattr(exported, field), field
    assert twin.optimization.graph.level == 1  # the twin's onnxruntime session reads it
    assert not twin.optimization.execution_accelerators.gpu_execution_accelerator
    assert [g.kind for g in twin.instance_group] == [twin.instance_group[0].KIND_CPU]
    assert sorted(p.relative_to(twin_dir).as_posix() for p in twin_dir.rglob("*") if p.is_file()) == [
        "1/model.onnx",
        "1/model.py",
        "config.pbtxt",
        "labels.txt",
    ]
    assert (twin_dir / "1" / "model.onnx").read_bytes() == onnx_file.read_bytes()
    compile((twin_dir / "1" / "model.py").read_text(), "model.py", "exec")

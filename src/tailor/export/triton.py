"""Triton model repository writer.

    <repo>/<model>/config.pbtxt
    <repo>/<model>/1/model.onnx
    <repo>/<model>/labels.txt       one class name per line, label_filename of the `probs` output

Every config.pbtxt is built as text, parsed with text_format into Triton's own ModelConfig
message and checked against the ONNX file's actual graph before anything is written; the model
directory is assembled under a temporary name inside the repository and renamed into place.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from .onnx_export import PROBS_NAME, OnnxSignature, TensorSpec, read_signature
from .settings import ExportConfig

ONNX_PLATFORM = "onnxruntime_onnx"
PYTHON_BACKEND = "python"
VERSION = "1"
MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_NUMPY_TO_TRITON = {
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
    "bool": "TYPE_BOOL",
}
# onnxruntime backend's optimization.graph.level: -1 basic, 1 basic+extended, 2 none; absent = all.
_GRAPH_LEVEL = {"all": None, "extended": 1, "basic": -1, "disabled": 2}


class TritonConfigError(ValueError):
    """A generated config.pbtxt does not parse, or does not describe the ONNX file it serves."""


# ---------------------------------------------------------------- names
def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        bad = sorted({c for c in str(name) if not re.match(r"[A-Za-z0-9_-]", c)})
        raise ValueError(
            f"invalid Triton model name {name!r}: only letters, digits, '_' and '-' are allowed"
            + (f" (found {bad})" if bad else " (it is empty)")
        )
    return name


def _budget_token(budget: float) -> str:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive finite number, got {budget!r}")
    # Fixed-point (never exponent) with the decimal point spelled 'p': 3.5 -> 3p5, 10 -> 10.
    text = f"{float(budget):.6f}".rstrip("0").rstrip(".")
    if text in ("", "0"):
        raise ValueError(f"budget {budget!r} is below the 1e-6 resolution of model names")
    return text.replace(".", "p")


def triton_model_name(superclass: str, budget: float, unit: str) -> str:
    """Model name of one scenario, e.g. ("sea_life", 3.5, "MMAdds") -> "sea_life__mmadds_3p5".

    The superclass is validated, not rewritten: two superclasses must never collapse to one name.
    """
    validate_model_name(superclass)
    unit_token = unit.lower() if isinstance(unit, str) else unit
    if not isinstance(unit_token, str) or not re.fullmatch(r"[a-z0-9]+", unit_token):
        raise ValueError(f"budget unit must be letters/digits only (e.g. 'mmadds', 'ms'), got {unit!r}")
    return validate_model_name(f"{superclass}__{unit_token}_{_budget_token(budget)}")


# ---------------------------------------------------------------- config text
def _dims(spec: TensorSpec) -> list[int]:
    # With max_batch_size > 0 Triton's dims exclude the batch axis, which must be the dynamic one.
    if not spec.shape or spec.shape[0] != -1:
        raise TritonConfigError(f"{spec.name}: first axis must be the dynamic batch axis, shape {spec.shape}")
    return list(spec.shape[1:])


def _triton_dtype(spec: TensorSpec) -> str:
    try:
        return _NUMPY_TO_TRITON[spec.dtype]
    except KeyError:
        raise TritonConfigError(f"{spec.name}: no Triton data type for {spec.dtype}") from None


def build_config_text(name: str, signature: OnnxSignature, cfg: ExportConfig) -> str:
    """config.pbtxt for the onnxruntime backend, as text (parse and check it before use)."""
    lines = [
        f'name: "{name}"',
        f'platform: "{ONNX_PLATFORM}"',
        f"max_batch_size: {cfg.max_batch_size}",
    ]
    for spec in signature.inputs:
        lines += [
            "input [",
            "  {",
            f'    name: "{spec.name}"',
            f"    data_type: {_triton_dtype(spec)}",
            f"    dims: {_dims(spec)}",
            "  }",
            "]",
        ]
    for spec in signature.outputs:
        label = f'\n    label_filename: "{LABELS_FILE}"' if spec.name == PROBS_NAME else ""
        lines += [
            "output [",
            "  {",
            f'    name: "{spec.name}"',
            f"    data_type: {_triton_dtype(spec)}",
            f"    dims: {_dims(spec)}{label}",
            "  }",
            "]",
        ]
    lines += ["dynamic_batching {"]
    lines += [f"  preferred_batch_size: {b}" for b in cfg.preferred_batch_sizes]
    lines += [f"  max_queue_delay_microseconds: {cfg.max_queue_delay_us}", "}"]
    kind = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}[cfg.instance_kind]
    lines += ["instance_group [", f"  {{ kind: {kind} count: {cfg.instance_count} }}", "]"]
    opt = []
    level = _GRAPH_LEVEL[cfg.graph_optimization_level]
    if level is not None:
        opt += [f"  graph {{ level: {level} }}"]
    if cfg.tensorrt:
        opt += [
            "  execution_accelerators {",
            "    gpu_execution_accelerator [",
            "      {",
            '        name: "tensorrt"',
            f'        parameters {{ key: "precision_mode" value: "{cfg.tensorrt_precision}" }}',
            "      }",
            "    ]",
            "  }",
        ]
    if opt:
        lines += ["optimization {", *opt, "}"]
    lines += [
        "parameters {",
        '  key: "intra_op_thread_count"',
        f'  value: {{ string_value: "{cfg.intra_op_threads}" }}',
        "}",
    ]
    return "\n".join(lines) + "\n"


def parse_config(text: str) -> mc.ModelConfig:
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as e:
        raise TritonConfigError(f"config.pbtxt does not parse as Triton's ModelConfig: {e}") from e


def read_config(model_dir: str | os.PathLike) -> mc.ModelConfig:
    return parse_config((Path(model_dir) / CONFIG_FILE).read_text())


def check_config(
    config: mc.ModelConfig,
    name: str,
    signature: OnnxSignature,
    *,
    platform: str = "",
    backend: str = "",
    labels: Sequence[str] | None = None,
) -> None:
    """Raise TritonConfigError unless `config` serves exactly the ONNX graph of `signature`."""
    problems = []
    if config.name != name:
        problems.append(f"name {config.name!r} != {name!r}")
    if config.platform != platform or config.backend != backend:
        problems.append(
            f"platform/backend {config.platform!r}/{config.backend!r} != {platform!r}/{backend!r}"
        )
    if config.max_batch_size < 1:
        problems.append(f"max_batch_size {config.max_batch_size} < 1 (the batch axis is dynamic)")

    def compare(kind, got, want):
        got_map = {t.name: t for t in got}
        if len(got_map) != len(got) or set(got_map) != {s.name for s in want}:
            problems.append(f"{kind} names {[t.name for t in got]} != ONNX {[s.name for s in want]}")
            return
        for spec in want:
            t = got_map[spec.name]
            dtype = mc.DataType.Name(t.data_type)
            if dtype != _triton_dtype(spec):
                problems.append(f"{kind} {spec.name}: data_type {dtype} != ONNX {_triton_dtype(spec)}")
            if list(t.dims) != _dims(spec):
                problems.append(f"{kind} {spec.name}: dims {list(t.dims)} != ONNX {_dims(spec)}")

    compare("input", config.input, signature.inputs)
    compare("output", config.output, signature.outputs)

    probs = [o for o in config.output if o.name == PROBS_NAME]
    if not probs or probs[0].label_filename != LABELS_FILE:
        problems.append(f"output {PROBS_NAME!r} must have label_filename {LABELS_FILE!r}")
    elif labels is not None and list(probs[0].dims) != [len(labels)]:
        problems.append(f"{len(labels)} labels for output {PROBS_NAME} of dims {list(probs[0].dims)}")
    for o in config.output:
        if o.label_filename and o.name != PROBS_NAME:
            problems.append(f"output {o.name!r} has a label_filename; only {PROBS_NAME!r} should")

    if not config.HasField("dynamic_batching"):
        problems.append("dynamic_batching is missing")
    else:
        too_big = [b for b in config.dynamic_batching.preferred_batch_size if b > config.max_batch_size]
        if too_big:
            problems.append(f"preferred_batch_size {too_big} > max_batch_size {config.max_batch_size}")
    if not config.instance_group or any(g.count < 1 for g in config.instance_group):
        problems.append("instance_group is missing or has a count < 1")
    if problems:
        raise TritonConfigError(f"config for model {name!r} is wrong: " + "; ".join(problems))


# ---------------------------------------------------------------- writing
def _check_labels(labels: Sequence[str]) -> list[str]:
    labels = list(labels)
    for lab in labels:
        if not isinstance(lab, str) or not lab.strip() or "\n" in lab or "\r" in lab:
            raise ValueError(f"label {lab!r} must be a non-empty single-line string")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels are not unique: {labels}")
    return labels


def _install_dir(staged: Path, target: Path) -> None:
    """Rename a fully written `staged` dir to `target`, replacing any previous `target`."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        old.rmdir()
        os.replace(target, old)
    try:
        os.replace(staged, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_staged(repo: Path, name: str, files: dict[str, bytes | Path]) -> Path:
    repo.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=repo))
    try:
        for rel, content in files.items():
            dst = staged / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, dst)
            else:
                dst.write_bytes(content)
        os.chmod(staged, 0o755)  # mkdtemp makes it 0700; servers may run as another user
        _install_dir(staged, repo / name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return repo / name


def write_model(
    repo: str | os.PathLike,
    name: str,
    onnx_path: str | os.PathLike,
    labels: Sequence[str],
    cfg: ExportConfig,
) -> Path:
    """Write <repo>/<name>/ for the onnxruntime backend; returns the model directory."""
    validate_model_name(name)
    labels = _check_labels(labels)
    onnx_path = Path(onnx_path)
    signature = read_signature(onnx_path)
    text = build_config_text(name, signature, cfg)
    check_config(parse_config(text), name, signature, platform=ONNX_PLATFORM, labels=labels)
    files = {
        CONFIG_FILE: text.encode(),
        f"{VERSION}/{MODEL_FILE}": onnx_path,
        LABELS_FILE: ("\n".join(labels) + "\n").encode(),
    }
    return _write_staged(Path(repo), name, files)


# ---------------------------------------------------------------- python-backend twin
# The bundled test tritonserver (nvidia-pytriton) has only the python backend. The twin runs the
# SAME model.onnx with onnxruntime inside the python backend, under a config that keeps the
# exported inputs, outputs, dims, labels, max_batch_size, dynamic batching and parameters.
TWIN_MODEL_PY = '''\
"""Python-backend twin of an onnxruntime_onnx model: the same model.onnx, run by onnxruntime."""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# optimization.graph.level as the onnxruntime backend reads it (absent = all optimisations).
_LEVELS = {
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        level = int(config.get("optimization", {}).get("graph", {}).get("level", 0))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_thread_count", "0") or 0)
        opts.graph_optimization_level = _LEVELS.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        # Dynamic batching hands over several requests at once: run them as one batch, as the
        # onnxruntime backend does, then split the outputs back per request.
        try:
            feeds = {
                n: [pb_utils.get_input_tensor_by_name(r, n).as_numpy() for r in requests]
                for n in self.input_names
            }
            sizes = [a.shape[0] for a in feeds[self.input_names[0]]]
            outs = self.session.run(self.output_names, {n: np.concatenate(v) for n, v in feeds.items()})
        except Exception as e:  # report to every client instead of killing the stub
            return [pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
                    for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(n, np.ascontiguousarray(o[start:start + size]))
                       for n, o in zip(self.output_names, outs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
'''


def twin_config(exported: mc.ModelConfig, name: str | None = None) -> mc.ModelConfig:
    twin = mc.ModelConfig()
    twin.CopyFrom(exported)
    twin.platform = ""
    twin.backend = PYTHON_BACKEND
    if name is not None:
        twin.name = validate_model_name(name)
    # TensorRT/CUDA accelerators belong to the onnxruntime backend on a GPU; the twin runs on CPU.
    twin.optimization.ClearField("execution_accelerators")
    if twin.optimization == mc.ModelOptimizationPolicy():
        twin.ClearField("optimization")
    for group in twin.instance_group:
        group.kind = mc.ModelInstanceGroup.KIND_CPU
        del group.gpus[:]
    return twin


def python_backend_twin(model_dir: str | os.PathLike, repo: str | os.PathLike, name: str | None = None) -> Path:
    """Write a python-backend twin of the exported model dir into `repo`; returns its directory."""
    model_dir = Path(model_dir)
    exported = read_config(model_dir)
    onnx_path = model_dir / VERSION / MODEL_FILE
    signature = read_signature(onnx_path)
    labels = (model_dir / LABELS_FILE).read_text().splitlines()
    twin = twin_config(exported, name)
    text = text_format.MessageToString(twin)
    parsed = parse_config(text)
    check_config(parsed, twin.name, signature, backend=PYTHON_BACKEND, labels=labels)
    for field in ("input", "output", "max_batch_size", "dynamic_batching", "parameters"):
        if getattr(parsed, field) != getattr(exported, field):
            raise TritonConfigError(f"twin config differs from the exported one in {field}")
    files = {
        CONFIG_FILE: text.encode(),
        f"{VERSION}/{MODEL_FILE}": onnx_path,
        f"{VERSION}/model.py": TWIN_MODEL_PY.encode(),
        LABELS_FILE: (model_dir / LABELS_FILE).read_bytes(),
    }
    return _write_staged(Path(repo), twin.name, files)


def config_to_json(config: mc.ModelConfig) -> str:
    """The JSON form Triton accepts as a load-time config override."""
    return json_format.MessageToJson(config, preserving_proto_field_name=True)


def config_from_json(data: str | dict) -> mc.ModelConfig:
    """Parse the JSON a server returns for get_model_config (HTTP or gRPC as_json)."""
    if isinstance(data, str):
        data = json.loads(data)
    return json_format.ParseDict(data, mc.ModelConfig(), ignore_unknown_fields=True)

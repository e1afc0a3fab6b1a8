"""PyTorch -> ONNX with the serving input convention baked into the graph.

Convention (chosen once, for every exported network):
  input  `images`  UINT8 [N, H, W, 3]  RGB pixels as decoded from an image file
  output `logits`  FP32  [N, C]
  output `probs`   FP32  [N, C]        softmax of logits
Normalisation (per-channel mean/std in 0..1 scale) runs inside the graph, so a client sends
raw pixels and cannot get the preprocessing wrong.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

INPUT_NAME = "images"
LOGITS_NAME = "logits"
PROBS_NAME = "probs"
# mean/std are also recorded in the metadata: parity() rebuilds the reference preprocessing from
# them (checking the file against the model, not against itself), and clients can read them.
MEAN_KEY = "tailor.mean"
STD_KEY = "tailor.std"


class UInt8Input(nn.Module):
    """uint8 NHWC pixels -> normalised float NCHW: the preprocessing every exported graph starts with.

    A module of its own so that latency profiling (tailor.latency) times exactly this part as the
    deployed graph runs it, inside the LUT's stem entry.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 channels, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        mean_t = torch.tensor(mean, dtype=torch.float32)
        std_t = torch.tensor(std, dtype=torch.float32)
        # (x/255 - mean)/std folded into one multiply-add per channel; shaped [1, 3, 1, 1].
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, 3, 1, 1))
        self.register_buffer("shift", (-mean_t / std_t).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The buffers' dtype: fp32 as exported; bf16 when a CUDA latency target casts the module.
        x = images.permute(0, 3, 1, 2).to(self.scale.dtype)  # [N, H, W, 3] -> [N, 3, H, W]
        return x * self.scale + self.shift


class UInt8Classifier(nn.Module):
    """uint8 NHWC pixels -> (logits, probs), wrapping a network that takes normalised float NCHW."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.input = UInt8Input(mean, std)
        self.model = model

    def forward(self, images: torch.Tensor):
        logits = self.model(self.input(images))  # [N, C]
        return logits, torch.softmax(logits, dim=1)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "uint8", "float32"
    shape: tuple[int, ...]  # -1 where the dimension is symbolic (the batch axis)


@dataclass(frozen=True)
class OnnxSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    metadata: dict[str, str]


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    opset: int = 17,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Export `model` (normalised float NCHW -> logits) to `path` under the uint8 NHWC convention.

    `metadata` (arch string, superclass, code version, params hash, ...) goes into the ONNX
    metadata_props. The file appears only complete and checked: it is written under a temporary
    name in the same directory, checked with onnx.checker, then renamed.
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str to str, got {k!r}: {type(v).__name__}")
    if MEAN_KEY in meta or STD_KEY in meta:
        raise ValueError(f"metadata keys {MEAN_KEY!r} and {STD_KEY!r} are reserved (set from mean/std)")
    meta[MEAN_KEY] = ",".join(repr(float(m)) for m in mean)
    meta[STD_KEY] = ",".join(repr(float(s)) for s in std)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    wrapper = UInt8Classifier(_cpu_eval_copy(model), mean, std).eval()
    dummy = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript
            # (not a dependency); its deprecation warning is expected here.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                wrapper,
                (dummy,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[LOGITS_NAME, PROBS_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, LOGITS_NAME: {0: "batch"}, PROBS_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(str(tmp))
        for k, v in sorted(meta.items()):
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
        _check_convention(read_signature(tmp), image_size)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a server may read it as another user
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    # A copy, so the caller's model keeps its device and train/eval mode; fp32 on CPU in eval
    # mode (BN running statistics, no dropout) is what gets exported and what parity compares to.
    return copy.deepcopy(model).to("cpu", torch.float32).eval()


_ONNX_TO_NUMPY = {
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.BOOL: "bool",
}


def _specs(values) -> tuple[TensorSpec, ...]:
    out = []
    for v in values:
        t = v.type.tensor_type
        if t.elem_type not in _ONNX_TO_NUMPY:
            raise ValueError(f"tensor {v.name!r} has an unsupported ONNX element type {t.elem_type}")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        out.append(TensorSpec(v.name, _ONNX_TO_NUMPY[t.elem_type], dims))
    return tuple(out)


def read_signature(onnx_path: str | os.PathLike) -> OnnxSignature:
    """The graph's actual inputs/outputs (names, dtypes, shapes), opset and metadata."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {i.name for i in proto.graph.initializer}
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return OnnxSignature(
        inputs=_specs(i for i in proto.graph.input if i.name not in initializers),
        outputs=_specs(proto.graph.output),
        opset=opset,
        metadata={p.key: p.value for p in proto.metadata_props},
    )


def _check_convention(sig: OnnxSignature, image_size: int) -> None:
    expected_in = (TensorSpec(INPUT_NAME, "uint8", (-1, image_size, image_size, 3)),)
    if sig.inputs != expected_in:
        raise ValueError(f"exported inputs {sig.inputs} differ from the convention {expected_in}")
    names = tuple(o.name for o in sig.outputs)
    if names != (LOGITS_NAME, PROBS_NAME):
        raise ValueError(f"exported outputs {names} differ from ({LOGITS_NAME!r}, {PROBS_NAME!r})")
    for o in sig.outputs:
        if o.dtype != "float32" or len(o.shape) != 2 or o.shape[0] != -1 or o.shape[1] < 1:
            raise ValueError(f"output {o} is not float32 [batch, C] with a dynamic batch axis")


def ort_session(onnx_path: str | os.PathLike, intra_op_threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])


def parity(
    onnx_path: str | os.PathLike, model: nn.Module, images_uint8_nhwc: np.ndarray | torch.Tensor
) -> float:
    """Max abs difference over logits and probs between onnxruntime (CPU) and PyTorch fp32."""
    images = torch.as_tensor(np.asarray(images_uint8_nhwc))
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    sess = ort_session(onnx_path)
    ort_logits, ort_probs = sess.run([LOGITS_NAME, PROBS_NAME], {INPUT_NAME: images.numpy()})
    mean_std = _mean_std_from(onnx_path)
    with torch.no_grad():
        ref_logits, ref_probs = UInt8Classifier(_cpu_eval_copy(model), *mean_std).eval()(images)
    return float(
        max(
            np.abs(ort_logits - ref_logits.numpy()).max(initial=0.0),
            np.abs(ort_probs - ref_probs.numpy()).max(initial=0.0),
        )
    )



def _mean_std_from(onnx_path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    meta = read_signature(onnx_path).metadata
    if MEAN_KEY not in meta or STD_KEY not in meta:
        raise ValueError(f"{onnx_path} has no {MEAN_KEY}/{STD_KEY} metadata; was it made by export_onnx?")
    mean = tuple(float(x) for x in meta[MEAN_KEY].split(","))
    std = tuple(float(x) for x in meta[STD_KEY].split(","))
    return mean, std

"""Settings of the export stage and of serve-check (the `export:` and `serve:` sections of params.yaml).

As everywhere in tailor, the schema holds no defaults: params.yaml is the one source of values.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class S3Config(_Strict):
    """How boto3 talks to S3. Endpoint and credentials are NOT here: they come from AWS_* env vars."""

    max_attempts: int = Field(ge=1, le=20)  # botocore "standard" retry mode, first try included
    connect_timeout_s: float = Field(gt=0)
    read_timeout_s: float = Field(gt=0)


class ExportConfig(_Strict):
    opset: int = Field(ge=17)
    # Max abs difference allowed between onnxruntime (CPU) and PyTorch fp32 on logits and probs.
    parity_tolerance: float = Field(gt=0)
    # How many test images the parity check runs (taken from the test split).
    parity_images: int = Field(ge=1)
    max_batch_size: int = Field(ge=1)
    preferred_batch_sizes: list[int]
    max_queue_delay_us: int = Field(ge=0)
    instance_kind: Literal["cpu", "gpu"]
    instance_count: int = Field(ge=1)
    # onnxruntime graph optimisation: "all" leaves Triton's default (everything on).
    graph_optimization_level: Literal["all", "extended", "basic", "disabled"]
    # onnxruntime intra-op threads per instance; 0 lets onnxruntime pick (= number of cores).
    intra_op_threads: int = Field(ge=0)
    # TensorRT execution accelerator of the onnxruntime backend; only valid with instance_kind gpu.
    tensorrt: bool
    tensorrt_precision: Literal["FP32", "FP16"]
    # onnxruntime CPU latency that the export stage reports per model (with intra_op_threads):
    # the median of `latency_repeats` timed calls after `latency_warmup` untimed ones, per batch size.
    latency_batch_sizes: list[int] = Field(min_length=1)
    latency_warmup: int = Field(ge=0)
    latency_repeats: int = Field(ge=1)
    s3: S3Config

    @model_validator(mode="after")
    def _consistent(self):
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ValueError(
                f"export.preferred_batch_sizes {bad} must lie in 1..max_batch_size ({self.max_batch_size})"
            )
        if len(set(self.preferred_batch_sizes)) != len(self.preferred_batch_sizes):
            raise ValueError(f"export.preferred_batch_sizes has duplicates: {self.preferred_batch_sizes}")
        if any(b < 1 for b in self.latency_batch_sizes):
            raise ValueError(f"export.latency_batch_sizes must be >= 1, got {self.latency_batch_sizes}")
        if self.tensorrt and self.instance_kind != "gpu":
            raise ValueError("export.tensorrt needs export.instance_kind: gpu")
        return self


class ServeConfig(_Strict):
    protocols: list[Literal["http", "grpc"]] = Field(min_length=1)
    ready_timeout_s: float = Field(gt=0)  # server readiness, and model ready after load
    request_timeout_s: float = Field(gt=0)  # one inference request
    load_timeout_s: float = Field(gt=0)  # load (or unload) of one model, until ready
    batch_size: int = Field(ge=1)  # images per request in the accuracy pass
    max_images: int = Field(ge=1)  # bound on the images the accuracy pass sends
    # |server accuracy - offline accuracy| allowed; the same ONNX file on the same images should
    # agree almost exactly, so this is small (argmax ties and GPU kernels are what it absorbs).
    accuracy_tolerance: float = Field(ge=0, le=1)
    concurrencies: list[int] = Field(min_length=1)  # like perf_analyzer --concurrency-range
    requests_per_concurrency: int = Field(ge=1)  # requests sent at each concurrency level
    latency_batch_size: int = Field(ge=1)  # images per request in the latency pass
    latency_timeout_s: float = Field(gt=0)  # wall-clock bound of one concurrency level

    @model_validator(mode="after")
    def _consistent(self):
        if any(c < 1 for c in self.concurrencies):
            raise ValueError(f"serve.concurrencies must be >= 1, got {self.concurrencies}")
        if len(set(self.protocols)) != len(self.protocols):
            raise ValueError(f"serve.protocols has duplicates: {self.protocols}")
        return self

"""Export: ONNX (uint8 NHWC in, logits/probs out), Triton model repository, S3 upload.

Names are imported lazily (PEP 562): tailor.config imports tailor.export.settings for the
params schema, and that must not pull in torch, onnx and tritonclient with it.
"""
from __future__ import annotations

import importlib

_SOURCES = {
    ".onnx_export": ["INPUT_NAME", "LOGITS_NAME", "PROBS_NAME", "OnnxSignature", "TensorSpec", "UInt8Classifier",
                     "UInt8Input", "export_onnx", "parity", "read_signature"],
    ".s3": ["S3Error", "download_repository", "parse_s3_url", "s3_client", "triton_repository_url",
            "upload_repository"],
    ".settings": ["ExportConfig", "S3Config", "ServeConfig"],
    ".triton": ["TritonConfigError", "build_config_text", "check_config", "parse_config", "python_backend_twin",
                "read_config", "triton_model_name", "validate_model_name", "write_model"],
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

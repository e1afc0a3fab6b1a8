from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from components.base import tailor_component
from components.runtime import load_params, log_metrics  # embedded in the component too


@tailor_component
def serve_check(params_yaml: str, repo_url: str, triton_http_url: str, triton_grpc_url: str,
                repository: Input[Artifact], data: Input[Dataset], metrics: Output[Metrics]):
    """serve-check: Triton serves the exported repository as exported (accuracy, labels, latency).
    With Triton URLs, that server (serving repo_url); without, the nvidia-pytriton tritonserver."""
    from pathlib import Path

    from tailor import stages

    log_metrics(metrics, stages.serve_check(load_params(params_yaml), repo_url or repository.path, Path(data.path),
                                            Path(metrics.path), triton_http_url or None, triton_grpc_url or None))

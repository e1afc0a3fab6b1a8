from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from components.base import tailor_component
from components.runtime import load_params, log_metrics, scoped_repo_url  # embedded in the component too


@tailor_component
def serve_check(params_yaml: str, repo_url: str, run_id: str, run_scoped_repo: bool, triton_http_url: str,
                triton_grpc_url: str, repository: Input[Artifact], data: Input[Dataset], metrics: Output[Metrics]):
    """serve-check: Triton serves the exported repository as exported (accuracy, labels, latency).
    With Triton URLs, that server (serving the repository export published); without, the
    nvidia-pytriton tritonserver."""
    from pathlib import Path

    from tailor import stages

    url = scoped_repo_url(repo_url, run_id, run_scoped_repo)
    log_metrics(metrics, stages.serve_check(load_params(params_yaml, "serve-check"), url or repository.path,
                                            Path(data.path), Path(metrics.path), triton_http_url or None,
                                            triton_grpc_url or None))

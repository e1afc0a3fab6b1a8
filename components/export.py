from typing import List

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.base import tailor_component
from components.runtime import load_params, log_metrics, scoped_repo_url  # embedded in the component too


@tailor_component
def export(params_yaml: str, repo_url: str, run_id: str, run_scoped_repo: bool, models: Input[List[Model]],
           data: Input[Dataset], repository: Output[Artifact], onnx: Output[Artifact], metrics: Output[Metrics]):
    """export: ONNX (parity-checked) + the Triton model repository, into the `repository` artifact, or
    uploaded to `repo_url` (s3://bucket/prefix; under <prefix>/<run id> when run_scoped_repo;
    credentials from boto3's default chain) when that is set."""
    from pathlib import Path

    from tailor import stages

    url = scoped_repo_url(repo_url, run_id, run_scoped_repo)
    log_metrics(metrics, stages.export(load_params(params_yaml, "export"), [Path(m.path) for m in models],
                                       Path(data.path), url or repository.path, Path(metrics.path), Path(onnx.path)))

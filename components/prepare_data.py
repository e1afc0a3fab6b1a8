from kfp.dsl import Dataset, Metrics, Output

from components.base import tailor_component
from components.runtime import load_params, log_metrics  # embedded in the component too


@tailor_component
def prepare_data(params_yaml: str, data_uri: str, data: Output[Dataset], metrics: Output[Metrics]):
    """prepare-data: train / val / test splits and the class and superclass tables. data_uri, when
    set, replaces data.path (s3://bucket/key.zip, s3://bucket/prefix, or a path on the data volume)."""
    from pathlib import Path

    from tailor import stages

    log_metrics(metrics, stages.prepare_data(load_params(params_yaml, "prepare-data", data_uri=data_uri),
                                             Path(data.path), Path(metrics.path)))

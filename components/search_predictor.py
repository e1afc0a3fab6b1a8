from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.base import tailor_component
from components.runtime import load_params, log_metrics  # embedded in the component too


@tailor_component
def search_predictor(params_yaml: str, data: Input[Dataset], supernet: Input[Model], predictor: Output[Model],
                     metrics: Output[Metrics]):
    """search-predictor: OFA's accuracy predictor (random subnets measured on every superclass, an MLP)."""
    from pathlib import Path

    from tailor import stages

    log_metrics(metrics, stages.search_predictor(load_params(params_yaml, "search-predictor"), Path(data.path),
                                                 Path(supernet.path), Path(predictor.path)))

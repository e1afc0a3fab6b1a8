from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.base import tailor_component
from components.runtime import load_params, log_metrics, work_dir  # embedded in the component too


@tailor_component
def train_stock(params_yaml: str, data: Input[Dataset], stock: Output[Model], metrics: Output[Metrics]):
    """train-stock: stock torchvision MobileNetV3 anchors (and per-superclass specialists), same loop and data."""
    from pathlib import Path

    from tailor import stages

    log_metrics(metrics, stages.train_stock(load_params(params_yaml, "train-stock"), Path(data.path), Path(stock.path),
                                            Path(metrics.path), work_dir("train-stock", params_yaml, data)))

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.base import tailor_component
from components.runtime import load_params, log_metrics, work_dir  # embedded in the component too


@tailor_component
def train_supernet(params_yaml: str, data: Input[Dataset], teacher: Input[Model], supernet: Output[Model],
                   metrics: Output[Metrics]):
    """train-supernet: progressive shrinking with KD from the teacher and superclass dropout."""
    from pathlib import Path

    from tailor import stages

    log_metrics(metrics, stages.train_supernet(load_params(params_yaml, "train-supernet"), Path(data.path),
                                               Path(teacher.path), Path(supernet.path), Path(metrics.path),
                                               work_dir("train-supernet", params_yaml, data, teacher)))

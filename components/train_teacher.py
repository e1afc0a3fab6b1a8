from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.base import tailor_component
from components.runtime import load_params, log_metrics, work_dir  # embedded in the component too


@tailor_component
def train_teacher(params_yaml: str, data: Input[Dataset], teacher: Output[Model], metrics: Output[Metrics]):
    """train-teacher: the largest network of the space trained alone (the distillation teacher)."""
    from pathlib import Path

    from tailor import stages

    log_metrics(metrics, stages.train_teacher(load_params(params_yaml, "train-teacher"), Path(data.path),
                                              Path(teacher.path), Path(metrics.path),
                                              work_dir("train-teacher", params_yaml, data)))

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.base import tailor_component
from components.runtime import log_metrics  # embedded in the component too

# Compiled in instead of train_teacher / train_supernet when the pipeline trains on several GPUs or
# nodes (pipelines.compile --train-nodes / --train-gpus): the step launches a Kubeflow PyTorchJob
# and waits for it (tailor.launch). `job_json`: the job's compile-time settings; `image`: the run's
# GPU image; `claim`: the checkpoint volume both this step and the job's pods mount.


@tailor_component
def train_teacher_job(params_yaml: str, data: Input[Dataset], teacher: Output[Model], metrics: Output[Metrics],
                      image: str, claim: str, job_json: str):
    """train-teacher as a PyTorchJob: M nodes x N GPUs under torchrun."""
    import json
    from pathlib import Path

    from tailor.launch import train_as_job

    settings = {**json.loads(job_json), "image": image, "claim": claim}
    key = "\n".join([params_yaml, data.uri])
    log_metrics(metrics, train_as_job("train-teacher", params_yaml, key, {"data": Path(data.path)},
                                      {"out": Path(teacher.path), "metrics": Path(metrics.path)}, settings))


@tailor_component
def train_supernet_job(params_yaml: str, data: Input[Dataset], teacher: Input[Model], supernet: Output[Model],
                       metrics: Output[Metrics], image: str, claim: str, job_json: str):
    """train-supernet as a PyTorchJob: M nodes x N GPUs under torchrun."""
    import json
    from pathlib import Path

    from tailor.launch import train_as_job

    settings = {**json.loads(job_json), "image": image, "claim": claim}
    key = "\n".join([params_yaml, data.uri, teacher.uri])
    log_metrics(metrics, train_as_job("train-supernet", params_yaml, key,
                                      {"data": Path(data.path), "teacher": Path(teacher.path)},
                                      {"out": Path(supernet.path), "metrics": Path(metrics.path)}, settings))

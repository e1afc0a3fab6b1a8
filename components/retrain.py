from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.base import tailor_component
from components.runtime import load_params, log_metrics, work_dir  # embedded in the component too


@tailor_component
def retrain(params_yaml: str, scenario: str, data: Input[Dataset], supernet: Input[Model],
            search: Input[Artifact], model: Output[Model], metrics: Output[Metrics], luts: Input[Artifact] = None):
    """retrain for one scenario ("<superclass>@<budget>"): its architecture (the explicit one in
    retrain.scenarios, else the search's pick), trained for that superclass's classes. `luts`: the
    search's latency tables when budgets are latencies (search.cost.kind latency): retrain checks
    the architecture against its budget with the search's own cost model."""
    from pathlib import Path

    from tailor import stages

    p, (superclass, budget) = load_params(params_yaml, "retrain", luts), scenario.rsplit("@", 1)
    log_metrics(metrics, stages.retrain(p, Path(data.path), Path(supernet.path), superclass, float(budget),
                                        stages.choose_arch(p, Path(search.path), superclass, float(budget)),
                                        Path(model.path), Path(metrics.path),
                                        work_dir("retrain", params_yaml, data, supernet, search, scenario)))

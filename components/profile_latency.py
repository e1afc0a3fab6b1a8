from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from components.base import tailor_component
from components.runtime import check_placement, load_params, log_metrics  # embedded in the component too


@tailor_component
def profile_latency(params_yaml: str, target: str, placement_json: str, data: Input[Dataset],
                    luts: Output[Artifact], metrics: Output[Metrics]):
    """profile-latency for one target, run on that target's hardware: luts/<target>.json and its plot."""
    from pathlib import Path

    from tailor import stages

    p = load_params(params_yaml, "profile-latency")
    check_placement(p, target, placement_json)
    log_metrics(metrics, stages.profile_latency(p, Path(data.path), Path(luts.path), Path(metrics.path), [target]))

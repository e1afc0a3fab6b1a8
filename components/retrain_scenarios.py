from typing import List

from kfp.dsl import Dataset, Input

from components.base import tailor_component
from components.runtime import load_params  # embedded in the component too


@tailor_component
def retrain_scenarios(params_yaml: str, data: Input[Dataset]) -> List[str]:
    """retrain.scenarios as "<superclass>@<budget>" keys: the fan-out of retrain (one task each); a null
    superclass stands for every superclass of the data. Strings, not dicts: KFP carries JSON numbers
    as floats, and keys keep task inputs readable. Checks the superclasses params name against the
    data's, for prepare-data, which does not read those keys."""
    from tailor import stages
    from tailor.data import Meta

    p = load_params(params_yaml, "retrain-scenarios", declared_in="pipelines/tailor_pipeline.py KFP_ONLY_PARAMS")
    return [f"{sc}@{b!r}" for sc, b in stages.retrain_scenarios(p, Meta.load(data.path))]

from typing import List

from kfp.dsl import Dataset, Input

from components.base import tailor_component
from components.runtime import load_params  # embedded in the component too


@tailor_component
def retrain_scenarios(params_yaml: str, data: Input[Dataset]) -> List[str]:
    """retrain.scenarios as "<superclass>@<budget>" keys: the fan-out of retrain (one task each); a null
    superclass stands for every superclass of the data. Strings, not dicts: KFP carries JSON numbers
    as floats, and keys keep task inputs readable."""
    from tailor import stages
    from tailor.data import Meta

    return [f"{sc}@{b!r}" for sc, b in stages.retrain_scenarios(load_params(params_yaml), Meta.load(data.path))]

from typing import List

from components.base import tailor_component
from components.runtime import load_params  # embedded in the component too


@tailor_component
def retrain_scenarios(params_yaml: str) -> List[str]:
    """retrain.scenarios as "<superclass>@<budget>" keys: the fan-out of retrain (one task each).
    Strings, not dicts: KFP carries JSON numbers as floats, and keys keep task inputs readable."""
    return [f"{s.superclass}@{s.budget!r}" for s in load_params(params_yaml).retrain.scenarios]

from typing import List

from kfp.dsl import Dataset, Input

from components.base import tailor_component
from components.runtime import load_params  # embedded in the component too


@tailor_component
def search_superclasses(params_yaml: str, data: Input[Dataset]) -> List[str]:
    """The superclasses the search covers (search.superclasses, or all of the data's): the fan-out of
    the per-superclass searches. Not a DVC stage; DVC runs each method over all of them at once."""
    from tailor.data import Meta

    p = load_params(params_yaml, "search-superclasses", declared_in="pipelines/tailor_pipeline.py KFP_ONLY_PARAMS")
    return list(p.search.superclasses or Meta.load(data.path).superclasses)

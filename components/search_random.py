from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.base import tailor_component
from components.runtime import load_params  # embedded in the component too


@tailor_component
def search_random(params_yaml: str, superclass: str, data: Input[Dataset], supernet: Input[Model],
                  result: Output[Artifact], luts: Input[Artifact] = None):
    """search-random for one superclass (independent across superclasses, so they run in parallel)."""
    from pathlib import Path

    from tailor import stages

    stages.search(load_params(params_yaml, "search-random", luts), "random", Path(data.path), Path(supernet.path),
                  Path(result.path), superclasses=[superclass])

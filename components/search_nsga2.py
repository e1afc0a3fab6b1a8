from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.base import tailor_component
from components.runtime import load_params  # embedded in the component too


@tailor_component
def search_nsga2(params_yaml: str, superclass: str, data: Input[Dataset], supernet: Input[Model],
                 predictor: Input[Model], result: Output[Artifact], luts: Input[Artifact] = None):
    """search-nsga2 (SCARLET's constrained, weighted NSGA-II) for one superclass; superclasses run in parallel."""
    from pathlib import Path

    from tailor import stages

    stages.search(load_params(params_yaml, "search-nsga2", luts), "nsga2", Path(data.path), Path(supernet.path),
                  Path(result.path), predictor_path=Path(predictor.path), superclasses=[superclass])

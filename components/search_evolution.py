from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.base import tailor_component
from components.runtime import load_params  # embedded in the component too


@tailor_component
def search_evolution(params_yaml: str, data: Input[Dataset], supernet: Input[Model], predictor: Input[Model],
                     result: Output[Artifact], luts: Input[Artifact] = None):
    """search-evolution: OFA-V (one search for all superclasses, so not split) and OFA-T."""
    from pathlib import Path

    from tailor import stages

    stages.search(load_params(params_yaml, "search-evolution", luts), "evolution", Path(data.path),
                  Path(supernet.path), Path(result.path), predictor_path=Path(predictor.path))

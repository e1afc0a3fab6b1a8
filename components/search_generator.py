from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.base import tailor_component
from components.runtime import load_params  # embedded in the component too


@tailor_component
def search_generator(params_yaml: str, data: Input[Dataset], supernet: Input[Model], result: Output[Artifact],
                     generator: Output[Model], luts: Input[Artifact] = None):
    """search-generator: the EAS generator, trained once, one architecture per scenario in one pass."""
    from pathlib import Path

    from tailor import stages

    stages.search(load_params(params_yaml, "search-generator", luts), "generator", Path(data.path),
                  Path(supernet.path), Path(result.path), generator_out=Path(generator.path))

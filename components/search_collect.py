from typing import List

from kfp.dsl import Artifact, Input, Markdown, Metrics, Output

from components.base import tailor_component
from components.runtime import load_params, log_metrics  # embedded in the component too


@tailor_component
def search_collect(params_yaml: str, generator: Input[Artifact], evolution: Input[Artifact],
                   random: Input[List[Artifact]], nsga2: Input[List[Artifact]], search: Output[Artifact],
                   table: Output[Markdown], metrics: Output[Metrics]):
    """search-collect: merge every method's (per-superclass) result files into search/results.json (the
    DVC layout, which retrain reads) and a Markdown table (rendered by the KFP UI)."""
    from pathlib import Path

    from tailor import stages

    log_metrics(metrics, stages.search_collect(load_params(params_yaml, "search-collect"),
                                               [Path(a.path) for a in [generator, evolution, *random, *nsga2]],
                                               Path(search.path) / "results.json", Path(table.path),
                                               Path(metrics.path)))

from typing import List

from kfp.dsl import Artifact, Input, Markdown, Metrics, Output

from components.base import RUNTIME_FUNCS, tailor_component
from components.runtime import load_params, log_metrics  # embedded in the component too


def gather_metrics(stage_metrics: dict, retrain: list):
    """Lay out upstream Metrics artifacts as the metrics/ folder of a DVC run, which tailor.report reads.

    stage_metrics {file stem: artifact} -> <dir>/<stem>.json; the Collected retrain metrics ->
    <dir>/retrain/<n>.json, n zero-padded so the report lists them in collection (scenario) order.
    Returns the folder: a temp dir removed when the component's process exits. Embedded in the
    report component (kfp `additional_funcs`), so it imports what it uses here.
    """
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(prefix="tailor-report-"))
    atexit.register(shutil.rmtree, root, True)
    (root / "retrain").mkdir()
    for stem, artifact in stage_metrics.items():
        shutil.copyfile(artifact.path, root / f"{stem}.json")
    for n, artifact in enumerate(retrain):
        shutil.copyfile(artifact.path, root / "retrain" / f"{n:04d}.json")
    return root


@tailor_component(additional_funcs=[*RUNTIME_FUNCS, gather_metrics])
def report(params_yaml: str, data: Input[Metrics], teacher: Input[Metrics], supernet: Input[Metrics],
           stock: Input[Metrics], latency: Input[Metrics], search: Input[Metrics], search_table: Input[Markdown],
           search_results: Input[Artifact], retrain: Input[List[Metrics]], export: Input[Metrics], serve: Input[Metrics],
           luts: Input[Artifact], report: Output[Markdown], metrics: Output[Metrics], plots: Output[Artifact]):
    """report: one Markdown page (rendered by the KFP UI) and a summary from every stage's metrics.
    `latency` and `luts`: the metrics and tables of one profile-latency task (the search's LUT
    target, else the first). `search_results`: search-collect's folder; `plots`: the Pareto PNGs and
    their data."""
    from pathlib import Path

    from tailor import stages

    metrics_dir = gather_metrics({"data": data, "teacher": teacher, "supernet": supernet, "stock": stock,
                                  "latency": latency, "search": search, "export": export, "serve": serve}, retrain)
    log_metrics(metrics, stages.report(load_params(params_yaml, "report"), metrics_dir, Path(search_table.path),
                                       Path(report.path), Path(metrics.path), Path(luts.path),
                                       Path(search_results.path) / "results.json", Path(plots.path)))

"""Run the whole pipeline on this machine with kfp.local, every component in this Python environment.

    python -m pipelines.run_local --root runs/kfp-local [--params params.yaml] [--preset configs/x.yaml]

kfp.local's SubprocessRunner(use_venv=False) executes each component as a subprocess of the current
interpreter (so the installed `tailor` is used, no image is pulled), handles ParallelFor and
dsl.Collected, and ignores Kubernetes settings (resources, GPUs, tolerations, volumes). It cannot
create the run's checkpoint volume (the KFP backend's driver does that), so the pipeline runs here as
compiled without one, and the training steps checkpoint under <root>/checkpoints instead, where a
retried step resumes. Artifacts land under <root>/<run>/<task>/<output>.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from pathlib import Path

from kfp import local

from pipelines import tailor_pipeline as tp

LOCAL_OPTIONS = dataclasses.replace(tp.DEFAULT_OPTIONS, checkpoints=False)


def keep_outer_outputs_in_loops() -> None:
    """Work around kfp.local 2.17: a ParallelFor's iterations get the loop item in place of every
    task-output parameter the loop takes from outside it, not only in place of its items
    (kfp.local.orchestrator.task_spec_utils.create_parameter_loop_iteration_task_spec). The loops'
    steps take their part of the params from split-params that way; put those inputs back, for the
    local orchestrator to resolve like any other (the KFP backend does so itself)."""
    from kfp.local.orchestrator import task_spec_utils

    original = task_spec_utils.create_parameter_loop_iteration_task_spec
    if getattr(original, "keeps_outer_outputs", False):
        return

    def create(task_spec, loop_item, loop_task_name):
        iteration = original(task_spec, loop_item, loop_task_name)
        items = task_spec.parameter_iterator.items.input_parameter
        for name, given in task_spec.inputs.parameters.items():
            if given.HasField("task_output_parameter") and name != items:
                iteration.inputs.parameters[name].CopyFrom(given)
        return iteration

    create.keeps_outer_outputs = True
    task_spec_utils.create_parameter_loop_iteration_task_spec = create


def run_local(params_yaml: str, root: str | Path, enable_caching: bool = False, **arguments) -> Path:
    """Run the pipeline on `params_yaml` (and any other run parameters, e.g. data_uri); returns the
    run's directory under `root`. Raises on failure.

    enable_caching: kfp.local's task cache under <root>/.kfp_cache, keyed like the cluster's (component,
    image, command, inputs): a second run with the same params reuses every step that allows caching.
    """
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = {d for d in root.iterdir() if d.is_dir()}
    keep_outer_outputs_in_loops()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True,
               enable_caching=enable_caching)
    old = os.environ.get("TAILOR_CHECKPOINT_ROOT")
    os.environ["TAILOR_CHECKPOINT_ROOT"] = str(root / "checkpoints")  # inherited by the component subprocesses
    try:
        with warnings.catch_warnings():
            # The runner warns that the (parameterised) image name is not a Python image: it uses no image.
            warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
            tp.build(LOCAL_OPTIONS)(params_yaml=params_yaml, **arguments)
    finally:
        if old is None:
            os.environ.pop("TAILOR_CHECKPOINT_ROOT", None)
        else:
            os.environ["TAILOR_CHECKPOINT_ROOT"] = old
    new = [d for d in root.iterdir() if d.is_dir() and d not in before and d.name.startswith(tp.PIPELINE_NAME)]
    if len(new) != 1:
        raise RuntimeError(f"expected one new run directory under {root}, found {sorted(map(str, new))}")
    return new[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.run_local", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("runs/kfp-local"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--preset", type=Path, action="append", default=[])
    ap.add_argument("--cache", action="store_true", help="reuse unchanged steps of earlier runs under --root")
    a = ap.parse_args(argv)
    print(run_local(tp.arguments(a.params, a.preset)["params_yaml"], a.root, a.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())

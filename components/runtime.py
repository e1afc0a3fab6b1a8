"""Helpers embedded into every component (kfp `additional_funcs`): their source is copied into the
component, so each must import what it uses inside its own body and call nothing else from here.
"""


def load_params(params_yaml: str, stage: str, luts=None, data_uri: str = "", declared_in: str = "dvc.yaml"):
    """The params of `stage`: params_yaml is the step's part of the run's params (split-params's
    output for it: only the keys the stage declares, already validated as a whole there). Reading
    any other key raises, naming the stage and the key (tailor.config.stage_params).

    `luts`: the profile-latency artifact of the search's cost target; search.cost.lut (a path in the
    DVC layout, latency/<target>.json) is pointed at that table inside it. `data_uri`: when set,
    replaces data.path (an s3:// URI, or a path on the data volume): one pipeline, any dataset.
    `declared_in`: where the stage's keys are declared, for the error (dvc.yaml, or the pipeline
    for steps that are not dvc stages).
    """
    from pathlib import Path

    from tailor.config import parse_params_yaml, stage_params

    source = "pipeline parameter params_yaml"
    raw = parse_params_yaml(params_yaml, source)
    lut = ((raw.get("search") or {}).get("cost") or {}).get("lut")
    if luts is not None and lut:
        raw["search"]["cost"]["lut"] = str(Path(luts.path) / Path(lut).name)
    if data_uri:
        raw["data"]["path"] = data_uri
        source = "pipeline parameters params_yaml and data_uri"
    return stage_params(raw, stage, source, declared_in)


def log_metrics(artifact, metrics: dict, prefix: str = "") -> int:
    """Log every numeric leaf of a stage's metrics dict on a KFP Metrics artifact.

    Nested keys are joined with '.', e.g. 'subnets.max.val_sc_top1_mean'. Lists (training history)
    and strings stay in the stage's JSON file, which is the artifact's content (written here when
    the stage wrote none). Returns the count.
    """
    import json
    import math
    import os

    n = 0

    def walk(value, key):
        nonlocal n
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            artifact.log_metric(key, float(value))
            n += 1

    walk(metrics, prefix)
    if not os.path.exists(artifact.path):
        os.makedirs(os.path.dirname(artifact.path) or ".", exist_ok=True)
        with open(artifact.path, "w") as f:
            json.dump(metrics, f, indent=1)
    return n


def work_dir(stage: str, params_yaml: str, *inputs):
    """Where a training stage keeps its resumable checkpoint.

    Under $TAILOR_CHECKPOINT_ROOT (a volume that outlives the pod, see pipelines/tailor_pipeline.py)
    the folder is keyed by the stage, its params (its part of them, all it reads) and its inputs
    (artifact URIs or strings), so a retried task finds its own checkpoint again and no other
    run's. Without it: a fresh temp dir.
    """
    import hashlib
    import os
    import tempfile
    from pathlib import Path

    root = os.environ.get("TAILOR_CHECKPOINT_ROOT")
    if not root:
        return Path(tempfile.mkdtemp(prefix=f"tailor-{stage}-"))
    parts = [stage, params_yaml, *(getattr(a, "uri", None) or str(a) for a in inputs)]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    path = Path(root) / stage / key
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        # A freshly provisioned volume's root often belongs to root, and KFP cannot give the pod an
        # fsGroup: say what to change rather than fail at the first checkpoint with a bare errno.
        raise PermissionError(f"checkpoint volume {root} (TAILOR_CHECKPOINT_ROOT) is not writable by uid "
                              f"{os.getuid()}: {e.strerror}; see docs/kfp.md, \"Checkpoints\"") from None
    return path


def check_placement(p, target: str, placement_json: str) -> None:
    """Refuse to profile when the run's params place `target` elsewhere than the compiled pipeline did.

    A profiling step is pinned (node selector, accelerator, CPU) when the pipeline is compiled, from
    the compile-time params; a run whose params_yaml disagrees would measure the wrong machine and
    label the table with the right name.
    """
    import json

    from tailor.config import ParamsError

    source = "pipeline parameter params_yaml"
    hint = "compile the pipeline for these params: python -m pipelines.compile --params ... --preset ... --out ..."
    if target not in p.latency.targets:
        raise ParamsError(f"{source}: latency.targets has no {target!r}, which the pipeline profiles; {hint}")
    have, compiled = p.latency.targets[target].kfp.model_dump(mode="json"), json.loads(placement_json)
    if have != compiled:
        raise ParamsError(f"{source}: latency.targets.{target}.kfp is {have}, but the pipeline was compiled "
                          f"to run this step on {compiled}; {hint}")


def scoped_repo_url(repo_url: str, run_id: str, run_scoped: bool) -> str:
    """Where this run publishes its Triton repository: under `repo_url`/<run id> unless the run
    asks for `repo_url` itself, so concurrent runs never overwrite one another's models."""
    if not repo_url or not run_scoped:
        return repo_url
    if not run_id or "{{" in run_id:
        raise ValueError(f"run_scoped_repo needs the run's id, got {run_id!r}")
    return f"{repo_url.rstrip('/')}/{run_id}"

"""(Re)compile the pipeline to IR YAML, or check that the committed YAML is current.

    python -m pipelines.compile                 # writes pipelines/tailor_pipeline.yaml
    python -m pipelines.compile --check         # exit 1 when the committed YAML is stale
    TAILOR_IMAGE=reg/tailor:0.1.0-cpu TAILOR_GPU_IMAGE=reg/tailor:0.1.0-cuda \
        python -m pipelines.compile --out my.yaml --checkpoint-storage-class efs-sc --s3-secret s3-creds \
        --preset configs/tin-sc10.yaml

The committed YAML is always compiled with the default options (image names from components.base,
each run's own checkpoint volume of StorageClass `standard`); --check ignores TAILOR_IMAGE /
TAILOR_GPU_IMAGE.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from kfp import compiler

from pipelines import tailor_pipeline as tp

COMMITTED = Path(__file__).with_name("tailor_pipeline.yaml")


def compile_pipeline(out: str | Path, opts: tp.Options = tp.DEFAULT_OPTIONS) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=tp.build(opts), package_path=str(out))
    return out


def normalise(text: str) -> str:
    """The compiled text minus what changes without the pipeline changing (the SDK version stamp)."""
    return re.sub(r"(?m)^(\s*)sdkVersion: .*$", r"\1sdkVersion: <normalised>", text)


def stale(committed: Path = COMMITTED) -> str | None:
    """None when `committed` equals a fresh default compile, else why not."""
    if not committed.exists():
        return f"{committed} does not exist"
    with tempfile.TemporaryDirectory() as d:
        fresh = compile_pipeline(Path(d) / "fresh.yaml").read_text()
    if normalise(fresh) != normalise(committed.read_text()):
        return f"{committed} differs from a fresh compile"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=COMMITTED)
    ap.add_argument("--check", action="store_true", help="compare the committed YAML with a fresh compile")
    ap.add_argument("--checkpoint-storage-class", default=tp.Options.checkpoint_storage_class,
                    help="StorageClass (with ReadWriteMany) of the checkpoint volume each run creates for its "
                         "training steps, so that retries resume (default: %(default)s)")
    ap.add_argument("--checkpoint-size", default=tp.Options.checkpoint_size,
                    help="size of that volume (default: %(default)s)")
    ap.add_argument("--checkpoint-pvc", help="an existing ReadWriteMany PVC for the checkpoints instead, kept "
                                             "across runs")
    ap.add_argument("--no-checkpoints", action="store_true",
                    help="no checkpoint volume: a retried training step starts again")
    ap.add_argument("--train-nodes", type=int, default=tp.Options.train_nodes,
                    help="train-teacher / train-supernet on this many nodes, as a Kubeflow PyTorchJob")
    ap.add_argument("--train-gpus", type=int, default=tp.Options.train_gpus,
                    help="GPUs per node (one torchrun process each) for that PyTorchJob")
    ap.add_argument("--accelerator", default=tp.Options.accelerator)
    ap.add_argument("--no-gpu-toleration", action="store_true")
    ap.add_argument("--s3-secret", help="Kubernetes secret with AWS_* keys for prepare-data / export / serve-check "
                                        "(default: the pods' own identity, e.g. IRSA)")
    ap.add_argument("--data-pvc", help=f"PVC with datasets, mounted on prepare-data at {tp.DATA_MOUNT}")
    ap.add_argument("--parallelism", type=int, default=tp.Options.parallelism,
                    help="ParallelFor iterations at once (per-superclass searches, retrain)")
    ap.add_argument("--params", type=Path, default=tp.Options.params,
                    help="params whose latency targets shape the DAG (default: params.yaml)")
    ap.add_argument("--preset", type=Path, action="append", default=[], help="overlay merged over --params")
    a = ap.parse_args(argv)
    if a.check:
        why = stale(a.out)
        if why:
            print(f"{why}: run `python -m pipelines.compile`", file=sys.stderr)
            return 1
        print(f"{a.out} is current")
        return 0
    try:
        opts = tp.Options(accelerator=a.accelerator, gpu_toleration=not a.no_gpu_toleration,
                          checkpoints=not a.no_checkpoints, checkpoint_pvc=a.checkpoint_pvc,
                          checkpoint_storage_class=a.checkpoint_storage_class, checkpoint_size=a.checkpoint_size,
                          s3_secret=a.s3_secret, data_pvc=a.data_pvc, parallelism=a.parallelism,
                          train_nodes=a.train_nodes, train_gpus=a.train_gpus,
                          params=a.params.resolve(), presets=tuple(x.resolve() for x in a.preset))
    except ValueError as e:
        ap.error(str(e))
    if a.out.resolve() == COMMITTED.resolve() and opts != tp.DEFAULT_OPTIONS:
        print(f"{COMMITTED} holds the default compile; write non-default options elsewhere with --out",
              file=sys.stderr)
        return 2
    print(compile_pipeline(a.out, opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

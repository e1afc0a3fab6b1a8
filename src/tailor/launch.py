"""A training stage as a Kubeflow Training Operator PyTorchJob: N GPUs per node on M nodes.

The KFP step (train-teacher or train-supernet, compiled with `--train-nodes` / `--train-gpus`)
does not train itself. It stages its inputs on a ReadWriteMany volume, creates a PyTorchJob whose
pods run the same `tailor <stage>` command under torchrun (tailor.distributed: rank-sharded global
batches, rank-0 checkpoints on that volume), waits for it, and copies the outputs into its own
artifacts. A retried step finds its job again by name (the name is a hash of the stage's inputs)
instead of starting a second one; a restarted job pod resumes from the last epoch's checkpoint.

The operator gives every pod MASTER_ADDR, MASTER_PORT (the master container's "pytorchjob-port")
and RANK (the pod's index: the node rank for torchrun). We pass nnodes and nproc-per-node
ourselves rather than through spec.nprocPerNode, whose effect on WORLD_SIZE changed between
operator releases.
"""
from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tailor.utils import atomic_write_text, log

API = ("kubeflow.org", "v1", "pytorchjobs")
CONTAINER = "pytorch"  # the operator looks for this container name and port name
PORT_NAME, PORT = "pytorchjob-port", 23456


class JobError(RuntimeError):
    """The PyTorchJob failed, or did not finish in time."""


@dataclass(frozen=True)
class JobSpec:
    name: str
    namespace: str
    image: str
    command: list[str]  # the tailor command line after `-m tailor.cli`
    nodes: int
    gpus_per_node: int
    claim: str  # the ReadWriteMany PVC every pod mounts at `mount`
    mount: str
    cpu: str = "8"
    memory: str = "32Gi"
    accelerator: str = "nvidia.com/gpu"
    tolerate_accelerator_taint: bool = True
    deadline_s: int = 72 * 3600
    restarts: int = 3
    env: dict[str, str] = field(default_factory=dict)


def job_name(stage: str, key: str) -> str:
    """A DNS-1123 name, stable for the same stage and inputs (so a retried step finds its job)."""
    return f"tailor-{stage}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def manifest(s: JobSpec) -> dict:
    """The PyTorchJob (kubeflow.org/v1): one Master pod and nodes - 1 Worker pods, each with
    gpus_per_node GPUs and torchrun starting one tailor process per GPU."""
    if s.nodes < 1 or s.gpus_per_node < 1:
        raise ValueError(f"a PyTorchJob needs nodes >= 1 and gpus_per_node >= 1, got {s.nodes} and {s.gpus_per_node}")
    gpus = {s.accelerator: str(s.gpus_per_node)}
    container = {
        "name": CONTAINER, "image": s.image, "command": ["torchrun"],
        # $(VAR): Kubernetes substitutes the operator's variables into the arguments.
        "args": [f"--nnodes={s.nodes}", f"--nproc-per-node={s.gpus_per_node}", "--node-rank=$(RANK)",
                 "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)", "-m", "tailor.cli", *s.command],
        "ports": [{"name": PORT_NAME, "containerPort": PORT}],
        "env": [{"name": k, "value": v} for k, v in sorted(s.env.items())],
        "resources": {"requests": {"cpu": s.cpu, "memory": s.memory, **gpus}, "limits": {"memory": s.memory, **gpus}},
        "volumeMounts": [{"name": "work", "mountPath": s.mount},
                         {"name": "dshm", "mountPath": "/dev/shm"}],  # NCCL and the loaders need more than 64 MiB
    }
    pod = {"metadata": {"labels": {"app.kubernetes.io/part-of": "tailor"}},
           "spec": {"containers": [container],
                    "volumes": [{"name": "work", "persistentVolumeClaim": {"claimName": s.claim}},
                                {"name": "dshm", "emptyDir": {"medium": "Memory"}}]}}
    if s.tolerate_accelerator_taint:
        pod["spec"]["tolerations"] = [{"key": s.accelerator, "operator": "Exists", "effect": "NoSchedule"}]
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": pod}}
    if s.nodes > 1:
        replicas["Worker"] = {"replicas": s.nodes - 1, "restartPolicy": "OnFailure", "template": pod}
    return {"apiVersion": f"{API[0]}/{API[1]}", "kind": "PyTorchJob",
            "metadata": {"name": s.name, "namespace": s.namespace, "labels": {"app.kubernetes.io/part-of": "tailor"}},
            "spec": {"pytorchReplicaSpecs": replicas,
                     # Pods are kept after the job ends (their logs); the job object goes a day later.
                     "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": s.restarts,
                                   "activeDeadlineSeconds": s.deadline_s, "ttlSecondsAfterFinished": 86400}}}


def _condition(job: dict) -> tuple[str, str] | None:
    """("Succeeded" | "Failed", message) once the job has finished, else None."""
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") in ("Succeeded", "Failed") and c.get("status") == "True":
            return c["type"], c.get("message", "")
    return None


def run(s: JobSpec, api=None, poll_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> dict:
    """Create the job (or find the one an earlier try of this step created) and wait for it to end.

    `api`: a kubernetes.client.CustomObjectsApi; default: the pod's in-cluster service account, which
    needs create / get on pytorchjobs.kubeflow.org in its namespace (docs/kfp.md)."""
    if api is None:
        from kubernetes import client, config

        config.load_incluster_config()
        api = client.CustomObjectsApi()
    from kubernetes.client.exceptions import ApiException

    group, version, plural = API
    try:
        api.create_namespaced_custom_object(group, version, s.namespace, plural, manifest(s))
        log(f"PyTorchJob {s.namespace}/{s.name}: created ({s.nodes} node(s) x {s.gpus_per_node} GPU(s))")
    except ApiException as e:
        if e.status != 409:
            raise JobError(f"PyTorchJob {s.namespace}/{s.name}: cannot create it: {e.status} {e.reason}") from None
        log(f"PyTorchJob {s.namespace}/{s.name}: exists (an earlier try of this step created it); waiting for it")
    end = clock() + s.deadline_s
    while True:
        job = api.get_namespaced_custom_object(group, version, s.namespace, plural, s.name)
        done = _condition(job)
        if done and done[0] == "Succeeded":
            log(f"PyTorchJob {s.namespace}/{s.name}: succeeded")
            return job
        if done:
            raise JobError(f"PyTorchJob {s.namespace}/{s.name} failed: {done[1] or 'no message'}; "
                           f"kubectl logs -n {s.namespace} -l training.kubeflow.org/job-name={s.name}")
        if clock() > end:
            raise JobError(f"PyTorchJob {s.namespace}/{s.name}: not finished after {s.deadline_s} s")
        time.sleep(poll_s)


def stage_inputs(inputs: dict[str, Path], into: Path) -> dict[str, Path]:
    """Copy the step's input artifacts onto the shared volume (once: a retried step reuses them)."""
    out = {}
    for name, src in inputs.items():
        dst = into / name
        if not dst.exists():
            tmp = into / f".{name}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if Path(src).is_dir() else shutil.copy2)(src, tmp)
            tmp.rename(dst)
        out[name] = dst
    return out


def collect_outputs(outputs: dict[Path, Path]) -> None:
    """Copy what the job wrote (on the volume) into the step's output artifact paths."""
    for src, dst in outputs.items():
        if not src.exists():
            raise JobError(f"the PyTorchJob succeeded but wrote no {src}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def namespace() -> str:
    """The namespace this pod runs in (its service account's)."""
    p = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return p.read_text().strip() if p.exists() else "default"


def train_as_job(stage: str, params_yaml: str, key: str, inputs: dict[str, Path], outputs: dict[str, Path],
                 settings: dict, api=None, poll_s: float = 30.0) -> dict:
    """The body of a KFP training step compiled to run as a PyTorchJob.

    `inputs` / `outputs`: the step's artifact paths by the stage's CLI option names ("data",
    "teacher"; "out", "metrics"); `settings`: image, nodes, gpus_per_node, claim, mount, cpu,
    memory, accelerator, deadline_s (pipelines/tailor_pipeline.py). Returns the stage's metrics."""
    import json

    root = Path(settings["mount"]) / "jobs" / stage / hashlib.sha256(key.encode()).hexdigest()[:16]
    staged = stage_inputs(inputs, root / "in")
    params = root / "in" / "params.yaml"
    if not params.exists():
        atomic_write_text(params, params_yaml)
    produced = {opt: root / "out" / Path(dst).name for opt, dst in outputs.items()}
    # The step's params are its part of the run's (Kubeflow's split-params): --stage-params.
    command = [stage, "--params", str(params), "--stage-params",
               *(a for opt, path in {**staged, **produced}.items() for a in (f"--{opt}", str(path))),
               "--work-dir", str(root / "work")]
    # Settings the pipeline left out take JobSpec's defaults.
    given = {k: settings[k] for k in ("image", "nodes", "gpus_per_node", "claim", "mount", "cpu", "memory",
                                      "accelerator", "deadline_s") if k in settings}
    spec = JobSpec(name=job_name(stage, key), namespace=settings.get("namespace") or namespace(), command=command,
                   **given)
    run(spec, api=api, poll_s=poll_s)
    collect_outputs({produced[opt]: Path(dst) for opt, dst in outputs.items()})
    return json.loads(Path(outputs["metrics"]).read_text())

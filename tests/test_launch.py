"""Training steps as Kubeflow Training Operator PyTorchJobs (tailor.launch).

No Kubernetes cluster runs here. The manifest is checked against the Kubernetes API's own models
(the pod template round-trips through kubernetes.client's V1PodTemplateSpec, which drops unknown
fields) and against the kubeflow.org/v1 PyTorchJob fields; the operator is played by a fake
CustomObjectsApi that runs the Master pod's container command locally, exactly as written in the
manifest (torchrun, 2 CPU processes), so the command itself is tested for real.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from conftest import ROOT, TINY
from tailor import launch
from test_train import cli_env

# kubeflow.org/v1 PyTorchJobSpec, ReplicaSpec and RunPolicy fields (training-operator API reference).
JOB_SPEC = {"pytorchReplicaSpecs", "runPolicy", "elasticPolicy", "nprocPerNode"}
REPLICA_SPEC = {"replicas", "restartPolicy", "template"}
RUN_POLICY = {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit",
              "schedulingPolicy", "suspend", "managedBy"}


def spec(**kw) -> launch.JobSpec:
    base = dict(name="tailor-train-supernet-0123456789", namespace="ml", image="reg/tailor:1-cuda",
                command=["train-supernet", "--params", "/w/p.yaml"], nodes=3, gpus_per_node=8, claim="ckpt",
                mount="/tailor-checkpoints")
    return launch.JobSpec(**{**base, **kw})


class _Response:
    def __init__(self, obj):
        self.data = json.dumps(obj)


def assert_valid_pytorchjob(m: dict):
    assert m["apiVersion"] == "kubeflow.org/v1" and m["kind"] == "PyTorchJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", m["metadata"]["name"]) and len(m["metadata"]["name"]) <= 63
    assert set(m["spec"]) <= JOB_SPEC and set(m["spec"]["runPolicy"]) <= RUN_POLICY
    assert m["spec"]["runPolicy"]["cleanPodPolicy"] in ("All", "Running", "None")
    api = ApiClient()
    for rtype, r in m["spec"]["pytorchReplicaSpecs"].items():
        assert rtype in ("Master", "Worker") and set(r) <= REPLICA_SPEC
        assert r["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode") and r["replicas"] >= 1
        # Kubernetes' own model: a misspelt or misplaced field would be dropped and the round trip differ.
        template = api.deserialize(_Response(r["template"]), "V1PodTemplateSpec")
        assert api.sanitize_for_serialization(template) == r["template"]


def test_manifest_is_a_valid_pytorchjob_for_m_nodes_of_n_gpus():
    m = launch.manifest(spec())
    assert_valid_pytorchjob(m)
    r = m["spec"]["pytorchReplicaSpecs"]
    assert r["Master"]["replicas"] == 1 and r["Worker"]["replicas"] == 2
    (c,) = r["Worker"]["template"]["spec"]["containers"]
    assert c["name"] == "pytorch" and c["ports"] == [{"name": "pytorchjob-port", "containerPort": launch.PORT}]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8" and c["command"] == ["torchrun"]
    assert c["args"][:5] == ["--nnodes=3", "--nproc-per-node=8", "--node-rank=$(RANK)", "--master-addr=$(MASTER_ADDR)",
                             "--master-port=$(MASTER_PORT)"]
    assert c["args"][5:] == ["-m", "tailor.cli", "train-supernet", "--params", "/w/p.yaml"]
    vols = r["Master"]["template"]["spec"]["volumes"]
    assert {"name": "work", "persistentVolumeClaim": {"claimName": "ckpt"}} in vols
    # One node: the master alone.
    assert set(launch.manifest(spec(nodes=1))["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    with pytest.raises(ValueError, match="gpus_per_node"):
        launch.manifest(spec(gpus_per_node=0))


def test_job_names_are_stable_per_inputs_and_dns_safe():
    a, b = launch.job_name("train-teacher", "k1"), launch.job_name("train-teacher", "k2")
    assert a == launch.job_name("train-teacher", "k1") != b
    assert re.fullmatch(r"[a-z0-9-]+", a) and len(a) <= 63


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalOperator:
    """Plays the training operator for a 1-node job: runs the Master container's command here, with
    the variables the operator would set, and reports the pod's exit as the job's condition."""

    def __init__(self):
        self.created, self.runs, self.gets = [], [], 0

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        if any(b["metadata"]["name"] == body["metadata"]["name"] for b in self.created):
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append(body)
        (c,) = body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
        env = {"RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]
        self.runs.append(subprocess.run(c["command"] + args, env=cli_env(OMP_NUM_THREADS="1", **env),
                                        capture_output=True, text=True, timeout=600))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.gets += 1
        r = self.runs[-1]
        cond = {"type": "Succeeded" if r.returncode == 0 else "Failed", "status": "True",
                "message": r.stderr[-2000:]}
        return {"metadata": {"name": name}, "status": {"conditions": [cond]}}


@pytest.mark.slow
def test_a_supernet_step_runs_as_a_pytorchjob_and_a_retry_reuses_it(tiny_run, tmp_path):
    """The step stages data and teacher on the volume, the job's command trains on 2 ranks, the
    outputs land in the step's artifacts; a retried step finds the job instead of creating another."""
    sys.path.insert(0, str(ROOT))  # pipelines/ lives beside src/, not in the package
    from pipelines.tailor_pipeline import step_params
    from tailor.config import load_params, split_params

    # What the step receives: its part of the params, as split-params cuts it from the run's.
    full = load_params(ROOT / "params.yaml", [TINY]).model_dump(mode="json")
    params_yaml = tmp_path / "p.yaml"
    params_yaml.write_text(yaml.safe_dump(split_params(full, {"train-supernet": step_params()["train-supernet"]})
                                          ["train-supernet"]))
    volume = tmp_path / "volume"
    settings = {"image": "tailor:test", "nodes": 1, "gpus_per_node": 2, "claim": "ckpt", "mount": str(volume),
                "namespace": "ml"}
    outputs = {"out": tmp_path / "artifacts" / "supernet", "metrics": tmp_path / "artifacts" / "metrics"}
    op = LocalOperator()
    metrics = launch.train_as_job("train-supernet", params_yaml.read_text(), "run-1/inputs",
                                  {"data": tiny_run["data"], "teacher": tiny_run["teacher"]}, outputs, settings,
                                  api=op, poll_s=0)
    assert op.runs[0].returncode == 0, op.runs[0].stderr[-3000:]
    assert len(op.created) == 1 and metrics["epochs"] >= 1
    state = torch.load(outputs["out"], map_location="cpu", weights_only=True)
    assert "state_dict" in state
    assert_valid_pytorchjob(op.created[0])
    # A retry of the step: same inputs, same job name; the operator answers 409 and the step waits.
    launch.train_as_job("train-supernet", params_yaml.read_text(), "run-1/inputs",
                        {"data": tiny_run["data"], "teacher": tiny_run["teacher"]}, outputs, settings,
                        api=op, poll_s=0)
    assert len(op.created) == 1 and len(op.runs) == 1
    (staged,) = (volume / "jobs" / "train-supernet").iterdir()  # one staging folder, reused by the retry
    assert (staged / "in" / "data" / "meta.json").exists() and (staged / "out" / "supernet").exists()


def test_a_failed_job_is_one_error_naming_it():
    class Failed(LocalOperator):
        def create_namespaced_custom_object(self, *a):
            self.created.append(a[-1])

        def get_namespaced_custom_object(self, *a):
            return {"status": {"conditions": [{"type": "Failed", "status": "True", "message": "OOMKilled"}]}}

    with pytest.raises(launch.JobError, match=r"ml/tailor-train-supernet-0123456789 failed: OOMKilled"):
        launch.run(spec(), api=Failed(), poll_s=0)


def test_pipeline_compiled_for_m_nodes_of_n_gpus_launches_pytorchjobs(tmp_path):
    """--train-nodes 2 --train-gpus 8: train-teacher / train-supernet become launchers (no GPU of
    their own, the checkpoint volume mounted, the job's settings compiled in) and their jobs'
    manifest is a valid PyTorchJob; the other steps are unchanged."""
    sys.path.insert(0, str(ROOT))
    from pipelines import tailor_pipeline as tp
    from test_kfp_checkpoints import compiled_docs, env_of, executor_of, find

    spec, executors = compiled_docs(tp.Options(train_nodes=2, train_gpus=8), tmp_path)
    for stage, component in (("train-teacher", "train-teacher-job"), ("train-supernet", "train-supernet-job")):
        _, _, task = find(spec, stage)
        assert task["componentRef"]["name"] == f"comp-{component}"
        resources = spec["deploymentSpec"]["executors"][executor_of(spec, task)]["container"]["resources"]
        assert "accelerator" not in resources
        assert executors[executor_of(spec, task)]["pvcMount"][0]["mountPath"] == tp.CHECKPOINT_MOUNT
        assert env_of(spec, task)["TAILOR_CHECKPOINT_ROOT"] == tp.CHECKPOINT_MOUNT
        params = task["inputs"]["parameters"]
        settings = json.loads(params["job_json"]["runtimeValue"]["constant"])
        assert settings == json.loads(tp.job_json(stage, tp.Options(train_nodes=2, train_gpus=8)))
        assert "taskOutputParameter" in params["claim"]  # the run's own volume, created by the pipeline
        m = launch.manifest(launch.JobSpec(name=launch.job_name(stage, "k"), namespace="ml", image="tailor:cuda",
                                           command=[stage], claim="c", nodes=settings["nodes"],
                                           gpus_per_node=settings["gpus_per_node"], mount=settings["mount"],
                                           cpu=settings["cpu"], memory=settings["memory"]))
        assert_valid_pytorchjob(m)
        assert m["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    _, _, retrain = find(spec, "retrain")
    assert retrain["componentRef"]["name"] == "comp-retrain"
    with pytest.raises(ValueError, match="checkpoint volume"):
        tp.Options(train_gpus=2, checkpoints=False)

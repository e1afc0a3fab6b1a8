"""Durable checkpoints on Kubeflow: by default each run creates a ReadWriteMany volume, mounts it on
the training steps and deletes it once they all succeeded (checked in the compiled IR, against KFP's
protobuf schemas); an existing PVC or none instead; and a training step that dies mid-run is retried
by KFP's retry policy and resumes from its checkpoint (kfp.local, on the tiny params)."""
# No `from __future__ import annotations`: KFP reads the test pipeline's real parameter types.

import re
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_params

sys.path.insert(0, str(ROOT))  # components/ and pipelines/ live beside src/, not in the package

import components as C  # noqa: E402
from components import runtime  # noqa: E402
from pipelines import compile as pc  # noqa: E402
from pipelines import run_local  # noqa: E402
from pipelines import tailor_pipeline as tp  # noqa: E402
from tailor import stages  # noqa: E402

CHECKPOINTING = [stage for stage, s in tp.STEPS.items() if s.checkpoints]


def compiled_docs(opts: tp.Options, tmp_path: Path) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes executor configs) of a fresh compile, each parsed by the protobuf
    message the KFP backend reads it as, so an unknown or misspelt field fails here."""
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s
    from kfp.pipeline_spec import pipeline_spec_pb2 as ps

    docs = list(yaml.safe_load_all(pc.compile_pipeline(tmp_path / "p.yaml", opts).read_text()))
    json_format.ParseDict(docs[0], ps.PipelineSpec())
    executors = {}
    if len(docs) > 1:
        json_format.ParseDict(docs[1], ps.PlatformSpec())
        executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        for config in executors.values():
            json_format.ParseDict(config, k8s.KubernetesExecutorConfig())
    return docs[0], executors


def dags(spec: dict) -> dict[str, dict]:
    """{"root" or the sub-DAG's component name: its tasks}."""
    return {"root": spec["root"]["dag"]["tasks"],
            **{name: c["dag"]["tasks"] for name, c in spec["components"].items() if "dag" in c}}


def find(spec: dict, stage: str) -> tuple[str, str, dict]:
    """(DAG, task key, task) of the task whose display name is `stage`."""
    [hit] = [(d, key, t) for d, tasks in dags(spec).items() for key, t in tasks.items()
             if t["taskInfo"]["name"] == stage]
    return hit


def top_level_task(spec: dict, dag: str, key: str) -> str:
    """The root task that runs `key` of `dag`: itself, or the ParallelFor task whose body `dag` is."""
    if dag == "root":
        return key
    [loop] = [k for k, t in spec["root"]["dag"]["tasks"].items() if t["componentRef"]["name"] == dag]
    return loop


def executor_of(spec: dict, task: dict) -> str:
    return spec["components"][task["componentRef"]["name"]]["executorLabel"]


def env_of(spec: dict, task: dict) -> dict:
    container = spec["deploymentSpec"]["executors"][executor_of(spec, task)]["container"]
    return {e["name"]: e["value"] for e in container.get("env", [])}


def volume_tasks(spec: dict, image: str) -> list[tuple[str, dict]]:
    executors = spec["deploymentSpec"]["executors"]
    return [(key, t) for d, tasks in dags(spec).items() for key, t in tasks.items()
            if "executorLabel" in spec["components"][t["componentRef"]["name"]]
            and executors[executor_of(spec, t)].get("container", {}).get("image") == image]


def test_default_compile_gives_each_run_its_own_checkpoint_volume(tmp_path):
    spec, k8s = compiled_docs(tp.DEFAULT_OPTIONS, tmp_path)
    root = spec["root"]["dag"]["tasks"]
    # The KFP driver carries out these two itself, recognising them by these images.
    [(create_key, create)] = volume_tasks(spec, "argostub/createpvc")
    [(delete_key, delete)] = volume_tasks(spec, "argostub/deletepvc")
    assert root[create_key] is create and root[delete_key] is delete, "both in the run's top level"
    inputs = {k: v["runtimeValue"]["constant"] for k, v in create["inputs"]["parameters"].items()}
    assert inputs == {"access_modes": ["ReadWriteMany"], "size": tp.Options.checkpoint_size,
                      "storage_class_name": tp.Options.checkpoint_storage_class,
                      "pvc_name_suffix": tp.CHECKPOINT_PVC_SUFFIX}
    name = {"taskOutputParameter": {"outputParameterKey": "name", "producerTask": create_key}}
    assert delete["inputs"]["parameters"]["pvc_name"] == name
    for task in (create, delete):  # never answered from the cache: a cached create names a deleted claim
        assert not task["cachingOptions"].get("enableCache")

    users = set()
    for stage in tp.STEPS:
        dag, key, task = find(spec, stage)
        config, env = k8s.get(executor_of(spec, task), {}), env_of(spec, task)
        if stage not in CHECKPOINTING:
            assert "pvcMount" not in config and "TAILOR_CHECKPOINT_ROOT" not in env, stage
            continue
        [mount] = config["pvcMount"]
        assert mount["mountPath"] == tp.CHECKPOINT_MOUNT and env["TAILOR_CHECKPOINT_ROOT"] == tp.CHECKPOINT_MOUNT
        top = top_level_task(spec, dag, key)
        users.add(top)
        assert create_key in root[top]["dependentTasks"], f"{stage} may start before its volume exists"
        if dag == "root":
            assert mount["pvcNameParameter"] == name
        else:  # inside a ParallelFor: the name reaches the loop's body as one of its inputs
            channel = mount["pvcNameParameter"]["componentInputParameter"]
            assert root[top]["inputs"]["parameters"][channel] == name
    assert users == {top_level_task(spec, *find(spec, s)[:2]) for s in CHECKPOINTING}
    assert "retrain" in CHECKPOINTING and any(u.startswith("for-loop") for u in users)
    # Deleted once every checkpointing step (every retrain) succeeded, and only then: no exit handler
    # (a failed run keeps its volume for a retry of the run) and no trigger on failed upstream tasks.
    assert users <= set(delete["dependentTasks"])
    assert "triggerPolicy" not in delete
    assert not [t for t in root.values() if "exitHandler" in t["taskInfo"]["name"]]
    assert not [c for c in spec["components"] if c.startswith("comp-exit-handler")]


def test_an_existing_pvc_or_none_instead(tmp_path):
    spec, k8s = compiled_docs(tp.Options(checkpoint_pvc="tailor-ckpt"), tmp_path)
    assert not volume_tasks(spec, "argostub/createpvc") and not volume_tasks(spec, "argostub/deletepvc")
    for stage in CHECKPOINTING:
        [mount] = k8s[executor_of(spec, find(spec, stage)[2])]["pvcMount"]
        assert mount["pvcNameParameter"] == {"runtimeValue": {"constant": "tailor-ckpt"}}

    # Off, and the kfp.local run, which cannot create volumes: no volume, no variable, no volume tasks.
    for opts in (tp.Options(checkpoints=False), run_local.LOCAL_OPTIONS):
        spec, k8s = compiled_docs(opts, tmp_path)
        assert not volume_tasks(spec, "argostub/createpvc") and not volume_tasks(spec, "argostub/deletepvc")
        for stage in tp.STEPS:
            task = find(spec, stage)[2]
            assert "pvcMount" not in k8s.get(executor_of(spec, task), {})
            assert "TAILOR_CHECKPOINT_ROOT" not in env_of(spec, task)


def test_compile_options_for_the_volume(tmp_path, capsys):
    out = tmp_path / "custom.yaml"
    assert pc.main(["--out", str(out), "--checkpoint-storage-class", "efs-sc", "--checkpoint-size", "50Gi"]) == 0
    create = next(t for t in yaml.safe_load(out.read_text().split("\n---\n")[0])["root"]["dag"]["tasks"].values()
                  if t["taskInfo"]["name"] == "create-checkpoint-volume")
    params = create["inputs"]["parameters"]
    assert params["storage_class_name"]["runtimeValue"]["constant"] == "efs-sc"
    assert params["size"]["runtimeValue"]["constant"] == "50Gi"
    # Bad values stop the compile with one line naming them (the driver would panic on a bad size).
    for args, says in ((["--checkpoint-size", "lots"], "checkpoint_size 'lots'"),
                       (["--checkpoint-storage-class", "EFS_SC"], "checkpoint_storage_class 'EFS_SC'"),
                       (["--checkpoint-pvc", "ckpt", "--no-checkpoints"], "checkpoints are off")):
        with pytest.raises(SystemExit) as e:
            pc.main(["--out", str(out), *args])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and says in err, err
    # Non-default volume options may not overwrite the committed (default) compile either.
    assert pc.main(["--checkpoint-size", "50Gi"]) == 2


def test_an_unwritable_checkpoint_volume_is_one_clear_error(tmp_path, monkeypatch):
    """KFP cannot give a pod an fsGroup, so a volume whose root is not writable by the image's user
    stops the step at once, saying where to look (checked here with a file where the folder goes,
    since the tests may run as root)."""
    blocker = tmp_path / "volume"
    blocker.write_text("")
    monkeypatch.setenv("TAILOR_CHECKPOINT_ROOT", str(blocker))
    with pytest.raises(PermissionError, match=r"checkpoint volume .*volume \(TAILOR_CHECKPOINT_ROOT\) is not "
                                              r"writable by uid \d+: .*docs/kfp\.md"):
        runtime.work_dir("train-teacher", "p", "x")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*non-Python base image.*:RuntimeWarning")  # runs no image
def test_a_retried_training_step_resumes_from_its_checkpoint(tiny_run, tmp_path, monkeypatch, capfd):
    """Preemption in miniature: train-teacher dies after its first of two epochs (TAILOR_STOP_AFTER_EPOCH,
    as in the CLI resume tests), KFP's retry policy (kfp.local's orchestrator) runs the task again, and
    the new process resumes from the checkpoint under TAILOR_CHECKPOINT_ROOT (the volume's mount on the
    cluster), ending with exactly the weights of an uninterrupted run."""
    from kfp import dsl, local
    from test_train import assert_same_weights

    p = tiny_params(teacher={"epochs": 2})
    ref = tmp_path / "ref"
    stages.train_teacher(p, tiny_run["data"], ref / "teacher.pt", ref / "teacher.json", ref / "work")

    @dsl.pipeline
    def retried(params_yaml: str):
        data = dsl.importer(artifact_uri=str(tiny_run["data"]), artifact_class=dsl.Dataset)
        C.train_teacher(params_yaml=params_yaml, data=data.output).set_retry(num_retries=1, backoff_duration="0s")

    root = tmp_path / "kfp"
    monkeypatch.setenv("TAILOR_CHECKPOINT_ROOT", str(root / "checkpoints"))
    monkeypatch.setenv("TAILOR_STOP_AFTER_EPOCH", "1")  # inherited by both attempts: only the first stops
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    retried(params_yaml=yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False))

    log = re.sub(r"\x1b\[[0-9;]*m", "", capfd.readouterr().out)
    assert len(re.findall(r"Executing task 'train-teacher'", log)) == 2, log[-3000:]
    assert "KeyboardInterrupt: TAILOR_STOP_AFTER_EPOCH=1" in log, log[-3000:]
    assert re.search(r"resuming from \S+/train-teacher/\w+/checkpoint\.pt at epoch 1/2", log), log[-3000:]
    [out] = [d for d in root.rglob("teacher") if d.parent.name == "train-teacher"]
    assert_same_weights(out, ref / "teacher.pt")

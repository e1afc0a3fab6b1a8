"""The tailor DAG as a Kubeflow Pipelines v2 pipeline, built from the components in components/.

Every step runs the same `tailor.stages` function as `dvc repro`; data moves between steps as KFP
artifacts (Dataset / Model / Metrics), the params travel as one YAML string (`params_yaml`, the
content of params.yaml with any presets merged, see `arguments`), and how each step is scheduled
(image, CPU / memory / GPU, retries, caching) is the STEPS table below.

Adding a stage: a component in components/, a STEPS entry, and one `step(...)` call in `build`.

profile-latency is the exception to STEPS: it runs once per target of `latency.target`, each on
that target's hardware (`latency.targets.<name>.kfp`: node selector, accelerator, CPU / memory).
Placement must be static in Kubernetes, so those come from the params the pipeline is *compiled*
with (Options.params / presets); at run time the step refuses params that place it elsewhere.

No `from __future__ import annotations` here: KFP reads the pipeline signature's real types.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml
from kfp import dsl, kubernetes

import components as C

PIPELINE_NAME = "tailor"
CHECKPOINT_MOUNT = "/tailor-checkpoints"
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
    # checkpoint when the pipeline is compiled with a checkpoint volume (Options.checkpoint_pvc).
    retries: int = 0
    cache: bool = True
    checkpoints: bool = False
    s3: bool = False  # gets the S3 credentials secret (Options.s3_secret) as AWS_* variables
    # The pod's activeDeadlineSeconds: a hung step (a stalled data loader, an S3 read that never
    # returns) fails and is retried instead of holding its node for ever. Sized at several times
    # the real-data GPU preset's figures; a run on bigger data recompiles with larger values.
    timeout_h: float = 2.0


STEPS: dict[str, Step] = {
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


@dataclass(frozen=True)
class Options:
    """Compile-time choices; everything a run may change is a pipeline parameter instead."""

    image: str = C.IMAGE
    gpu_image: str = C.GPU_IMAGE
    accelerator: str = "nvidia.com/gpu"
    # GPU nodes are commonly tainted `<accelerator>:NoSchedule`; GPU steps tolerate that taint.
    gpu_toleration: bool = True
    # A ReadWriteMany PVC mounted on the training steps at CHECKPOINT_MOUNT, so that a retried
    # (e.g. preempted) step resumes from its last epoch instead of starting again.
    checkpoint_pvc: Optional[str] = None
    # A PVC holding datasets, mounted on prepare-data at DATA_MOUNT (data.path / data_uri point into it).
    data_pvc: Optional[str] = None
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


DEFAULT_OPTIONS = Options(image=C.DEFAULT_IMAGE, gpu_image=C.DEFAULT_GPU_IMAGE)


def configure(task: dsl.PipelineTask, stage: str, opts: Options, image, gpu_image) -> dsl.PipelineTask:
    """Apply STEPS[stage] and the compile options to one task."""
    s = STEPS[stage]
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
    if s.checkpoints and opts.checkpoint_pvc:
        kubernetes.mount_pvc(task, pvc_name=opts.checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
        task.set_env_variable("TAILOR_CHECKPOINT_ROOT", CHECKPOINT_MOUNT)
    if s.s3 and opts.s3_secret:
        # The key pair is required, so a misspelt secret or key stops the pod before it starts
        # (CreateContainerConfigError naming it) instead of failing at the upload; the rest may be absent.
        required = S3_KEYS[:2]
        kubernetes.use_secret_as_env(task, secret_name=opts.s3_secret, secret_key_to_env={k: k for k in required})
        kubernetes.use_secret_as_env(task, secret_name=opts.s3_secret, optional=True,
                                     secret_key_to_env={k: k for k in S3_KEYS if k not in required})
    return task


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
    from tailor.config import load_params

    compile_params = load_params(opts.params, list(opts.presets))
    targets = {name: compile_params.latency.targets[name] for name in compile_params.latency.target}
    lut_target = search_lut_target(compile_params, list(targets))

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Train one weight-sharing supernet on superclass data, then tailor, retrain and "
                              "serve specialised networks. params_yaml: params.yaml content (presets merged).")
    def tailor(params_yaml: str, image: str = opts.image, gpu_image: str = opts.gpu_image, data_uri: str = "",
               repo_url: str = "", run_scoped_repo: bool = True, triton_http_url: str = "", triton_grpc_url: str = ""):
        tasks: dict[str, dsl.PipelineTask] = {}  # by stage, for the report's inputs

        def step(stage: str, component, **inputs) -> dsl.PipelineTask:
            tasks[stage] = configure(component(params_yaml=params_yaml, **inputs), stage, opts, image, gpu_image)
            return tasks[stage]

        data = step("prepare-data", C.prepare_data, data_uri=data_uri).outputs["data"]
        teacher = step("train-teacher", C.train_teacher, data=data).outputs["teacher"]
        supernet = step("train-supernet", C.train_supernet, data=data, teacher=teacher).outputs["supernet"]
        step("train-stock", C.train_stock, data=data)

        luts, profiled = {}, {}
        for name, target in targets.items():
            placement = json.dumps(target.kfp.model_dump(mode="json"), sort_keys=True)
            task = C.profile_latency(params_yaml=params_yaml, target=name, placement_json=placement, data=data)
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
            retrained = step("retrain", C.retrain, scenario=scenario, data=data, supernet=supernet, search=search)
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

"""The schema of params.yaml: every hyperparameter of every stage, validated in one place.

params.yaml is the single source of values; this module only states their types and ranges, so
a field has no default here (a missing key is an error naming it). Presets in configs/ are
overlays: mappings merged key by key over params.yaml.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from tailor.export.settings import ExportConfig, ServeConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamsError(ValueError):
    """params.yaml (or an overlay) is missing a key, has an unknown one, or a bad value."""


# ---------------------------------------------------------------- data
class SyntheticConfig(Strict):
    superclasses: int = Field(ge=2)
    classes_per_superclass: int = Field(ge=2)
    train_per_class: int = Field(ge=10)
    test_per_class: int = Field(ge=5)
    # Amplitude of the class-specific texture relative to the superclass pattern: smaller is harder.
    class_signal: float = Field(gt=0)
    noise: float = Field(ge=0)


class DataConfig(Strict):
    source: Literal["synthetic", "imagefolder", "cifar100"]
    # imagefolder: a directory or .zip holding train/<class>/*, test/<class>/*, local or an s3://
    # URI (s3://bucket/key.zip, or s3://bucket/prefix holding the tree; credentials from boto3's
    # default chain, reached with export.s3's retries and timeouts); cifar100: the directory
    # torchvision's CIFAR100 reads (or downloads into when allow_download).
    path: str | None
    # imagefolder: superclasses.yaml (superclass -> list of class folder names); null looks for
    # superclasses.yaml at the root of `path` (inside the zip too).
    superclass_map: str | None
    image_size: int = Field(ge=16)
    val_fraction: float = Field(gt=0, lt=0.5)
    allow_download: bool
    synthetic: SyntheticConfig

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source in ("imagefolder", "cifar100") and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        return self


# ---------------------------------------------------------------- search space
class SpaceConfig(Strict):
    """MobileNetV3-style space: stem, a fixed first block, 5 elastic units, head."""

    stem_channels: int = Field(ge=8)
    stem_stride: Literal[1, 2]
    first_block_channels: int = Field(ge=8)
    widths: list[int] = Field(min_length=1)
    strides: list[Literal[1, 2]] = Field(min_length=1)
    se: list[bool] = Field(min_length=1)
    activations: list[Literal["relu", "hswish"]] = Field(min_length=1)
    depths: list[int] = Field(min_length=1)
    expands: list[int] = Field(min_length=1)
    kernels: list[Literal[3, 5, 7]] = Field(min_length=1)
    final_expand_channels: int = Field(ge=8)
    feature_channels: int = Field(ge=8)
    dropout: float = Field(ge=0, lt=1)

    @model_validator(mode="after")
    def _consistent(self):
        n = len(self.widths)
        for name in ("strides", "se", "activations"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"space.{name} has {len(getattr(self, name))} entries, space.widths has {n}")
        for name in ("depths", "expands", "kernels"):
            v = getattr(self, name)
            if v != sorted(set(v)):
                raise ValueError(f"space.{name} must be strictly increasing, got {v}")
        if self.depths[0] < 1:
            raise ValueError(f"space.depths must be >= 1, got {self.depths}")
        return self


# ---------------------------------------------------------------- training
class OptimConfig(Strict):
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    nesterov: bool
    warmup_epochs: float = Field(ge=0)
    label_smoothing: float = Field(ge=0, lt=1)
    batch_size: int = Field(ge=1)


class RuntimeConfig(Strict):
    """How training runs, not what it learns: changing these must not change CPU results."""

    device: Literal["auto", "cpu", "cuda"]
    # bf16 autocast applies on CUDA only; channels_last everywhere (2.3x faster depthwise training on CPU too).
    bf16: bool
    channels_last: bool
    # Keep the uint8 dataset on the GPU when it takes at most this fraction of free memory;
    # otherwise stream batches from pinned host memory.
    device_data_fraction: float = Field(gt=0, le=1)
    eval_batch_size: int = Field(ge=1)
    bn_recal_batches: int = Field(ge=1)
    bn_recal_batch_size: int = Field(ge=1)
    log_every: int = Field(ge=0)  # steps between progress lines; 0: once per epoch
    threads: int = Field(ge=0)  # 0: leave torch's default


class AugmentConfig(Strict):
    pad_crop: int = Field(ge=0)  # pixels of reflect padding before a random crop back to size
    flip: bool


class TeacherConfig(Strict):
    # 0: no teacher training; train-teacher writes the seeded initial weights (the supernet then
    # trains from scratch and must distil in place: supernet.kd_source inplace).
    epochs: int = Field(ge=0)
    optim: OptimConfig


class PhaseConfig(Strict):
    """One progressive-shrinking phase: which choices are elastic while it runs."""

    name: str
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    kernels: list[int]
    depths: list[int]
    expands: list[int]


class CurriculumConfig(Strict):
    """AdaSearch curriculum growth: each phase after the first grows the supernet (SuperNet2SuperNet)."""

    enabled: bool
    # Progressive distillation within a grown phase: loss (1 - l) CE + l KD from the previous
    # phase's largest subnet, l moving linearly from kd_start to kd_end over the phase.
    kd_start: float = Field(ge=0, le=1)
    kd_end: float = Field(ge=0, le=1)


class SupernetConfig(Strict):
    phases: list[PhaseConfig] = Field(min_length=1)
    # Paths trained per step (their gradients accumulate into one optimizer step):
    # sandwich: the phase's largest, then uniform ones, then (with >= 3) its smallest;
    # spos: uniform paths only (SPOS: one); fairnas: strict fairness, every choice of every slot
    # exactly subnets_per_step / (its number of choices) times per step.
    sampler: Literal["sandwich", "spos", "fairnas"]
    subnets_per_step: int = Field(ge=1)
    # SCARLET's equivariant learnable stabilizer where depth skips a block (folded at extraction).
    els: bool
    curriculum: CurriculumConfig
    kd_weight: float = Field(ge=0)
    # Soft targets: 'teacher' (the train-teacher network, OFA) or 'inplace' (the largest subnet of
    # the same step, detached, as in BigNAS: no separate teacher phase is needed, and the soft
    # targets improve as the supernet does). With 'inplace' the largest subnet learns from labels only.
    kd_source: Literal["teacher", "inplace"]
    kd_temperature: float = Field(gt=0)
    # EAS superclass dropout: each other superclass's logit group is dropped with this probability.
    superclass_dropout: float = Field(ge=0, le=1)
    optim: OptimConfig


class RetrainScenario(Strict):
    # null: every superclass of the data (search.superclasses when set), so a preset can say "every
    # superclass at this budget" without naming a dataset's superclasses. dvc.yaml's foreach needs
    # named superclasses; tailor.stages.retrain_scenarios expands null for KFP and the benchmarks.
    superclass: str | None
    # In the search's cost unit (search.cost), spelt as search.budgets spells it: a fraction of the
    # space's cost range when search.budgets.kind is 'fraction'.
    budget: float = Field(gt=0, allow_inf_nan=False)
    # An explicit architecture string; null takes the one the search chose for this scenario.
    arch: str | None


class RetrainConfig(Strict):
    """Retraining the chosen architectures as specialised networks (one per scenario)."""

    scenarios: list[RetrainScenario] = Field(min_length=1)
    method: str                              # which search method's architecture to take
    init: Literal["scratch", "inherit"]      # from scratch (TF-NAS) or fine-tune supernet weights
    data: Literal["superclass", "all"]       # train on the superclass only, or on all and slice the head
    epochs: int = Field(ge=1)
    optim: OptimConfig


class StockModel(Strict):
    """A torchvision MobileNetV3, built by torchvision at a width multiplier."""

    arch: Literal["mobilenet_v3_small", "mobilenet_v3_large"]
    width: float = Field(gt=0, le=4)


class StockConfig(Strict):
    """Stock anchors trained by the same loop on the same data (tailor.stock): the comparison."""

    models: list[StockModel] = Field(min_length=1)   # generalists: every class, scored per superclass
    specialist: StockModel | None                    # one per superclass, trained on it alone; null: none
    # null: the teacher's and the supernet's epochs together; a number must be at least that
    # (checked), so that stock is never undertrained next to the tailored nets.
    epochs: int | None = Field(ge=1)
    specialist_epochs: int | None = Field(ge=1)
    optim: OptimConfig


# ---------------------------------------------------------------- latency
class KfpPlacement(Strict):
    """Where the KFP profiling component for a target runs: on the hardware the table describes."""

    node_selector: dict[str, str]
    accelerator: str | None  # e.g. nvidia.com/gpu; null for CPU targets
    accelerator_count: int = Field(ge=0)
    # requests == limits (Guaranteed QoS) so pinned threads get whole cores, not a share of them
    cpu: str
    memory: str


class LatencyTarget(Strict):
    """A named target: what a LUT's milliseconds are measured on."""

    device: Literal["cpu", "cuda"]
    runtime: Literal["torch", "onnxruntime"]
    dtype: Literal["fp32", "bf16", "fp16"]  # bf16/fp16: torch on CUDA only
    batch_size: int = Field(ge=1)
    threads: int = Field(ge=1)  # intra-op threads (torch.set_num_threads / onnxruntime intra_op_num_threads)
    kfp: KfpPlacement

    @model_validator(mode="after")
    def _dtype_supported(self):
        if self.dtype != "fp32" and (self.device != "cuda" or self.runtime != "torch"):
            raise ValueError(f"dtype {self.dtype!r} is measured with runtime 'torch' on device 'cuda' only, "
                             f"got runtime {self.runtime!r} on {self.device!r}")
        if (self.device == "cuda") != bool(self.kfp.accelerator and self.kfp.accelerator_count):
            raise ValueError("kfp.accelerator / accelerator_count must be set for cuda targets and only for them")
        return self


class LatencyProtocol(Strict):
    warmup: int = Field(ge=0)  # untimed calls before each item's timed calls, every round
    repeats: int = Field(ge=1)  # timed calls per item per round
    rounds: int = Field(ge=1)  # interleaved passes over all items; an entry is the median of its calls
    # Drop calls during which another process preempted one of ours (getrusage involuntary switches):
    # on a shared machine they time the load, not the model.
    discard_preempted: bool
    # What an entry is: the median is the latency a dedicated target sees; on a shared machine the
    # p10 / min are steadier estimates of it (load only ever adds time).
    statistic: Literal["median", "p10", "min"]


class LatencyConfig(Strict):
    targets: dict[str, LatencyTarget] = Field(min_length=1)
    target: list[str] = Field(min_length=1)  # what the DAG profiles (a name or a list of names)
    protocol: LatencyProtocol
    calibration_archs: int = Field(ge=2)  # whole subnets (min, max, then random) the correction is fitted on
    held_out_archs: int = Field(ge=1)  # other random subnets the error is reported on
    calibration: Literal["none", "affine", "affine_blocks", "per_unit"]
    seed: int

    @field_validator("target", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _targets_known(self):
        bad = [t for t in self.target if t not in self.targets]
        if bad:
            raise ValueError(f"latency.target names {bad}, not in latency.targets {sorted(self.targets)}")
        return self


# ---------------------------------------------------------------- search
class SearchBudgets(Strict):
    # fraction: of the space's [cheapest, dearest] cost range under search.cost (0 = the cheapest
    # architecture); absolute: in the cost model's unit (MAdds, or ms on the LUT's target).
    kind: Literal["fraction", "absolute"]
    values: list[float] = Field(min_length=1)


class SearchCost(Strict):
    kind: Literal["madds", "latency"]
    lut: str | None  # latency: the table written by profile-latency (e.g. latency/cpu-ort.json)

    @model_validator(mode="after")
    def _lut_for_latency(self):
        if (self.kind == "latency") != bool(self.lut):
            raise ValueError("search.cost.lut must be set when search.cost.kind is 'latency', and only then")
        return self


class GeneratorConfig(Strict):
    """The EAS architecture generator G(B, t)."""

    embed_dim: int = Field(ge=1)      # superclass and budget embeddings (the paper: 32)
    hidden: int = Field(ge=1)         # LSTM width
    anchors: int = Field(ge=2)        # K budget anchors evenly spaced on the space's cost range
    autoregressive: bool              # each LSTM step reads the previous step's sampled decisions
    tau: float = Field(gt=0)          # Gumbel-sigmoid temperature
    budget_weight: float = Field(ge=0)  # lambda on ((R - B) / scale)^2
    budget_norm: Literal["range", "budget"]  # scale: the space's cost range, or B itself
    lr: float = Field(gt=0)
    steps: int = Field(ge=1)          # updates
    scenarios_per_step: int = Field(ge=0)  # (superclass, budget) pairs per update; 0: every grid superclass
    batch_size: int = Field(ge=1)     # validation images per scenario per update
    # BN statistics of the gated forward: "context" = of bn_context images of the evaluator's
    # all-class recalibration sample (what scoring uses); "batch" = of the validation batch plus
    # bn_context random training images (the earlier scheme, for the ablation).
    bn: Literal["context", "batch"]
    bn_context: int = Field(ge=1)
    holdout: float = Field(ge=0, lt=1)  # share of each superclass's validation images kept out of the gradient
    eval_points: int = Field(ge=1)    # held-out CE of the mode architectures this many times in training
    max_tries: int = Field(ge=1)      # resampling rounds for candidates over budget


class RandomSearchConfig(Strict):
    max_tries: int = Field(ge=1)      # rejection-sampling draws per architecture before snapping


class PredictorConfig(Strict):
    """OFA-style accuracy predictor: MLP on (architecture encoding, superclass one-hot). It measures
    search.evaluations x (number of budgets) random subnets on every grid superclass: the same
    supernet evaluations per scenario as every other method spends."""

    hidden: int = Field(ge=1)
    layers: int = Field(ge=1)
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    holdout: float = Field(ge=0, lt=1)  # fraction of sampled archs kept out of training to report its error


class EvolutionConfig(Strict):
    variants: list[Literal["ofa-v", "ofa-t"]] = Field(min_length=1)
    population: int = Field(ge=2)
    generations: int = Field(ge=1)
    parent_ratio: float = Field(gt=0, le=1)
    mutation_ratio: float = Field(ge=0, le=1)  # share of children from mutation; the rest from crossover
    mutate_prob: float = Field(ge=0, le=1)
    max_tries: int = Field(ge=1)
    # EAT-NAS transfer: seed the population with distinct one-primitive-per-unit perturbations of a
    # basic architecture (seed_arch, e.g. from another run), or of the previous budget's result for
    # the same superclass (transfer_budgets); each over the budget is snapped into it.
    seed_arch: str | None
    # Share of the first population seeded when there is a basic architecture (1.0: all of it, as in
    # EAT-NAS); the rest, and any perturbations that repeat too often, are uniform samples.
    seed_fraction: float = Field(ge=0, le=1)
    transfer_budgets: bool


class NSGA2Config(Strict):
    """SCARLET's constrained, weighted NSGA-II: maximise accuracy, minimise cost, maximise parameters."""

    population: int = Field(ge=4)
    generations: int = Field(ge=1)
    mutate_prob: float = Field(ge=0, le=1)  # per decision of the hierarchical mutation (unit depth, block k / e)
    # crowding-distance weights: accuracy, cost, params (a weight of 0 takes the objective out of crowding)
    weights: list[float] = Field(min_length=3, max_length=3)
    acc_min: float = Field(ge=0, le=1)  # checked after the budget: below it an arch is infeasible
    fitness: Literal["predictor", "supernet"]  # accuracy from the predictor, or measured on the supernet
    max_tries: int = Field(ge=1)
    seed_arch: str | None
    seed_fraction: float = Field(ge=0, le=1)

    @field_validator("weights")
    @classmethod
    def _weights_non_negative(cls, v: list[float]) -> list[float]:
        # A negative weight would reward crowding, pushing the front together instead of apart.
        if any(w < 0 for w in v):
            raise ValueError(f"crowding-distance weights must be >= 0, got {v}")
        return v


class SearchConfig(Strict):
    superclasses: list[str] | None  # the scenarios' superclasses; null: all of the dataset's
    budgets: SearchBudgets
    cost: SearchCost
    slack: float = Field(ge=0, lt=1)  # every result is snapped into [(1 - slack) B, B]
    # Every method runs once per seed; the table reports mean and 95% CI over them.
    seeds: list[int] = Field(min_length=1)
    # Supernet evaluations (one architecture's accuracy on one superclass's validation images) each
    # method may spend per scenario: random's candidates, the generator's re-ranked candidates, the
    # predictor's measured subnets (amortised over the scenarios), NSGA-II's supernet fitness.
    evaluations: int = Field(ge=1)
    # TF-NAS proxy classes: search on this share of each superclass's classes (at least one), chosen
    # by accuracy rank; 1.0 searches on all. Retraining and the report always use all classes.
    proxy_fraction: float = Field(gt=0, le=1)
    # BN recalibration batches (of runtime.bn_recal_batch_size) per scored architecture: fewer than
    # the training stages use, since a search scores hundreds of architectures.
    recal_batches: int = Field(ge=1)
    generator: GeneratorConfig
    random: RandomSearchConfig
    predictor: PredictorConfig
    evolution: EvolutionConfig
    nsga2: NSGA2Config

    @model_validator(mode="after")
    def _distinct_seeds(self):
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"search.seeds has repeats: {self.seeds}")
        return self


class Params(Strict):
    seed: int
    data: DataConfig
    space: SpaceConfig
    augment: AugmentConfig
    runtime: RuntimeConfig
    teacher: TeacherConfig
    supernet: SupernetConfig
    retrain: RetrainConfig
    stock: StockConfig
    latency: LatencyConfig
    search: SearchConfig
    export: ExportConfig
    serve: ServeConfig

    @property
    def spine_epochs(self) -> int:
        """Epochs of the teacher and the supernet together: what the stock anchors get at least."""
        return self.teacher.epochs + sum(ph.epochs for ph in self.supernet.phases)

    def stock_epochs(self, specialist: bool = False) -> int:
        e = self.stock.specialist_epochs if specialist else self.stock.epochs
        return self.spine_epochs if e is None else e

    @model_validator(mode="after")
    def _phases_in_space(self):
        for ph in self.supernet.phases:
            for name in ("kernels", "depths", "expands"):
                bad = sorted(set(getattr(ph, name)) - set(getattr(self.space, name)))
                if bad:
                    raise ValueError(f"supernet.phases[{ph.name}].{name} has {bad}, not in space.{name}")
        if self.teacher.epochs == 0 and self.supernet.kd_source == "teacher" and self.supernet.kd_weight > 0:
            raise ValueError("teacher.epochs is 0 (an untrained teacher) but supernet.kd_source is 'teacher': "
                             "distil from an untrained network? Use kd_source 'inplace', kd_weight 0, or epochs >= 1")
        spine = self.spine_epochs
        for field in ("epochs", "specialist_epochs"):
            if getattr(self.stock, field) is not None and getattr(self.stock, field) < spine:
                raise ValueError(f"stock.{field} is {getattr(self.stock, field)}, fewer than the teacher's and "
                                 f"supernet's epochs together ({spine}): the stock anchors would be undertrained")
        if self.supernet.kd_source == "inplace" and self.supernet.kd_weight > 0 and self.supernet.subnets_per_step < 2:
            raise ValueError("supernet.kd_source 'inplace' needs supernet.subnets_per_step >= 2: with one subnet "
                             "per step the largest subnet has no one to teach")
        grid = self.search.budgets
        for i, s in enumerate(self.retrain.scenarios):
            # Without an explicit arch a scenario takes the search's pick, so it must be in the grid,
            # spelt as search.budgets spells it (fractions when the search uses fractions).
            if s.arch is None and not any(same_budget(s.budget, v) for v in grid.values):
                raise ValueError(f"retrain.scenarios[{i}].budget {s.budget:g} is not one of search.budgets.values "
                                 f"{grid.values} (kind {grid.kind!r}), so the search has no pick for it; use one "
                                 "of those values or give the scenario an arch")
            if (s.arch is None and s.superclass is not None and self.search.superclasses
                    and s.superclass not in self.search.superclasses):
                raise ValueError(f"retrain.scenarios[{i}].superclass {s.superclass!r} is not in search.superclasses "
                                 f"{self.search.superclasses}")
        sn = self.supernet
        if sn.kd_source == "inplace" and sn.kd_weight > 0 and sn.sampler != "sandwich":
            raise ValueError(f"supernet.kd_source 'inplace' needs supernet.sampler 'sandwich' (got {sn.sampler!r}): "
                             "the largest subnet, trained first in each step, provides the soft targets; "
                             "use kd_weight 0 or kd_source 'teacher'")
        if sn.sampler == "fairnas":
            for ph in sn.phases:
                for name in ("kernels", "depths", "expands"):
                    n = len(getattr(ph, name))
                    if sn.subnets_per_step % n:
                        raise ValueError(f"supernet.sampler 'fairnas': subnets_per_step {sn.subnets_per_step} is not "
                                         f"a multiple of phase {ph.name!r}'s {n} {name}, so its choices cannot "
                                         "each be trained equally often per step")
        if sn.curriculum.enabled:
            if sn.els:
                raise ValueError("supernet.curriculum and supernet.els cannot be combined: a block grown as an "
                                 "identity would replace a learnt stabilizer, so growth would not preserve function")
            if len(sn.phases) < 2:
                raise ValueError("supernet.curriculum needs >= 2 phases: the first trains the small supernet, "
                                 "each later one grows it")
            for prev, ph in zip(sn.phases, sn.phases[1:]):
                for name in ("kernels", "depths", "expands"):
                    lost = sorted(set(getattr(prev, name)) - set(getattr(ph, name)))
                    if lost:
                        raise ValueError(f"supernet.curriculum: phase {ph.name!r} drops {name} {lost} of phase "
                                         f"{prev.name!r}; a curriculum only grows")
        return self


def same_budget(a: float, b: float) -> bool:
    """Two spellings of one budget (a YAML literal and a float that went through JSON or arithmetic)."""
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))


def deep_merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return data


def load_params(path: str | Path = "params.yaml", overlays: list[str | Path] = (),
                overrides: dict[str, Any] | None = None) -> Params:
    """params.yaml, then each overlay file, then `overrides` (a nested dict), validated."""
    layers = [(str(path), _read_yaml(Path(path)))]
    layers += [(str(ov), _read_yaml(Path(ov))) for ov in overlays]
    if overrides:
        layers.append(("overrides", overrides))
    raw: dict = {}
    for _, layer in layers:
        raw = deep_merge(raw, layer)
    names = [n for n, _ in layers]
    return params_from_dict(raw, source=" + ".join(names), layers=layers)


def _defined_in(layers: list[tuple[str, dict]], loc: tuple) -> str | None:
    """The last layer (file) that sets the key path `loc`: where a bad value or unknown key came from."""
    found = None
    for name, layer in layers:
        node = layer
        for part in loc:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                break
        else:
            found = name
    return found


def params_from_dict(raw: dict, source: str = "params", layers: list[tuple[str, dict]] | None = None) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise _invalid(e, source, layers) from None


def _invalid(e: ValidationError, source: str, layers: list[tuple[str, dict]] | None = None,
             prefix: tuple = ()) -> ParamsError:
    """One line (the CLI prints it as its one error line); cross-field checks name their fields in
    the message, so pydantic's "Value error, " prefix and empty location are dropped."""
    problems = []
    for err in e.errors():
        loc = (*prefix, *err["loc"])
        where = ".".join(str(p) for p in loc)
        msg = err["msg"].removeprefix("Value error, ")
        origin = _defined_in(layers, loc) if layers and len(layers) > 1 and loc else None
        if origin:
            where = f"{where} (set in {origin})"
        problems.append(f"{where}: {msg}" if where else msg)
    return ParamsError(f"{source}: invalid parameters: " + "; ".join(problems))


def parse_params_yaml(text: str, source: str) -> dict:
    """Params sent as YAML text (a pipeline parameter): the mapping, or one ParamsError saying why not."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ParamsError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


# ---------------------------------------------------------------- one stage's params
# A stage reads only the params keys it declares (dvc.yaml's `params` lists; the Kubeflow pipeline
# gives each step just those), so that a change to one key re-runs only the stages that read it. A
# stage's Params hold the declared keys validated and every other key as an Undeclared stand-in,
# so code that reads a key its stage does not declare fails instead of quietly going stale.

def params_subset(full: dict, keys: list[str]) -> dict:
    """The `keys` of `full` (params as JSON data), nested as in params.yaml. A key is a top-level
    section or a dotted path, as dvc.yaml's params lists spell them (`supernet`, `search.cost`)."""
    out: dict = {}
    for key in keys:
        src, dst = full, out
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(src, dict) or part not in src:
                raise ParamsError(f"params key {key!r}: the params have no {'.'.join(parts[:i + 1])!r}")
            src = src[part]
            if i < len(parts) - 1:
                dst = dst.setdefault(part, {})
        dst[parts[-1]] = copy.deepcopy(src)
    return out


def split_params(raw: dict, steps: dict[str, list[str]], source: str = "params") -> dict[str, dict]:
    """{step: its declared keys of `raw`}, after validating all of `raw` once, cross-field rules
    included (a step validates only its own part, so this is where a bad run is stopped)."""
    full = params_from_dict(raw, source=source).model_dump(mode="json")
    return {step: params_subset(full, keys) for step, keys in steps.items()}


class Undeclared:
    """Stands for a params key in the Params of a stage that does not declare it: any use of its
    value raises ParamsError naming the stage and the key (repr alone is safe, for debuggers)."""

    __slots__ = ("_key", "_stage", "_declared_in")

    def __init__(self, key: str, stage: str, declared_in: str):
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_declared_in", declared_in)

    def _error(self, key: str | None = None) -> ParamsError:
        return ParamsError(f"stage {self._stage} read params key {key or self._key!r}, which it does not declare: "
                           f"add it (or its section) to the stage's params in {self._declared_in}")

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)  # protocol probes (numpy, pydantic) fall through to the methods below
        raise self._error(f"{self._key}.{name}")

    def __setattr__(self, name: str, value):
        raise self._error()

    def __repr__(self) -> str:
        return f"<params key {self._key} not declared by {self._stage}>"

    # Copying or pickling a stage's Params (e.g. into a worker process) is not reading the key.
    def __reduce__(self):
        return Undeclared, (self._key, self._stage, self._declared_in)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def _refuse(self, *args, **kwargs):
    raise self._error()


# Every way of using a value (truth, iteration, numbers, comparison, text, paths, calls) raises.
for _name in ("__bool__", "__len__", "__iter__", "__contains__", "__getitem__", "__int__", "__float__", "__index__",
              "__complex__", "__round__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__",
              "__str__", "__format__", "__fspath__", "__call__", "__neg__", "__pos__", "__abs__",
              *(f"__{r}{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or")
                for r in ("", "r"))):
    setattr(Undeclared, _name, _refuse)


class StageParams(Params):
    """One stage's params (stage_params): its declared keys validated, every other one Undeclared."""

    _undeclared: dict = PrivateAttr(default_factory=dict)  # pydantic `exclude` spec of the Undeclared keys

    def model_dump(self, **kwargs) -> dict:
        # The declared keys only: what the stage depends on, so what its artifacts' provenance records.
        return super().model_dump(exclude=self._undeclared, **kwargs)

    def model_dump_json(self, **kwargs) -> str:
        return super().model_dump_json(exclude=self._undeclared, **kwargs)


def declares(p: Params, key: str) -> bool:
    """Whether `key` (dotted) may be read from p: always from full Params, from a stage's when declared."""
    node = p
    for part in key.split("."):
        if isinstance(node, Undeclared):
            return False
        node = getattr(node, part)
    return not isinstance(node, Undeclared)


def stage_params(raw: dict, stage: str, source: str = "params", declared_in: str = "dvc.yaml") -> Params:
    """The Params of `stage` from `raw`, the keys it declares (params_subset of validated params).

    Every key present: plain, fully validated Params. Otherwise each present section or key is
    validated by its own schema (types, ranges, the section's own rules; the rules across sections
    were checked on the whole params, by split_params) and every absent one is Undeclared.
    """
    def fields(model: type[BaseModel], raw: dict, path: tuple) -> tuple[dict, dict]:
        """(field values for model_construct, pydantic `exclude` spec of the Undeclared ones)."""
        unknown = sorted(set(raw) - set(model.model_fields))
        if unknown:
            raise ParamsError(f"{source}: invalid parameters: {'.'.join((*path, unknown[0]))}: "
                              "Extra inputs are not permitted")
        values, undeclared = {}, {}
        for name, field in model.model_fields.items():
            loc = (*path, name)
            if name not in raw:
                values[name], undeclared[name] = Undeclared(".".join(loc), stage, declared_in), True
                continue
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(raw[name], dict):
                part, missing = fields(sub, raw[name], loc)
                if missing:  # a partly declared section: its own rules may read what is missing
                    values[name], undeclared[name] = sub.model_construct(**part), missing
                    continue
            try:
                values[name] = TypeAdapter(Annotated[field.annotation, field]).validate_python(raw[name])
            except ValidationError as e:
                raise _invalid(e, source, prefix=loc) from None
        return values, undeclared

    values, undeclared = fields(Params, raw, ())
    if not undeclared:
        return params_from_dict(raw, source=source)
    p = StageParams.model_construct(**values)
    p._undeclared = undeclared
    return p

"""Latency lookup tables measured on the target hardware, calibrated on whole networks.

Every block slot of the space has a fixed context (input resolution, in/out channels, stride,
activation, SE), so a block's cost on a target is fixed by that context plus its (kernel, expand):
`BlockSpec.key`. The table holds the measured time (median by default) of every distinct block key and of the
two fixed parts as the exported graph runs them (uint8 NHWC pixels -> normalisation -> stem + first
block; head -> classifier sliced to one superclass -> logits and softmax, tailor.export's convention),
and the calibration subnets are timed whole in that deployed form too: a budget in milliseconds
is a promise about the artifact Triton serves, not about a bare float network. Summing entries misses a whole network's
time (per-call overhead, caches warm in isolation, fusion across blocks), so whole subnets of a
calibration set are measured too and a linear correction is fitted; its error is reported on other,
held-out subnets. The correction keeps the per-slot form, so `load_latency_model` returns a
`tailor.cost.SlotCostModel` in milliseconds: `cost(arch)` for search, `cost_gates` for the
generator's differentiable budget loss.

Protocol: all items (blocks, fixed parts, subnets) are timed in interleaved rounds, each item
warmed up then called `repeats` times per round; an entry is the median (or p10 / min) of its calls,
optionally only of those during which no other process preempted ours. Load on a shared machine
comes in bursts, and interleaving spreads a burst over every item instead of corrupting a few.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import platform
import random
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tailor.config import LatencyConfig, LatencyTarget, ParamsError, SpaceConfig
from tailor.cost import SlotCostModel
from tailor.nets import Head, MBConv, StaticNet, Stem
from tailor.space import Arch, SearchSpace, conv_out, mid_channels
from tailor.utils import log

FORMAT = "tailor-latency-lut/2"  # /2: the fixed parts and the calibration nets as deployed
METHODS = ("none", "affine", "affine_blocks", "per_unit")


# ---------------------------------------------------------------- keys
@dataclass(frozen=True)
class BlockSpec:
    """Everything that fixes an MBConv's cost in context (batch, dtype, runtime come from the target)."""

    res: int      # input resolution
    cin: int
    cout: int
    stride: int
    kernel: int
    expand: int
    act: str
    se: bool

    @property
    def key(self) -> str:
        return (f"mb_r{self.res}_i{self.cin}_o{self.cout}_s{self.stride}_k{self.kernel}_e{self.expand}"
                f"_{self.act}_se{int(self.se)}")

    def module(self) -> nn.Module:
        return MBConv(self.cin, self.cout, self.stride, self.kernel, mid_channels(self.cin, self.expand), self.se,
                      self.act)

    def input_shape(self, batch: int) -> tuple[int, ...]:
        return batch, self.cin, self.res, self.res


def slot_specs(space: SearchSpace) -> list[list[list[list[BlockSpec]]]]:
    """[unit][slot][kernel index][expand index] -> the BlockSpec a block in that slot has."""
    c = space.cfg
    out = []
    for i, (cin, cout, s, res) in enumerate(space.unit_geometry()):
        unit = []
        for j in range(space.max_depth):
            bcin, bs, bres = (cin, s, res) if j == 0 else (cout, 1, conv_out(res, s))
            unit.append([[BlockSpec(bres, bcin, cout, bs, k, e, c.activations[i], c.se[i]) for e in c.expands]
                         for k in c.kernels])
        out.append(unit)
    return out


def stem_key(space: SearchSpace) -> str:
    c = space.cfg
    return f"stem_u8_r{space.image_size}_c{c.stem_channels}_s{c.stem_stride}_f{c.first_block_channels}"


def head_key(space: SearchSpace, num_classes: int) -> str:
    c = space.cfg
    return (f"head_r{space.final_resolution}_i{c.widths[-1]}_x{c.final_expand_channels}_f{c.feature_channels}"
            f"_n{num_classes}_probs")


# Latency does not depend on the normalisation constants; the deployed graph's ops do not either.
_MEAN, _STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class _WithProbs(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x):
        logits = self.head(x)
        return logits, torch.softmax(logits, dim=1)


def deployed_stem(space: SearchSpace) -> nn.Module:
    """The exported graph's first fixed part: uint8 NHWC in, stem and first block out."""
    from tailor.export.onnx_export import UInt8Input

    return nn.Sequential(UInt8Input(_MEAN, _STD), Stem(space))


def deployed_head(space: SearchSpace, classes: int) -> nn.Module:
    """The exported graph's last fixed part: head and a `classes`-way classifier, logits and probs out."""
    return _WithProbs(Head(space, classes))


def deployed_net(space: SearchSpace, arch: Arch, classes: int) -> nn.Module:
    """A subnet exactly as `tailor export` wraps it (UInt8Classifier); takes uint8 [N, H, W, 3]."""
    from tailor.export.onnx_export import UInt8Classifier

    return UInt8Classifier(StaticNet(space, arch, classes), _MEAN, _STD)


def image_shape(image_size: int, batch: int) -> tuple[int, ...]:
    """The deployed graph's input: uint8 [N, H, W, 3] pixels."""
    return batch, image_size, image_size, 3


def arch_blocks(space: SearchSpace, arch: Arch) -> list[tuple[int, BlockSpec]]:
    """(unit, spec) of every block the architecture runs."""
    c = space.cfg
    return [(i, BlockSpec(res, cin, cout, s, k, e, c.activations[i], c.se[i]))
            for i, _, cin, cout, s, res, k, e in space.block_shapes(space.validate(arch))]


# ---------------------------------------------------------------- targets and runtimes
def get_target(cfg: LatencyConfig, name: str) -> LatencyTarget:
    if name not in cfg.targets:
        raise ParamsError(f"latency target {name!r} is not in latency.targets (known: {sorted(cfg.targets)})")
    return cfg.targets[name]


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op pool set to n threads for the block, then restored."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class TorchRunner:
    """Eager PyTorch: fp32 on CPU; on CUDA in the target's dtype, channels_last, timed with CUDA events."""

    def __init__(self, target: LatencyTarget):
        if target.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("latency target needs device 'cuda' but torch sees no CUDA device")
        self.target = target
        self.device = torch.device(target.device)
        self.dtype = _DTYPES[target.dtype]

    def prepare(self, module: nn.Module, shape: tuple[int, ...], gen: torch.Generator,
                pixels: bool = False) -> Callable[[], object]:
        fmt = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        module = module.eval().to(self.device, self.dtype, memory_format=fmt)
        x = _input(shape, gen, pixels)
        # Pixels stay uint8 NHWC, as a client sends them; activations take the target's dtype and layout.
        x = x.to(self.device) if x.dtype == torch.uint8 else x.to(self.device, self.dtype, memory_format=fmt)

        def run():
            with torch.inference_mode():
                return module(x)

        return run

    def measure(self, items: dict[str, Callable[[], object]], protocol, label: str,
                progress: Callable[[str], None] = log) -> dict[str, list[Call]]:
        """`measure` of the prepared calls, in this process (PyTorch is what is timed), on the target's threads."""
        with torch_threads(self.target.threads):
            return measure(self, items, protocol.warmup, protocol.repeats, protocol.rounds,
                           lambda m: progress(f"{label}: {m}"))

    def time_calls(self, fn: Callable[[], object], n: int) -> list[Call]:
        if self.device.type != "cuda":
            return _time_wall(fn, n)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        clean = []
        for s, e in zip(starts, ends):
            c0 = _preemptions()
            s.record()
            fn()
            e.record()
            clean.append(_preemptions() == c0)  # the launching thread's delays show on the GPU timeline too
        torch.cuda.synchronize()
        return [(s.elapsed_time(e), ok) for s, e, ok in zip(starts, ends, clean)]


@dataclass(frozen=True)
class OnnxItem:
    """What an OrtRunner times: a model (ONNX bytes or a file) and the array fed to its one input."""

    model: bytes | str
    feed: np.ndarray


class OrtRunner:
    """onnxruntime: each module exported (TorchScript exporter, static shapes) and run in its own session.

    The sessions run in a fresh process (`measure`): on this 2-core machine onnxruntime ran the same
    nets 25-45% slower in a process that had done PyTorch compute (tracing, parity checks) than in
    one that had not, and a served model runs in Triton's process, which has done none. Blocks,
    calibration nets and exported files are all timed there, so the LUT and the deployed check share
    one condition."""

    def __init__(self, target: LatencyTarget):
        import onnxruntime as ort

        self.ort, self.target = ort, target
        self.providers = ["CUDAExecutionProvider"] if target.device == "cuda" else ["CPUExecutionProvider"]
        missing = set(self.providers) - set(ort.get_available_providers())
        if missing:
            raise RuntimeError(f"latency target needs onnxruntime provider(s) {sorted(missing)}; this onnxruntime "
                               f"has {ort.get_available_providers()}")

    def prepare(self, module: nn.Module, shape: tuple[int, ...], gen: torch.Generator,
                pixels: bool = False) -> OnnxItem:
        x = _input(shape, gen, pixels)
        return OnnxItem(onnx_bytes(module, x), x.numpy())

    def session(self, model: bytes | str | Path):
        """An inference session under the target's conditions: for a profiled block and for an
        exported model file alike, so the two are timed the same way."""
        opts = self.ort.SessionOptions()
        opts.intra_op_num_threads = self.target.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        src = model if isinstance(model, bytes) else str(model)
        return self.ort.InferenceSession(src, sess_options=opts, providers=self.providers)

    def time_calls(self, fn: Callable[[], object], n: int) -> list[Call]:
        return _time_wall(fn, n)  # run() returns host arrays, so it has finished on any provider

    def measure(self, items: dict[str, OnnxItem], protocol, label: str,
                progress: Callable[[str], None] = log) -> dict[str, list[Call]]:
        """`measure` of every item's session, in a fresh `python -m tailor.latency` process (a pickled
        job on stdin, the calls as JSON on stdout; its progress lines go to the shared stderr, not to
        `progress`, which cannot cross the process boundary)."""
        import pickle
        import subprocess

        job = pickle.dumps((self.target, protocol, items, label))
        r = subprocess.run([sys.executable, "-m", "tailor.latency"], input=job, stdout=subprocess.PIPE, check=False)
        if r.returncode != 0:  # its traceback went to stderr, which the child shares with this process
            raise RuntimeError(f"{label}: timing in a fresh process failed (exit {r.returncode})")
        return {k: [(float(ms), bool(ok)) for ms, ok in v] for k, v in json.loads(r.stdout).items()}

    def measure_here(self, items: dict[str, OnnxItem], protocol, label: str) -> dict[str, list[Call]]:
        """`measure` in this process: the fresh process's body (and the tests' way to see the sessions)."""
        calls = {}
        for name, it in items.items():
            sess = self.session(it.model)
            calls[name] = functools.partial(sess.run, None, {sess.get_inputs()[0].name: it.feed})
        return measure(self, calls, protocol.warmup, protocol.repeats, protocol.rounds,
                       lambda m: log(f"{label}: {m}"))


RUNNERS = {"torch": TorchRunner, "onnxruntime": OrtRunner}


def onnx_bytes(module: nn.Module, x: torch.Tensor) -> bytes:
    """`module` as an ONNX graph (static shapes, fp32, opset 17), as tailor.export traces it."""
    buf = io.BytesIO()
    # Tracing runs torch eager; one thread, since OpenMP threads spinning at barriers on a loaded
    # machine make it 10x slower and only onnxruntime's threads matter here.
    with torch.no_grad(), torch_threads(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module.eval().float(), (x,), buf, input_names=["x"], output_names=["y"], opset_version=17,
                          do_constant_folding=True, dynamo=False)
    return buf.getvalue()


def _input(shape: tuple[int, ...], gen: torch.Generator, pixels: bool) -> torch.Tensor:
    # pixels: the deployed graph's uint8 NHWC input; otherwise a float activation.
    if pixels:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    return torch.randn(shape, generator=gen)


Call = tuple[float, bool]  # (milliseconds, ran without any of this process's threads being preempted)


def _preemptions() -> int:
    # Involuntary context switches summed over all threads of this process: when one happens during a
    # call, another process took a core from it and the call measured the machine's load, not the model.
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


def _time_wall(fn: Callable[[], object], n: int) -> list[Call]:
    out = []
    for _ in range(n):
        c0 = _preemptions()
        t0 = time.perf_counter_ns()
        fn()
        t1 = time.perf_counter_ns()
        out.append(((t1 - t0) / 1e6, _preemptions() == c0))
    return out


def measure(runner, items: dict[str, Callable[[], object]], warmup: int, repeats: int, rounds: int,
            progress: Callable[[str], None] | None = None) -> dict[str, list[Call]]:
    """Every timed call of every item, in interleaved rounds (see the module doc)."""
    samples: dict[str, list[Call]] = {k: [] for k in items}
    order = list(items)
    rng = random.Random(0)
    for r in range(rounds):
        t0 = time.perf_counter()
        rng.shuffle(order)  # a burst of load must not always land on the same kind of item
        for name in order:
            fn = items[name]
            for _ in range(warmup):
                fn()
            samples[name] += runner.time_calls(fn, repeats)
        if progress:
            clean = sum(ok for v in samples.values() for _, ok in v) / sum(len(v) for v in samples.values())
            progress(f"round {r + 1}/{rounds}: {len(items)} items in {time.perf_counter() - t0:.1f}s, "
                     f"{100 * clean:.0f}% of calls so far not preempted")
    return samples


# ---------------------------------------------------------------- machine and versions
def machine_info(target: LatencyTarget) -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"hostname": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "platform": platform.platform()}
    if target.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def versions() -> dict:
    import onnxruntime

    return {"python": sys.version.split()[0], "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__}


def _loadavg() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


# ---------------------------------------------------------------- the table as a cost model
def lut_space(lut: dict) -> SearchSpace:
    return SearchSpace(SpaceConfig.model_validate(lut["space"]), lut["image_size"])


def raw_terms(lut: dict, space: SearchSpace, arch: Arch) -> tuple[float, list[float], int]:
    """(fixed part, per-unit sums of block entries, number of blocks) in ms, uncalibrated."""
    e = lut["entries"]
    fixed = e[lut["fixed"]["stem"]]["ms"] + e[lut["fixed"]["head"]]["ms"]
    units = [0.0] * space.n_units
    n = 0
    for i, spec in arch_blocks(space, arch):
        units[i] += e[spec.key]["ms"]
        n += 1
    return fixed, units, n


def identity_calibration(n_units: int) -> dict:
    return {"method": "none", "fixed_scale": 1.0, "unit_scale": [1.0] * n_units, "block_ms": 0.0, "offset_ms": 0.0}


def fit_calibration(method: str, terms: list[tuple[float, list[float], int]], measured: list[float]) -> dict:
    """Least-squares correction of summed entries to measured whole-network times.

    All methods share one form, linear in what a slot table can hold:
        predicted = fixed_scale * fixed + sum_u unit_scale[u] * S_u + block_ms * n_blocks + offset_ms
    none: the plain sum; affine: one scale and an offset; affine_blocks: plus a per-block constant
    (per-call overhead counted once per block entry but paid once per network); per_unit: a scale per
    unit (cache behaviour differs with resolution and width) plus the per-block constant.
    """
    n_units = len(terms[0][1])
    cal = identity_calibration(n_units)
    cal["method"] = method
    if method == "none":
        return cal
    y = np.asarray(measured, dtype=np.float64)
    fixed = np.array([t[0] for t in terms])
    units = np.array([t[1] for t in terms])
    nblk = np.array([t[2] for t in terms], dtype=np.float64)
    ones = np.ones_like(y)
    if method == "affine":
        cols = [fixed + units.sum(1), ones]
    elif method == "affine_blocks":
        cols = [fixed + units.sum(1), nblk, ones]
    elif method == "per_unit":
        cols = [*units.T, nblk, ones]
    else:
        raise ValueError(f"unknown calibration method {method!r}; known: {METHODS}")
    if len(y) < len(cols) + 1:
        raise ParamsError(f"latency.calibration_archs: calibration {method!r} fits {len(cols)} coefficients and "
                          f"needs more than {len(cols)} measured networks, got {len(y)}")
    # per_unit regresses y - fixed: the fixed part is the same for every arch, so its scale is not
    # identifiable apart from the offset.
    target = y - fixed if method == "per_unit" else y
    coef, *_ = np.linalg.lstsq(np.stack(cols, 1), target, rcond=None)
    coef = [float(c) for c in coef]
    if method == "affine":
        cal.update(fixed_scale=coef[0], unit_scale=[coef[0]] * n_units, offset_ms=coef[1])
    elif method == "affine_blocks":
        cal.update(fixed_scale=coef[0], unit_scale=[coef[0]] * n_units, block_ms=coef[1], offset_ms=coef[2])
    else:
        cal.update(unit_scale=coef[:n_units], block_ms=coef[n_units], offset_ms=coef[n_units + 1])
    return cal


def predict_terms(cal: dict, terms: tuple[float, list[float], int]) -> float:
    fixed, units, n = terms
    return (cal["fixed_scale"] * fixed + sum(a * s for a, s in zip(cal["unit_scale"], units))
            + cal["block_ms"] * n + cal["offset_ms"])


def latency_model(lut: dict, calibration: dict | None = None) -> SlotCostModel:
    """The LUT (with its own calibration, or the one given) as a SlotCostModel in milliseconds."""
    space = lut_space(lut)
    cal = calibration or lut["calibration"]
    e = lut["entries"]
    specs = slot_specs(space)
    table = torch.tensor([[[[cal["unit_scale"][i] * e[s.key]["ms"] + cal["block_ms"] for s in row]
                            for row in slot] for slot in unit] for i, unit in enumerate(specs)], dtype=torch.float64)
    fixed = cal["fixed_scale"] * (e[lut["fixed"]["stem"]]["ms"] + e[lut["fixed"]["head"]]["ms"])
    c = space.cfg
    return SlotCostModel("ms", fixed, table, list(c.kernels), list(c.expands), min(c.depths), 1.0,
                         cal["offset_ms"])


def load_lut(path: str | Path) -> dict:
    path = Path(path)
    try:
        lut = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such latency table (run `tailor profile-latency`)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(lut, dict) or lut.get("format") != FORMAT:
        raise ValueError(f"{path}: not a latency table (format is not {FORMAT!r})")
    return lut


def load_latency_model(lut_path: str | Path, space: SearchSpace | None = None,
                       num_classes: int | None = None) -> SlotCostModel:
    """A search-ready SlotCostModel (unit "ms") from a LUT file.

    With `space` / `num_classes`, refuses a table profiled for another space, image size or
    classifier, whose entries would silently describe other networks.
    """
    lut = load_lut(lut_path)
    if space is not None:
        if lut["space"] != space.cfg.model_dump(mode="json") or lut["image_size"] != space.image_size:
            raise ValueError(f"{lut_path}: profiled for another search space or image size "
                             f"(image_size {lut['image_size']}, this space's {space.image_size}); re-run profile-latency")
    if num_classes is not None and lut["num_classes"] != num_classes:
        raise ValueError(f"{lut_path}: profiled with {lut['num_classes']} classes, asked for {num_classes}")
    return latency_model(lut)


# ---------------------------------------------------------------- profiling
def new_lut(target_name: str, target: LatencyTarget, protocol, space: SearchSpace, num_classes: int, seed: int,
            entries: dict[str, dict], deployed_classes: int | None = None) -> dict:
    """A LUT document around measured `entries` (key -> {"ms": ...}), uncalibrated.

    `deployed_classes`: the classifier width the head entry was timed with (an exported net keeps one
    superclass's classes; the largest superclass's count, so a prediction errs on the safe side).
    """
    deployed_classes = deployed_classes or num_classes
    missing = [k for k in table_keys(space, deployed_classes) if k not in entries]
    if missing:
        raise ValueError(f"latency entries missing for {len(missing)} keys, e.g. {missing[:3]}")
    return {
        "format": FORMAT, "unit": "ms", "target_name": target_name, "target": target.model_dump(mode="json"),
        "protocol": {**protocol.model_dump(mode="json"), "entry": f"{protocol.statistic} of timed calls" + (
                         " not preempted by other processes" if protocol.discard_preempted else ""),
                     "timer": "cuda events" if target.device == "cuda" and target.runtime == "torch"
                     else "perf_counter_ns", "interleaved": True},
        "machine": {**machine_info(target), "loadavg_start": None, "loadavg_end": _loadavg()},
        "versions": versions(),
        "space": space.cfg.model_dump(mode="json"), "image_size": space.image_size, "num_classes": num_classes,
        "seed": seed, "deployed_classes": deployed_classes,
        "fixed": {"stem": stem_key(space), "head": head_key(space, deployed_classes)},
        "entries": entries,
        "calibration": identity_calibration(space.n_units),
    }


def distinct_specs(space: SearchSpace) -> dict[str, BlockSpec]:
    """One spec per distinct key: slots of a unit after its first share a context, as may slots of different units."""
    out: dict[str, BlockSpec] = {}
    for unit in slot_specs(space):
        for slot in unit:
            for row in slot:
                for s in row:
                    out.setdefault(s.key, s)
    return out


def table_keys(space: SearchSpace, head_classes: int) -> list[str]:
    """Every key a LUT for this space needs: the two fixed parts, then each distinct block context."""
    return [stem_key(space), head_key(space, head_classes), *distinct_specs(space)]


def sample_archs(space: SearchSpace, n_cal: int, n_held: int, seed: int) -> tuple[list[Arch], list[Arch]]:
    """Calibration set (min, max, then random) and a disjoint random held-out set."""
    rng = random.Random(seed)
    cal = [space.min_arch, space.max_arch][:n_cal]
    seen = set(cal)
    while len(cal) < n_cal:
        a = space.sample(rng)
        if a not in seen:
            seen.add(a)
            cal.append(a)
    held = []
    while len(held) < n_held:
        a = space.sample(rng)
        if a not in seen:
            seen.add(a)
            held.append(a)
    return cal, held


def rel_errors(pred: list[float], meas: list[float]) -> dict:
    err = np.abs(np.asarray(pred) - np.asarray(meas)) / np.asarray(meas)
    signed = (np.asarray(pred) - np.asarray(meas)) / np.asarray(meas)
    return {"median": float(np.median(err)), "p90": float(np.percentile(err, 90)), "max": float(err.max()),
            "mean_signed": float(signed.mean())}


def profile(cfg: LatencyConfig, target_name: str, space: SearchSpace, num_classes: int,
            progress: Callable[[str], None] = log, protocol=None, n_cal: int | None = None,
            n_held: int | None = None, deployed_classes: int | None = None) -> dict:
    """Measure the LUT and whole subnets on this machine; fit and validate the calibration.

    Fixed parts and subnets are timed as exported (uint8 in, `deployed_classes`-way classifier,
    logits and probs out; default: all `num_classes`). `protocol`, `n_cal`, `n_held` override the
    params (the benchmark measures more than the DAG).
    Returns the LUT as a JSON-able dict (without provenance, which the stage adds).
    """
    target = get_target(cfg, target_name)
    protocol = protocol or cfg.protocol
    n_cal = cfg.calibration_archs if n_cal is None else n_cal
    n_held = cfg.held_out_archs if n_held is None else n_held
    t_start = time.perf_counter()
    load_start = _loadavg()
    runner = RUNNERS[target.runtime](target)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    bs = target.batch_size

    classes = deployed_classes or num_classes
    specs = distinct_specs(space)
    cal_archs, held_archs = sample_archs(space, n_cal, n_held, cfg.seed)
    fr, c = space.final_resolution, space.cfg
    with torch_threads(target.threads):
        items: dict = {
            stem_key(space): runner.prepare(deployed_stem(space), image_shape(space.image_size, bs), gen, pixels=True),
            head_key(space, classes): runner.prepare(deployed_head(space, classes), (bs, c.widths[-1], fr, fr), gen)}
        for key, s in specs.items():
            items[key] = runner.prepare(s.module(), s.input_shape(bs), gen)
        nets = {f"net:{a}": a for a in cal_archs + held_archs}
        for name, a in nets.items():
            items[name] = runner.prepare(deployed_net(space, a, classes), image_shape(space.image_size, bs), gen,
                                         pixels=True)
        progress(f"profile-latency[{target_name}]: {len(specs)} blocks, 2 fixed parts, {len(nets)} subnets "
                 f"prepared in {time.perf_counter() - t_start:.1f}s")
    samples = runner.measure(items, protocol, f"profile-latency[{target_name}]", progress)
    stats = {k: _stats(v, protocol) for k, v in samples.items()}
    lut = new_lut(target_name, target, protocol, space, num_classes, cfg.seed,
                  {k: v for k, v in stats.items() if not k.startswith("net:")}, classes)
    lut["machine"]["loadavg_start"] = load_start
    measured = {a: stats[f"net:{a}"]["ms"] for a in nets.values()}
    lut["calibration"] = fit_calibration(cfg.calibration, [raw_terms(lut, space, a) for a in cal_archs],
                                         [measured[a] for a in cal_archs])
    lut["networks"] = {"calibration": _net_rows(lut, space, cal_archs, measured, stats),
                       "held_out": _net_rows(lut, space, held_archs, measured, stats)}
    lut["validation"] = validation(lut, space, cal_archs, held_archs, stats)
    lut["profile_seconds"] = round(time.perf_counter() - t_start, 1)
    v = lut["validation"]
    progress(f"profile-latency[{target_name}]: held-out |err| median {100 * v['held_out']['median']:.2f}% "
             f"p90 {100 * v['held_out']['p90']:.2f}% (plain sum: median {100 * v['plain_sum']['median']:.2f}%, "
             f"signed mean {100 * v['plain_sum']['mean_signed']:+.1f}%) in {lut['profile_seconds']}s")
    return lut


STATISTICS = ("median", "p10", "min")


def measurable_here(target: LatencyTarget) -> bool:
    """Whether an exported model file can be timed under this target's conditions by this process:
    the exported artifact is ONNX, so only onnxruntime targets, on a device this machine has."""
    if target.runtime != "onnxruntime":
        return False
    if target.device == "cpu":
        return True
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def measure_deployed(target_name: str, target: LatencyTarget, protocol, onnx_files: dict[str, Path],
                     image_size: int, here: bool = False) -> dict[str, dict]:
    """Each exported ONNX file timed as profile() times the LUT's calibration nets: the target's
    session options, batch size and random uint8 pixels, interleaved rounds, the protocol's
    statistic, in a fresh process (OrtRunner; `here`: in this one). {name: stats as in the LUT
    (ms = the statistic, of the median of DEPLOYED_SESSIONS sessions; sessions_ms: every session's)}."""
    if not measurable_here(target):
        raise RuntimeError(f"latency target {target_name!r} ({target.runtime} on {target.device}) cannot time an "
                           "exported ONNX file on this machine")
    runner = OrtRunner(target)
    gen = torch.Generator().manual_seed(0)
    shape = image_shape(image_size, target.batch_size)
    # Each file as DEPLOYED_SESSIONS sessions, all interleaved. Timed alone, two small nets make
    # rounds of a few milliseconds between pauses, and this 2-core VM then ran them 25-40% slower
    # than when busy (profile() interleaves about a hundred items); several sessions per file keep
    # the rounds busy and average out one session's luck. A file's figure: the median session.
    items = {f"{name}#{k}": OnnxItem(str(path), _input(shape, gen, True).numpy())
             for name, path in onnx_files.items() for k in range(DEPLOYED_SESSIONS)}
    label = f"deployed latency[{target_name}]"
    samples = (runner.measure_here if here else runner.measure)(items, protocol, label)
    out = {}
    for name in onnx_files:
        per_session = sorted((_stats(samples[f"{name}#{k}"], protocol) for k in range(DEPLOYED_SESSIONS)),
                             key=lambda st: st["ms"])
        out[name] = {**per_session[len(per_session) // 2], "sessions_ms": [st["ms"] for st in per_session]}
    return out


DEPLOYED_SESSIONS = 5


def _stats(calls: list[Call], protocol) -> dict:
    """Summary of one item's calls; "ms" is the protocol's statistic, the others are kept for comparison.

    With discard_preempted, only calls no other process interrupted count, unless fewer than a
    quarter ran uninterrupted (a machine that busy cannot give a clean figure; clean_calls says so).
    """
    clean = [t for t, ok in calls if ok]
    use = clean if protocol.discard_preempted and len(clean) >= max(3, len(calls) // 4) else [t for t, _ in calls]
    a = np.asarray(use)
    q10, q25, q50, q75 = np.percentile(a, [10, 25, 50, 75])
    out = {"median_ms": float(q50), "p10_ms": float(q10), "min_ms": float(a.min()), "iqr_ms": float(q75 - q25),
           "calls": len(calls), "clean_calls": len(clean), "used_calls": len(use)}
    return {"ms": out[f"{protocol.statistic}_ms"], **out}


def _net_rows(lut, space, archs, measured, stats) -> list[dict]:
    model = latency_model(lut)
    return [{"arch": str(a), "measured_ms": measured[a], "sum_ms": _plain_sum(lut, space, a),
             "predicted_ms": model.cost(a), **{k: v for k, v in stats[f"net:{a}"].items() if k != "ms"}}
            for a in archs]


def _plain_sum(lut: dict, space: SearchSpace, arch: Arch) -> float:
    fixed, units, _ = raw_terms(lut, space, arch)
    return fixed + sum(units)


def validation(lut: dict, space: SearchSpace, cal_archs: list[Arch], held_archs: list[Arch],
               stats: dict[str, dict]) -> dict:
    """Errors on the held-out subnets: the fitted calibration, the plain sum, and for comparison every
    calibration method under every statistic (all computed from the same calls)."""
    def net(a, stat):
        return stats[f"net:{a}"][f"{stat}_ms"]

    def errors(lut_s, stat, cal):
        return rel_errors([predict_terms(cal, raw_terms(lut_s, space, a)) for a in held_archs],
                          [net(a, stat) for a in held_archs])

    stat = lut["protocol"]["statistic"]
    out = {"calibration_archs": len(cal_archs), "held_out_archs": len(held_archs),
           "method": lut["calibration"]["method"], "statistic": stat,
           "held_out": errors(lut, stat, lut["calibration"]),
           "calibration_fit": rel_errors([predict_terms(lut["calibration"], raw_terms(lut, space, a)) for a in cal_archs],
                                         [net(a, stat) for a in cal_archs]),
           "plain_sum": errors(lut, stat, identity_calibration(space.n_units)),
           "by_statistic": {}}
    for st in STATISTICS:
        lut_s = {**lut, "entries": {k: {"ms": v[f"{st}_ms"]} for k, v in lut["entries"].items()}}
        terms = [raw_terms(lut_s, space, a) for a in cal_archs]
        out["by_statistic"][st] = {}
        for m in METHODS:
            try:
                cal = fit_calibration(m, terms, [net(a, st) for a in cal_archs])
            except ParamsError:
                continue  # too few calibration networks for this method's coefficients
            out["by_statistic"][st][m] = errors(lut_s, st, cal)
    return out


def summary(lut: dict) -> dict:
    """The figures for metrics/latency.json."""
    v = lut["validation"]
    model = latency_model(lut)
    low, high = model.low_high
    return {"target": lut["target_name"], "device": lut["target"]["device"], "runtime": lut["target"]["runtime"],
            "batch_size": lut["target"]["batch_size"], "entries": len(lut["entries"]),
            "statistic": v["statistic"], "calibration": v["method"], "calibration_archs": v["calibration_archs"],
            "held_out_archs": v["held_out_archs"],
            "held_out_median_rel_err": round(v["held_out"]["median"], 4),
            "held_out_p90_rel_err": round(v["held_out"]["p90"], 4),
            "plain_sum_median_rel_err": round(v["plain_sum"]["median"], 4),
            "plain_sum_mean_signed_err": round(v["plain_sum"]["mean_signed"], 4),
            "predicted_ms_min_arch": round(low, 4), "predicted_ms_max_arch": round(high, 4),
            "loadavg_start": lut["machine"]["loadavg_start"], "loadavg_end": lut["machine"]["loadavg_end"],
            "seconds": lut["profile_seconds"]}


if __name__ == "__main__":  # OrtRunner.measure's fresh process: a pickled job on stdin, JSON on stdout
    import pickle

    _target, _protocol, _items, _label = pickle.loads(sys.stdin.buffer.read())
    json.dump(OrtRunner(_target).measure_here(_items, _protocol, _label), sys.stdout)

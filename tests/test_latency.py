"""Latency LUT: keying, JSON round trip, prediction and its differentiable form, a tiny real profile."""
from __future__ import annotations

import dataclasses
import json
import random
import sys

import pytest
import torch
from PIL import Image

from conftest import tiny_params
from tailor import latency
from tailor.config import ParamsError
from tailor.data import Meta
from tailor.nets import StaticNet
from tailor.space import Arch, SearchSpace
from tailor.supernet import Gates

NUM_CLASSES = 6


@pytest.fixture(scope="module")
def p():
    return tiny_params()


@pytest.fixture(scope="module")
def space(p):
    return SearchSpace(p.space, p.data.image_size)


def fake_lut(p, space, calibration=None, target="cpu-ort"):
    """A LUT with made-up but distinct entry times (no measuring)."""
    rng = random.Random(1)
    entries = {k: {"ms": rng.uniform(0.01, 1.0)} for k in latency.table_keys(space, NUM_CLASSES)}
    lut = latency.new_lut(target, p.latency.targets[target], p.latency.protocol, space, NUM_CLASSES, 0, entries)
    if calibration:
        lut["calibration"] = calibration
    return lut


# ---------------------------------------------------------------- keys
def test_same_context_same_key(space):
    specs = latency.slot_specs(space)
    for unit in specs:
        # every slot after the first of a unit runs at the same resolution, width and stride
        for slot in unit[2:]:
            assert [[s.key for s in row] for row in slot] == [[s.key for s in row] for row in unit[1]]
        first, later = unit[0][0][0], unit[1][0][0]
        # the first block differs only where it changes width or resolution
        assert (first.key == later.key) == (first.stride == 1 and first.cin == first.cout)
    again = latency.slot_specs(SearchSpace(space.cfg, space.image_size))
    assert [s.key for u in again for sl in u for r in sl for s in r] == \
        [s.key for u in specs for sl in u for r in sl for s in r]


@pytest.mark.parametrize("field,value", [("res", 99), ("cin", 99), ("cout", 99), ("stride", 2), ("kernel", 7),
                                         ("expand", 6), ("act", "hswish"), ("se", True)])
def test_every_context_field_changes_the_key(field, value):
    base = latency.BlockSpec(res=8, cin=16, cout=24, stride=1, kernel=3, expand=3, act="relu", se=False)
    assert dataclasses.replace(base, **{field: value}).key != base.key


def test_keys_distinguish_resolution_and_classes(p, space):
    other = SearchSpace(space.cfg, space.image_size * 2)
    assert latency.stem_key(other) != latency.stem_key(space)
    assert latency.head_key(space, NUM_CLASSES) != latency.head_key(space, NUM_CLASSES + 1)
    assert not set(latency.distinct_specs(other)) & set(latency.distinct_specs(space))


def test_specs_build_the_blocks_the_network_runs(space):
    """The LUT must time the very modules StaticNet is made of."""
    arch = space.sample(random.Random(3))
    net = StaticNet(space, arch, NUM_CLASSES)
    for blk, (_, spec) in zip(net.blocks, latency.arch_blocks(space, arch), strict=True):
        assert [t.shape for t in blk.state_dict().values()] == \
            [t.shape for t in spec.module().state_dict().values()]
        x = torch.zeros(spec.input_shape(2))
        assert blk.eval()(x).shape == spec.module().eval()(x).shape


# ---------------------------------------------------------------- table, prediction, calibration
def test_json_round_trip_and_plain_prediction(p, space, tmp_path):
    lut = fake_lut(p, space)
    path = tmp_path / "lut.json"
    path.write_text(json.dumps(lut))
    model = latency.load_latency_model(path, space, NUM_CLASSES)
    assert model.unit == "ms"
    assert latency.load_lut(path) == lut
    rng = random.Random(0)
    for arch in [space.min_arch, space.max_arch] + [space.sample(rng) for _ in range(10)]:
        e = lut["entries"]
        expected = e[lut["fixed"]["stem"]]["ms"] + e[lut["fixed"]["head"]]["ms"] + sum(
            e[s.key]["ms"] for _, s in latency.arch_blocks(space, arch))
        assert model.cost(arch) == pytest.approx(expected, rel=1e-12)
    low, high = model.low_high
    assert low == pytest.approx(model.cost(space.min_arch)) or low < model.cost(space.min_arch)
    assert high == pytest.approx(model.cost(space.max_arch)) or high > model.cost(space.max_arch)


def calibrated(space):
    rng = random.Random(7)
    return {"method": "per_unit", "fixed_scale": 0.9, "unit_scale": [rng.uniform(0.5, 1.5) for _ in range(space.n_units)],
            "block_ms": -0.003, "offset_ms": 0.05}


def test_prediction_with_calibration(p, space):
    cal = calibrated(space)
    lut = fake_lut(p, space, cal)
    model = latency.latency_model(lut)
    for arch in [space.min_arch, space.sample(random.Random(2)), space.max_arch]:
        fixed, units, n = latency.raw_terms(lut, space, arch)
        expected = 0.9 * fixed + sum(a * s for a, s in zip(cal["unit_scale"], units)) - 0.003 * n + 0.05
        assert model.cost(arch) == pytest.approx(expected, rel=1e-12)
        assert latency.predict_terms(cal, (fixed, units, n)) == pytest.approx(expected, rel=1e-12)


def test_cost_gates_equal_cost_for_hard_gates(p, space):
    model = latency.latency_model(fake_lut(p, space, calibrated(space)))
    rng = random.Random(5)
    for arch in [space.min_arch, space.max_arch] + [space.sample(rng) for _ in range(8)]:
        g = Gates.from_arch(space, arch)
        assert float(model.cost_gates(g.depth, g.kernel, g.expand)) == pytest.approx(model.cost(arch), rel=1e-6)


def test_cost_gates_is_differentiable(p, space):
    model = latency.latency_model(fake_lut(p, space))
    g = Gates.from_arch(space, space.mid_arch)
    probs = [torch.full_like(t, 0.5, requires_grad=True) for t in (g.depth, g.kernel, g.expand)]
    model.cost_gates(*probs).backward()
    assert all(t.grad is not None and float(t.grad.abs().sum()) > 0 for t in probs)


@pytest.mark.parametrize("method", ["affine", "affine_blocks", "per_unit"])
def test_fit_recovers_an_exact_linear_relation(space, method):
    rng = random.Random(0)
    true = latency.identity_calibration(space.n_units)
    true.update(method=method, offset_ms=0.2, block_ms=0.01 if method != "affine" else 0.0)
    if method == "per_unit":
        true["unit_scale"] = [0.7 + 0.1 * i for i in range(space.n_units)]
    else:
        true.update(fixed_scale=1.3, unit_scale=[1.3] * space.n_units)
    terms = [(0.5, [rng.uniform(0.1, 1) for _ in range(space.n_units)], rng.randint(10, 20)) for _ in range(20)]
    y = [latency.predict_terms(true, t) for t in terms]
    fit = latency.fit_calibration(method, terms, y)
    assert [latency.predict_terms(fit, t) for t in terms] == pytest.approx(y, rel=1e-9)
    assert fit["unit_scale"] == pytest.approx(true["unit_scale"], rel=1e-6)


def test_too_few_calibration_networks(space):
    with pytest.raises(ParamsError, match="calibration_archs"):
        latency.fit_calibration("per_unit", [(0.1, [0.1] * space.n_units, 10)] * 4, [1.0] * 4)


def test_lut_for_another_space_is_refused(p, space, tmp_path):
    path = tmp_path / "lut.json"
    path.write_text(json.dumps(fake_lut(p, space)))
    with pytest.raises(ValueError, match="another search space"):
        latency.load_latency_model(path, SearchSpace(space.cfg, space.image_size * 2))
    with pytest.raises(ValueError, match="classes"):
        latency.load_latency_model(path, space, NUM_CLASSES + 1)
    (tmp_path / "bad.json").write_text('{"entries": {}}')
    with pytest.raises(ValueError, match="not a latency table"):
        latency.load_latency_model(tmp_path / "bad.json")


def test_sample_archs_disjoint_and_seeded(space):
    cal, held = latency.sample_archs(space, 6, 5, seed=3)
    assert cal[:2] == [space.min_arch, space.max_arch]
    assert len(set(cal) | set(held)) == 11
    assert (cal, held) == latency.sample_archs(space, 6, 5, seed=3)


# ---------------------------------------------------------------- params
def test_bad_target_name_is_a_clear_error(p):
    with pytest.raises(ParamsError, match="'nope'.*cpu-ort"):
        latency.get_target(p.latency, "nope")
    with pytest.raises(ParamsError, match=r"latency.target names \['nope'\]"):
        tiny_params(latency={"target": "nope"})


def test_half_precision_needs_torch_on_cuda():
    with pytest.raises(ParamsError, match="dtype 'bf16'"):
        tiny_params(latency={"targets": {"cpu-ort": {"dtype": "bf16"}}})
    with pytest.raises(ParamsError, match="accelerator"):
        tiny_params(latency={"targets": {"cpu-ort": {"kfp": {"accelerator": "nvidia.com/gpu",
                                                             "accelerator_count": 1}}}})


def test_cli_bad_target_exits_2(tmp_path, monkeypatch, capsys):
    from tailor import cli

    monkeypatch.setattr(sys, "argv", ["tailor", "profile-latency", "--target", "nope", "--data", str(tmp_path),
                                      "--out-dir", str(tmp_path / "lat"), "--metrics", str(tmp_path / "m.json")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    assert "'nope'" in capsys.readouterr().err
    assert not (tmp_path / "lat").exists()


# ---------------------------------------------------------------- a real (tiny) profile
@pytest.fixture(scope="module")
def prepared(p, tmp_path_factory):
    from tailor import stages

    root = tmp_path_factory.mktemp("latency_data")
    stages.prepare_data(p, root / "data", root / "data.json")
    return root / "data"


@pytest.mark.parametrize("target", ["cpu-torch", "cpu-ort"])
def test_tiny_profile_end_to_end(p, space, prepared, tmp_path, target):
    from tailor import stages

    metrics = stages.profile_latency(p, prepared, tmp_path / "latency", tmp_path / "metrics.json", [target])
    lut = latency.load_lut(tmp_path / "latency" / f"{target}.json")
    meta = Meta.load(prepared)
    widest = max(meta.class_superclass.count(i) for i in range(len(meta.superclasses)))
    assert lut["deployed_classes"] == widest < lut["num_classes"]  # an exported net's classifier, not all classes
    assert set(lut["entries"]) == set(latency.table_keys(space, widest))
    assert lut["fixed"]["head"].endswith(f"_n{widest}_probs") and lut["fixed"]["stem"].startswith("stem_u8_")
    assert all(e["ms"] > 0 and e["calls"] == 6 for e in lut["entries"].values())
    assert lut["target_name"] == target and lut["target"]["runtime"] == p.latency.targets[target].runtime
    assert lut["machine"]["cpu_count"] >= 1 and lut["versions"]["torch"] == torch.__version__
    assert lut["params"]["latency"]["seed"] == p.latency.seed and lut["code_version"]
    rows = lut["networks"]["calibration"] + lut["networks"]["held_out"]
    assert len(lut["networks"]["calibration"]) == 5 and len(lut["networks"]["held_out"]) == 3
    assert all(r["measured_ms"] > 0 and r["sum_ms"] > 0 for r in rows)
    model = latency.load_latency_model(tmp_path / "latency" / f"{target}.json", space, lut["num_classes"])
    cal, e = lut["calibration"], lut["entries"]
    for r in rows:  # the calibrated sum, written out from the entries (not via the cost model's table)
        arch = Arch.parse(r["arch"])
        blocks = latency.arch_blocks(space, arch)
        by_hand = (cal["fixed_scale"] * (e[lut["fixed"]["stem"]]["ms"] + e[lut["fixed"]["head"]]["ms"])
                   + sum(cal["unit_scale"][i] * e[s.key]["ms"] for i, s in blocks)
                   + cal["block_ms"] * len(blocks) + cal["offset_ms"])
        assert model.cost(arch) == pytest.approx(by_hand) == pytest.approx(r["predicted_ms"])
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    m = metrics[target]
    assert m["held_out_archs"] == 3 and 0 <= m["held_out_median_rel_err"] <= m["held_out_p90_rel_err"]
    with Image.open(tmp_path / "latency" / f"{target}.png") as img:
        assert img.format == "PNG" and img.size[0] > 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_profile_cuda(p, space):
    lut = latency.profile(p.latency, "cuda-torch-bf16", space, NUM_CLASSES, progress=lambda m: None)
    assert lut["machine"]["gpu"] and lut["protocol"]["timer"] == "cuda events"
    assert all(e["ms"] > 0 for e in lut["entries"].values())


def test_calibration_is_fitted_on_the_calibration_networks_only(p, space, monkeypatch):
    """The headline held-out error is honest only if the held-out nets never reach the fit."""
    seen = []
    real = latency.fit_calibration

    def spy(method, terms, measured):
        seen.append((list(terms), list(measured)))
        return real(method, terms, measured)

    monkeypatch.setattr(latency, "fit_calibration", spy)
    lut = latency.profile(p.latency, "cpu-torch", space, NUM_CLASSES, progress=lambda m: None)
    cal = lut["networks"]["calibration"]
    held = lut["networks"]["held_out"]
    assert not {r["arch"] for r in cal} & {r["arch"] for r in held}
    # The DAG's fit (the first), then the validation's comparison fits: calibration nets only, always.
    terms, measured = seen[0]
    assert measured == [r["measured_ms"] for r in cal]
    assert terms == [latency.raw_terms(lut, space, Arch.parse(r["arch"])) for r in cal]
    held_terms = [latency.raw_terms(lut, space, Arch.parse(r["arch"])) for r in held]
    for terms, _ in seen:
        assert len(terms) == len(cal) and not [t for t in terms if t in held_terms]


# ---------------------------------------------------------------- the deployed artifact
def _op_counts(model_bytes: bytes) -> dict[str, int]:
    import collections

    import onnx

    return dict(collections.Counter(n.op_type for n in onnx.load_from_string(model_bytes).graph.node))


def test_profiled_nets_are_the_exported_graph(space, tmp_path):
    """What the LUT times as a whole subnet, and its fixed parts, are the ops `tailor export` writes:
    uint8 NHWC in (Transpose, Cast, Mul, Add), the superclass-wide classifier, logits and softmax."""
    from tailor.export import export_onnx

    arch, classes = space.max_arch, 2
    x = torch.randint(0, 256, latency.image_shape(space.image_size, 1), dtype=torch.uint8)
    profiled = _op_counts(latency.onnx_bytes(latency.deployed_net(space, arch, classes), x))
    path = export_onnx(StaticNet(space, arch, classes), tmp_path / "m.onnx", space.image_size, (0.4,) * 3, (0.2,) * 3)
    assert profiled == _op_counts(path.read_bytes())
    assert profiled["Softmax"] == 1 and profiled["Cast"] >= 1
    # The fixed parts together with the blocks are the same ops as the whole net.
    stem = _op_counts(latency.onnx_bytes(latency.deployed_stem(space), x))
    fr, c = space.final_resolution, space.cfg
    head = _op_counts(latency.onnx_bytes(latency.deployed_head(space, classes), torch.randn(1, c.widths[-1], fr, fr)))
    assert stem["Cast"] == profiled["Cast"] and head["Softmax"] == 1 and head["Gemm"] == profiled["Gemm"]


def test_deployed_files_are_timed_under_the_targets_session_options(p, space, tmp_path, monkeypatch):
    from tailor.export import export_onnx

    target = p.latency.targets["cpu-ort"]
    seen = []
    real_session = latency.OrtRunner.session

    def spy(self, model):
        sess = real_session(self, model)
        seen.append(sess.get_session_options())
        return sess

    monkeypatch.setattr(latency.OrtRunner, "session", spy)
    files = {n: export_onnx(StaticNet(space, a, 2), tmp_path / f"{n}.onnx", space.image_size, (0.5,) * 3, (0.2,) * 3)
             for n, a in (("small", space.min_arch), ("large", space.max_arch))}
    pr = p.latency.protocol
    k = latency.DEPLOYED_SESSIONS
    stats = latency.measure_deployed("cpu-ort", target, pr, files, space.image_size, here=True)  # the spy sees this process
    assert set(stats) == {"small", "large"}
    assert all(s["calls"] == pr.repeats * pr.rounds and s["ms"] == s[f"{pr.statistic}_ms"] > 0 for s in stats.values())
    # The figure is the median of the file's sessions, each timed under the target's options.
    assert all(len(s["sessions_ms"]) == k and s["ms"] == sorted(s["sessions_ms"])[k // 2] for s in stats.values())
    assert [(o.intra_op_num_threads, o.inter_op_num_threads) for o in seen] == [(target.threads, 1)] * 2 * k
    # The public call times in a fresh process (no PyTorch work before it) and returns the same form.
    fresh = latency.measure_deployed("cpu-ort", target, pr, files, space.image_size)
    assert set(fresh) == set(stats) and all(len(fresh[n]["sessions_ms"]) == k and fresh[n]["ms"] > 0 for n in fresh)
    with pytest.raises(RuntimeError, match="cpu-torch"):
        latency.measure_deployed("cpu-torch", p.latency.targets["cpu-torch"], pr, files, space.image_size)

"""Search space: Arch strings, legality, sampling, encoding, and MAdds (analytic == hooks == cost model)."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from conftest import ROOT, tiny_params

from tailor.config import load_params
from tailor.cost import madds_cost_model
from tailor.nets import StaticNet, count_madds
from tailor.space import Arch, SearchSpace
from tailor.supernet import Gates, SuperNet

TIN_PRESET = ROOT / "configs" / "tin-sc10.yaml"


def default_space() -> SearchSpace:
    p = load_params(ROOT / "params.yaml")
    return SearchSpace(p.space, p.data.image_size)


def spaces():
    """(id, space, num_classes): the default space at 32x32 and, when present, tin-sc10's at 64x64."""
    out = [pytest.param(default_space(), 32, id="default-32")]
    if TIN_PRESET.exists():
        p = load_params(ROOT / "params.yaml", [TIN_PRESET])
        out.append(pytest.param(SearchSpace(p.space, p.data.image_size), 50, id="tin-sc10-64"))
    return out


# ---------------------------------------------------------------- Arch values
def test_arch_string_round_trip():
    space = default_space()
    rng = random.Random(0)
    for _ in range(200):
        a = space.sample(rng)
        s = str(a)
        assert Arch.parse(s) == a
        assert str(Arch.parse(s)) == s
        assert hash(Arch.parse(s)) == hash(a)  # usable as a dict key (LUT, predictor caches)


def test_arch_string_form_is_stable():
    a = Arch((((3, 4), (5, 6)), ((7, 3), (3, 3), (5, 4))))
    assert str(a) == "k3e4.k5e6_k7e3.k3e3.k5e4"
    assert a.depths == (2, 3)
    assert list(a.blocks()) == [(0, 0, 3, 4), (0, 1, 5, 6), (1, 0, 7, 3), (1, 1, 3, 3), (1, 2, 5, 4)]
    assert Arch.parse("  k3e4.k5e6_k7e3.k3e3.k5e4\n") == a


@pytest.mark.parametrize("text, bad", [
    ("k3e4.k5x6_k7e3", "k5x6"),
    ("k3e4..k5e6", ""),
    ("k3e4_", ""),
    ("3e4", "3e4"),
    ("k3e4.K5E6", "K5E6"),
])
def test_parse_errors_name_the_bad_block(text, bad):
    with pytest.raises(ValueError) as e:
        Arch.parse(text)
    assert f"block {bad!r}" in str(e.value)
    assert repr(text) in str(e.value)


def test_validate_accepts_the_space_and_rejects_outside_choices():
    space = default_space()
    rng = random.Random(1)
    for _ in range(50):
        a = space.sample(rng)
        assert space.validate(a) is a
    good = str(space.max_arch)
    with pytest.raises(ValueError, match="4 units, the space has 5"):
        space.validate(Arch.parse(good.rsplit("_", 1)[0]))
    with pytest.raises(ValueError, match="unit 0 has depth 1"):
        space.validate(Arch.parse("k3e3" + good[good.index("_"):]))
    with pytest.raises(ValueError, match="unit 0 has depth 5"):
        space.validate(Arch.parse("k3e3.k3e3.k3e3.k3e3.k3e3" + good[good.index("_"):]))
    with pytest.raises(ValueError, match=r"block k9e6 in unit 1"):
        space.validate(Arch.parse(good.replace("_k7e6", "_k9e6", 1)))
    with pytest.raises(ValueError, match=r"block k7e5 in unit 4"):
        space.validate(Arch.parse(good[:-4] + "k7e5"))


# ---------------------------------------------------------------- sampling and reference archs
def test_uniform_sampling_covers_every_choice_evenly():
    space = default_space()
    c = space.cfg
    rng = random.Random(2)
    n = 3000
    depth = [Counter() for _ in range(space.n_units)]
    kernel, expand = Counter(), Counter()
    for _ in range(n):
        a = space.sample(rng)
        for i, d in enumerate(a.depths):
            depth[i][d] += 1
        for _, _, k, e in a.blocks():
            kernel[k] += 1
            expand[e] += 1
    for i in range(space.n_units):
        assert set(depth[i]) == set(c.depths)
        for d in c.depths:  # binomial sd at n=3000, p=1/3: 0.0086; 0.04 is > 4 sd
            assert abs(depth[i][d] / n - 1 / len(c.depths)) < 0.04, (i, depth[i])
    for counts, choices in ((kernel, c.kernels), (expand, c.expands)):
        total = sum(counts.values())
        assert set(counts) == set(choices)
        for v in choices:
            assert abs(counts[v] / total - 1 / len(choices)) < 0.02, counts


def test_sampling_is_seeded_and_respects_restrictions():
    space = default_space()
    a = [space.sample(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(3)
    seen = set()
    for _ in range(300):
        arch = space.sample(rng, kernels=[3, 5], depths=[4], expands=[6])
        assert arch.depths == (4,) * space.n_units
        for _, _, k, e in arch.blocks():
            assert k in (3, 5) and e == 6
            seen.add(k)
    assert seen == {3, 5}


def test_min_mid_max_archs():
    space = default_space()
    c = space.cfg
    assert space.min_arch == space.uniform(min(c.depths), min(c.kernels), min(c.expands))
    assert space.max_arch == space.uniform(max(c.depths), max(c.kernels), max(c.expands))
    assert str(space.min_arch).split("_")[0] == ".".join(["k3e3"] * 2)
    assert str(space.mid_arch).split("_")[0] == ".".join(["k5e4"] * 3)
    assert str(space.max_arch).split("_")[0] == ".".join(["k7e6"] * 4)
    for a in (space.min_arch, space.mid_arch, space.max_arch):
        space.validate(a)
    m = [space.madds(a, 32) for a in (space.min_arch, space.mid_arch, space.max_arch)]
    assert m[0] < m[1] < m[2]
    # Nothing sampled is cheaper than min or dearer than max.
    rng = random.Random(4)
    for _ in range(200):
        assert m[0] <= space.madds(space.sample(rng), 32) <= m[2]


def test_encoding_length_and_content():
    space = default_space()
    c = space.cfg
    assert space.encoding_size == 5 * (3 + 4 * (3 + 3))
    rng = random.Random(5)
    seen = set()
    for _ in range(200):
        a = space.sample(rng)
        enc = space.encode(a)
        assert len(enc) == space.encoding_size
        assert set(enc) <= {0.0, 1.0}
        # Per unit: one depth bit, and one kernel + one expand bit per running block only.
        assert sum(enc) == space.n_units + 2 * sum(a.depths)
        seen.add(tuple(enc))
        # Decode it back: the encoding is lossless.
        per_unit = len(c.depths) + space.max_depth * (len(c.kernels) + len(c.expands))
        units = []
        for i in range(space.n_units):
            u = enc[i * per_unit:(i + 1) * per_unit]
            d = c.depths[u[:len(c.depths)].index(1.0)]
            blocks = []
            for j in range(d):
                s = u[len(c.depths) + j * 6: len(c.depths) + (j + 1) * 6]
                blocks.append((c.kernels[s[:3].index(1.0)], c.expands[s[3:].index(1.0)]))
            units.append(tuple(blocks))
        assert Arch(tuple(units)) == a
    assert len(seen) == 200


def test_final_resolution_keeps_a_useful_feature_map():
    assert default_space().final_resolution == 4  # 32 / (2 * 2 * 2)
    if TIN_PRESET.exists():
        p = load_params(ROOT / "params.yaml", [TIN_PRESET])
        assert SearchSpace(p.space, p.data.image_size).final_resolution >= 4


# ---------------------------------------------------------------- MAdds
@pytest.mark.parametrize("space, num_classes", spaces())
def test_analytic_madds_equal_hook_count(space, num_classes):
    torch.manual_seed(0)
    rng = random.Random(6)
    archs = [space.min_arch, space.mid_arch, space.max_arch] + [space.sample(rng) for _ in range(100)]
    for a in archs:
        net = StaticNet(space, a, num_classes)
        assert count_madds(net, space.image_size) == space.madds(a, num_classes), str(a)


def test_extracted_subnet_madds_equal_hook_count():
    p = tiny_params()
    space = SearchSpace(p.space, p.data.image_size)
    torch.manual_seed(0)
    sn = SuperNet(space, 6).eval()
    rng = random.Random(8)
    for _ in range(20):
        a = space.sample(rng)
        assert count_madds(sn.extract(a), space.image_size) == space.madds(a, 6)
        assert count_madds(sn.extract(a, [1, 4]), space.image_size) == space.madds(a, 2)


@pytest.mark.parametrize("space, num_classes", spaces())
def test_slot_cost_model_equals_analytic_madds(space, num_classes):
    cm = madds_cost_model(space, num_classes)
    assert cm.unit == "MAdds"
    rng = random.Random(9)
    archs = [space.min_arch, space.mid_arch, space.max_arch] + [space.sample(rng) for _ in range(100)]
    for a in archs:
        exact = space.madds(a, num_classes)
        assert cm.cost(a) == exact
        g = Gates.from_arch(space, a)
        got = cm.cost_gates(g.depth.double(), g.kernel.double(), g.expand.double())
        assert float(got) == pytest.approx(exact, rel=1e-12)
    low, high = cm.low_high
    assert low == space.madds(space.min_arch, num_classes)
    assert high == space.madds(space.max_arch, num_classes)


def test_cost_model_calibration_and_gradients():
    space = default_space()
    cm = madds_cost_model(space, 32)
    cm.scale, cm.offset = 2.0, 5.0
    a = space.sample(random.Random(10))
    assert cm.cost(a) == 2.0 * space.madds(a, 32) + 5.0
    lo, hi = cm.low_high
    assert lo == 2.0 * space.madds(space.min_arch, 32) + 5.0 and hi == 2.0 * space.madds(space.max_arch, 32) + 5.0
    # Relaxed gates: a differentiable cost strictly between the extremes, increasing in every gate.
    g = Gates.from_arch(space, space.mid_arch)
    depth = torch.full_like(g.depth, 0.5, dtype=torch.float64, requires_grad=True)
    kernel = torch.full_like(g.kernel, 0.5, dtype=torch.float64, requires_grad=True)
    expand = torch.full_like(g.expand, 0.5, dtype=torch.float64, requires_grad=True)
    c = cm.cost_gates(depth, kernel, expand)
    assert lo < float(c.detach()) < hi
    c.backward()
    for t in (depth, kernel, expand):
        assert torch.isfinite(t.grad).all() and (t.grad > 0).all()

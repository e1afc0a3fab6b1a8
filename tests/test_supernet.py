"""Supernet: slicing, gated and extracted subnets agree; classifier slicing; BN recalibration; dynamic BN."""
from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import ROOT, tiny_params
from torch import nn

from tailor.config import load_params
from tailor.nets import StaticNet
from tailor.space import Arch, SearchSpace
from tailor.supernet import Gates, SuperNet, gates_for, nested_levels, recalibrate_bn

TOL = 1e-5


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that eval-mode parity tests every slice."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
    return model


def make(space_of: str = "default", num_classes: int = 10, seed: int = 0):
    if space_of == "default":
        p = load_params(ROOT / "params.yaml")
    else:
        p = tiny_params()
    space = SearchSpace(p.space, p.data.image_size)
    torch.manual_seed(seed)
    return space, randomise(SuperNet(space, num_classes), seed + 1).eval()


@pytest.fixture(scope="module")
def default_net():
    return make("default")


def images(space: SearchSpace, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, space.image_size, space.image_size, generator=torch.Generator().manual_seed(seed))


def archs(space: SearchSpace, n: int, seed: int):
    rng = random.Random(seed)
    return [space.min_arch, space.mid_arch, space.max_arch] + [space.sample(rng) for _ in range(n)]


def test_extracted_subnet_equals_supernet_slice(default_net):
    space, sn = default_net
    x = images(space)
    worst = 0.0
    with torch.no_grad():
        for a in archs(space, 40, seed=1):
            net = sn.extract(a)
            assert isinstance(net, StaticNet) and not net.training and net.arch == str(a)
            ref = sn(x, a)
            out = net(x)
            assert ref.abs().max() > 1e-2  # a real signal, not zeros compared with zeros
            worst = max(worst, float((ref - out).abs().max()))
    assert worst <= TOL, worst


def test_different_archs_give_different_outputs(default_net):
    # Guards the parity test against a supernet that ignores its arch argument.
    space, sn = default_net
    x = images(space)
    with torch.no_grad():
        outs = [sn(x, a) for a in archs(space, 3, seed=2)]
    for i in range(len(outs)):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 10 * TOL
    with torch.no_grad():
        assert torch.equal(sn(x), sn(x, space.max_arch))


def test_gated_forward_equals_slicing_for_hard_gates(default_net):
    space, sn = default_net
    x = images(space)
    worst = 0.0
    with torch.no_grad():
        for a in archs(space, 25, seed=3):
            gated = sn.forward_gated(x, Gates.from_arch(space, a))
            worst = max(worst, float((gated - sn(x, a)).abs().max()))
    assert worst <= TOL, worst


def test_gates_round_trip():
    space, _ = make("tiny")
    c = space.cfg
    for a in archs(space, 200, seed=4):
        g = Gates.from_arch(space, a)
        assert g.depth.shape == (space.n_units, space.max_depth - min(c.depths))
        assert g.kernel.shape == (space.n_units, space.max_depth, len(c.kernels) - 1)
        assert g.expand.shape == (space.n_units, space.max_depth, len(c.expands) - 1)
        assert g.to_arch(space) == a


def test_nested_gate_helpers():
    assert gates_for([3, 5, 7], 3).tolist() == [0, 0]
    assert gates_for([3, 5, 7], 5).tolist() == [1, 0]
    assert gates_for([3, 5, 7], 7).tolist() == [1, 1]
    assert nested_levels(torch.tensor([1.0, 0.0])).tolist() == [1, 1, 0]
    assert nested_levels(torch.tensor([0.0, 1.0])).tolist() == [1, 0, 0]  # nested: a later gate needs the earlier
    assert nested_levels(torch.tensor([0.5, 0.5])).tolist() == [1, 0.5, 0.25]


def test_gated_forward_is_differentiable_in_the_gates():
    space, sn = make("tiny")
    g = Gates.from_arch(space, space.mid_arch)
    gates = [torch.full_like(t, 0.5, requires_grad=True) for t in (g.depth, g.kernel, g.expand)]
    sn.forward_gated(images(space), Gates(*gates)).pow(2).sum().backward()
    for t in gates:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_extract_with_classes_slices_classifier_rows(default_net):
    space, sn = default_net
    x = images(space, 3)
    classes = [7, 2, 3]
    with torch.no_grad():
        for a in archs(space, 5, seed=5):
            net = sn.extract(a, classes)
            assert net.head.classifier.out_features == 3
            assert torch.equal(net.head.classifier.weight, sn.head.classifier.weight[classes])
            assert float((net(x) - sn(x, a)[:, classes]).abs().max()) <= TOL


def test_extract_copies_rather_than_shares_weights(default_net):
    space, sn = default_net
    net = sn.extract(space.mid_arch)
    before = sn.units[0][0].expand_conv.weight.clone()
    with torch.no_grad():
        for prm in net.parameters():
            prm.add_(1.0)
    assert torch.equal(sn.units[0][0].expand_conv.weight, before)


def test_extract_rejects_an_arch_outside_the_space(default_net):
    space, sn = default_net
    with pytest.raises(ValueError, match="unit 0 has depth 1"):
        sn.extract(Arch.parse("k3e3" + str(space.max_arch)[str(space.max_arch).index("_"):]))


def test_supernet_needs_consecutive_depths():
    p = load_params(ROOT / "params.yaml")
    cfg = p.space.model_copy(update={"depths": [2, 4]})
    with pytest.raises(ValueError, match="consecutive"):
        SuperNet(SearchSpace(cfg, 32), 4)


# ---------------------------------------------------------------- BN recalibration
def bn_input_stats(model: nn.Module, batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer: the cumulative average over batches of the batch mean and unbiased variance of
    its input, with every BN normalising by batch statistics (as recalibration runs them)."""
    m = copy.deepcopy(model).train()
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    sums: dict[str, list] = {}

    def hook(name):
        def f(mod, inp, out):
            x = inp[0].double()
            mean = x.mean((0, 2, 3))
            var = x.var((0, 2, 3), unbiased=True)
            s = sums.setdefault(name, [0, 0, 0])
            s[0], s[1], s[2] = s[0] + mean, s[1] + var, s[2] + 1
        return f

    hs = [mod.register_forward_hook(hook(name)) for name, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    with torch.no_grad():
        for x in batches:
            m(x)
    for h in hs:
        h.remove()
    return {k: (s[0] / s[2], s[1] / s[2]) for k, s in sums.items()}


def test_recalibrate_bn_sets_batch_statistics():
    space, sn = make("default", seed=3)
    net = sn.extract(space.mid_arch)
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = 0.05
    net.train()  # recalibration must leave the mode it found
    batches = [images(space, 8, seed=s) * 2 + 1 for s in range(3)]
    expected = bn_input_stats(net, batches)
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    params_before = {k: v.clone() for k, v in net.named_parameters()}
    out = recalibrate_bn(net, batches)
    assert out is net and net.training
    bns = dict((n, m) for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d))
    assert len(bns) == len(expected) > 10
    for name, mod in bns.items():
        mean, var = expected[name]
        assert mod.momentum == 0.05, name
        torch.testing.assert_close(mod.running_mean.double(), mean, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(mod.running_var.double(), var, rtol=1e-4, atol=1e-5, msg=name)
        assert not torch.allclose(mod.running_mean, before[f"{name}.running_mean"]), name
    for k, v in net.named_parameters():
        assert torch.equal(v, params_before[k]), k  # statistics only


def test_recalibrate_bn_restores_eval_mode_and_default_momentum():
    space, sn = make("tiny")
    net = sn.extract(space.max_arch).eval()
    recalibrate_bn(net, [images(space, 4)])
    assert not net.training
    assert all(m.momentum == 0.1 and not m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))


# ---------------------------------------------------------------- dynamic BN in training
def test_dynamic_bn_updates_only_the_active_slices():
    space, sn = make("default", seed=5)
    sn.train()
    c = space.cfg
    # Unit 0: two blocks at expand 3 (the smallest mid), unit 1: three; the rest the max.
    units = list(space.max_arch.units)
    units[0] = ((3, 3), (5, 3))
    units[1] = ((7, 4),) * 3
    arch = Arch(tuple(units))
    x = images(space, 4, seed=7)
    before = copy.deepcopy(sn.state_dict())
    ref = copy.deepcopy(sn)
    sn(x, arch)
    after = sn.state_dict()

    blk = sn.units[0][0]
    mid3, mid4, mid6 = blk.mids
    assert mid3 < mid6
    for i, j, mid in [(0, 0, mid3), (0, 1, sn.units[0][1].mids[0]), (1, 0, sn.units[1][0].mids[1])]:
        pre = f"units.{i}.{j}."
        for bn in ("expand_bn", "dw_bn"):
            for buf in ("running_mean", "running_var"):
                k = pre + f"{bn}.{buf}"
                assert not torch.equal(after[k][:mid], before[k][:mid]), k
                assert torch.equal(after[k][mid:], before[k][mid:]), k
        for buf in ("running_mean", "running_var"):
            k = pre + f"project_bn.{buf}"
            assert not torch.equal(after[k], before[k]), k
    # Blocks that did not run keep every buffer.
    for i, j in [(0, 2), (0, 3), (1, 3)]:
        for k in before:
            if k.startswith(f"units.{i}.{j}.") and "running" in k:
                assert torch.equal(after[k], before[k]), k

    # The update is the usual momentum blend of the batch statistics of the sliced input.
    with torch.no_grad():
        h = ref.stem(x)
        e = torch.nn.functional.conv2d(h, ref.units[0][0].expand_conv.weight[:mid3])
        mean, var = e.mean((0, 2, 3)), e.var((0, 2, 3), unbiased=True)
    m = ref.units[0][0].expand_bn.momentum
    b = ref.units[0][0].expand_bn
    torch.testing.assert_close(sn.units[0][0].expand_bn.running_mean[:mid3], (1 - m) * b.running_mean[:mid3] + m * mean)
    torch.testing.assert_close(sn.units[0][0].expand_bn.running_var[:mid3], (1 - m) * b.running_var[:mid3] + m * var)
    assert c.expands[0] == 3


def test_training_step_through_a_slice_only_grads_the_slice():
    space, sn = make("tiny")
    sn.train()
    arch = space.min_arch
    sn(images(space, 4), arch).sum().backward()
    blk = sn.units[0][0]
    mid = blk.mids[0]
    k = min(space.cfg.kernels)
    o = (max(space.cfg.kernels) - k) // 2
    g = blk.expand_conv.weight.grad
    assert g[:mid].abs().sum() > 0 and g[mid:].abs().sum() == 0
    dg = blk.dw_conv.weight.grad
    inner = dg[:mid, :, o:o + k, o:o + k]
    assert inner.abs().sum() > 0
    # The centre crop only (kernel weights are shared): every gradient outside it is exactly zero.
    # (Comparing the two float sums instead failed on some CPUs: summation order differs.)
    outside = dg.clone()
    outside[:mid, :, o:o + k, o:o + k] = 0
    assert torch.count_nonzero(outside) == 0
    # Optional blocks that did not run get no gradient at all.
    assert sn.units[0][space.max_depth - 1].expand_conv.weight.grad is None

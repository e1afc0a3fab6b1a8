"""Supernet training recipes: FairNAS / SPOS / sandwich paths, ELS and its fold, curriculum growth,
and each switch trained end to end on the tiny overlay with a resume after a stop."""
from __future__ import annotations

import copy
import random
import subprocess
from collections import Counter

import pytest
import torch
from conftest import ROOT, TINY, tiny_params
from test_supernet import images, randomise
from test_train import assert_same_weights, cli_env, overlay, tailor_cmd

from tailor.config import ParamsError, PhaseConfig, load_params
from tailor.space import SearchSpace
from tailor.supernet import Gates, SuperNet
from tailor.supernet_training import fair_paths, grow, kd_weight_at, phase_extreme, step_paths
from tailor.train import make_optimizer

FULL = PhaseConfig(name="all", epochs=1, lr=0.1, kernels=[3, 5, 7], depths=[2, 3, 4], expands=[3, 4, 6])


def default_space() -> SearchSpace:
    p = load_params(ROOT / "params.yaml")
    return SearchSpace(p.space, p.data.image_size)


# ---------------------------------------------------------------- samplers
@pytest.mark.parametrize("m", [3, 6])
def test_fairnas_trains_every_choice_of_every_slot_equally_often(m):
    space = default_space()
    rng = random.Random(0)
    for _ in range(20):
        # All depths open: each unit's depth and each always-running block's kernel / expand.
        paths = fair_paths(space, FULL, m, rng)
        assert len(paths) == m
        for i in range(space.n_units):
            assert Counter(len(a.units[i]) for a in paths) == {d: m // 3 for d in FULL.depths}
            for j in range(min(FULL.depths)):
                assert Counter(a.units[i][j][0] for a in paths) == {k: m // 3 for k in FULL.kernels}
                assert Counter(a.units[i][j][1] for a in paths) == {e: m // 3 for e in FULL.expands}
        # Depth fixed at the maximum (OFA's kernel phase): every block position of every unit.
        kphase = FULL.model_copy(update={"depths": [4], "expands": [6]})
        paths = fair_paths(space, kphase, m, rng)
        for i in range(space.n_units):
            for j in range(4):
                assert Counter(a.units[i][j][0] for a in paths) == {k: m // 3 for k in FULL.kernels}
                assert {a.units[i][j][1] for a in paths} == {6}


def test_fairnas_paths_differ_between_steps_and_are_seeded():
    space = default_space()
    a = fair_paths(space, FULL, 3, random.Random(1))
    assert a == fair_paths(space, FULL, 3, random.Random(1))
    assert a != fair_paths(space, FULL, 3, random.Random(2))


def test_fairnas_needs_a_multiple_of_every_phases_choice_count():
    with pytest.raises(ParamsError, match="subnets_per_step 2 is not a multiple of phase 'kernel'"):
        tiny_params(supernet={"sampler": "fairnas", "subnets_per_step": 2, "kd_weight": 0})


def test_inplace_distillation_needs_the_sandwich_sampler():
    with pytest.raises(ParamsError, match="kd_source 'inplace' needs supernet.sampler 'sandwich'"):
        tiny_params(teacher={"epochs": 0}, supernet={"sampler": "spos", "kd_source": "inplace"})


def test_sandwich_and_spos_paths():
    space = default_space()
    small = FULL.model_copy(update={"depths": [2, 3], "expands": [3, 4]})
    cfg = tiny_params(supernet={"sampler": "sandwich", "subnets_per_step": 4}).supernet
    paths = step_paths(space, small, cfg, random.Random(0))
    assert len(paths) == 4
    assert paths[0] == space.uniform(3, 7, 4) == phase_extreme(space, small, True)  # the phase's largest
    assert paths[-1] == space.uniform(2, 3, 3)
    cfg = tiny_params(supernet={"sampler": "spos", "subnets_per_step": 1, "kd_weight": 0}).supernet
    seen = [step_paths(space, small, cfg, random.Random(s)) for s in range(30)]
    assert all(len(p) == 1 for p in seen) and len({str(p[0]) for p in seen}) == 30
    for (a,) in seen:
        assert set(a.depths) <= {2, 3} and {e for _, _, _, e in a.blocks()} <= {3, 4}


# ---------------------------------------------------------------- ELS
def els_net(seed: int = 0) -> tuple[SearchSpace, SuperNet]:
    space = default_space()
    torch.manual_seed(seed)
    net = randomise(SuperNet(space, 10, els=True), seed + 1).eval()
    with torch.no_grad():  # stabilizers away from their identity init, as training leaves them
        for a in net.els:
            a.add_(0.3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(seed)))
    return space, net


def test_els_folds_into_the_next_conv_exactly():
    space, net = els_net()
    x = images(space, 4)
    rng = random.Random(0)
    for arch in [space.min_arch, space.mid_arch, space.max_arch] + [space.sample(rng) for _ in range(6)]:
        static = net.extract(arch).eval()
        assert [type(m) for m in static.modules()] == [type(m) for m in SuperNet(space, 10).extract(arch).modules()]
        with torch.no_grad():
            ref = net(x, arch)
            assert (static(x) - ref).abs().max() <= 1e-5, arch
            assert (net.forward_gated(x, Gates.from_arch(space, arch)) - ref).abs().max() <= 1e-5, arch


def test_els_changes_only_depth_skipping_subnets_and_starts_as_identity():
    space, net = els_net()
    plain = SuperNet(space, 10)
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("els.")})
    plain.eval()
    x = images(space, 4)
    with torch.no_grad():
        assert torch.equal(plain(x, space.max_arch), net(x, space.max_arch))  # no block skipped
        assert (plain(x, space.min_arch) - net(x, space.min_arch)).abs().max() > 1e-3
        fresh = SuperNet(space, 10, els=True).eval()
        fresh.load_state_dict({**plain.state_dict(), **{k: v for k, v in fresh.state_dict().items()
                                                        if k.startswith("els.")}})
        assert torch.equal(fresh(x, space.min_arch), plain(x, space.min_arch))


def test_els_is_trained_without_weight_decay():
    _, net = els_net()
    opt = make_optimizer(net, tiny_params().supernet.optim)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(id(a) not in decayed for a in net.els)
    assert id(net.units[0][0].expand_conv.weight) in decayed


def test_els_refuses_a_space_where_it_cannot_fold():
    p = tiny_params()  # unit 1's first block is residual (8 -> 8 channels, stride 1)
    with pytest.raises(ValueError, match="unit 1's first block is residual"):
        SuperNet(SearchSpace(p.space, 16), 6, els=True)


# ---------------------------------------------------------------- curriculum growth
def test_growth_preserves_every_old_subnet_and_the_new_largest():
    space = default_space()
    small = FULL.model_copy(update={"kernels": [3, 5], "depths": [2, 3], "expands": [3, 4]})
    torch.manual_seed(0)
    net = randomise(SuperNet(space, 10), 1).eval()
    before = copy.deepcopy(net)
    info = grow(net, small, FULL, torch.Generator().manual_seed(0))
    assert info == {"depth_slots": [3], "expand": [4, 6], "kernel": [5, 7]}
    x = images(space, 4)
    rng = random.Random(0)
    olds = [phase_extreme(space, small, True), phase_extreme(space, small, False)]
    olds += [space.sample(rng, small.kernels, small.depths, small.expands) for _ in range(6)]
    with torch.no_grad():
        for arch in olds:
            assert (net(x, arch) - before(x, arch)).abs().max() <= 1e-5, arch
        # The grown largest computes what the old largest did, in eval and in training mode.
        assert (net(x, space.max_arch) - before(x, phase_extreme(space, small, True))).abs().max() <= 1e-5
        net.train(), before.train()
        net.head.dropout.p = before.head.dropout.p = 0.0
        assert (net(x, space.max_arch) - before(x, phase_extreme(space, small, True))).abs().max() <= 1e-5
    # The new channels are copies (not zeros), so they can learn.
    blk = net.units[0][0]
    assert blk.expand_conv.weight[blk.mids[1]:].abs().sum() > 0
    assert blk.project_conv.weight[:, blk.mids[1]:].abs().sum() == 0


def test_progressive_distillation_weight_moves_from_start_to_end():
    cfg = tiny_params(supernet={"curriculum": {"enabled": True, "kd_start": 0.5, "kd_end": 0.05}}).supernet
    assert kd_weight_at(cfg, 0.0) == 0.5 and abs(kd_weight_at(cfg, 1.0) - 0.05) < 1e-12
    assert abs(kd_weight_at(cfg, 0.5) - 0.275) < 1e-12


def test_curriculum_rejects_shrinking_phases_and_els():
    with pytest.raises(ParamsError, match="drops depths"):
        tiny_params(supernet={"curriculum": {"enabled": True}, "sampler": "sandwich",
                              "phases": [{"name": "a", "epochs": 1, "lr": 0.1, "kernels": [3], "depths": [4],
                                          "expands": [6]},
                                         {"name": "b", "epochs": 1, "lr": 0.1, "kernels": [3], "depths": [2],
                                          "expands": [6]}]})
    with pytest.raises(ParamsError, match="cannot be combined"):
        tiny_params(supernet={"curriculum": {"enabled": True}, "els": True})


# ---------------------------------------------------------------- each switch trains and resumes
ELS_SPACE = {"widths": [8, 12, 16, 20, 24]}  # every unit's first block changes width: stabilizers fold
SWITCHES = {
    "spos": {"supernet": {"sampler": "spos", "subnets_per_step": 1, "kd_weight": 0}},
    "fairnas": {"supernet": {"sampler": "fairnas", "subnets_per_step": 3, "kd_weight": 0}},
    "els": {"space": ELS_SPACE, "supernet": {"els": True}},
    "sandwich": {"supernet": {"sampler": "sandwich", "subnets_per_step": 2}},
    "curriculum": {"supernet": {"sampler": "sandwich", "subnets_per_step": 2, "curriculum": {"enabled": True}, "phases": [
        {"name": "small", "epochs": 1, "lr": 0.05, "kernels": [3, 5, 7], "depths": [2, 3], "expands": [3, 4]},
        {"name": "grown", "epochs": 2, "lr": 0.05, "kernels": [3, 5, 7], "depths": [2, 3, 4], "expands": [3, 4, 6]}]}},
}


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_each_switch_trains_and_resumes_after_a_stop_like_the_default(tiny_run, tmp_path, name):
    ov = overlay(tmp_path, f"{name}.yaml", SWITCHES[name])
    common = ["--params", ROOT / "params.yaml", "--preset", TINY, "--preset", ov]
    teacher = tiny_run["teacher"]
    if "space" in SWITCHES[name]:  # another space needs its own teacher
        teacher = tmp_path / "t.pt"
        r = subprocess.run(tailor_cmd("train-teacher", *common, "--data", tiny_run["data"], "--out", teacher,
                                      "--metrics", tmp_path / "t.json", "--work-dir", tmp_path / "wt"),
                           env=cli_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr

    def run(out, work, stop=None):
        args = tailor_cmd("train-supernet", *common, "--data", tiny_run["data"], "--teacher", teacher,
                          "--out", out, "--metrics", tmp_path / f"{out.stem}.json", "--work-dir", work)
        env = cli_env(TAILOR_STOP_AFTER_EPOCH=str(stop)) if stop else cli_env()
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)

    r = run(tmp_path / "ref.pt", tmp_path / "wref")
    assert r.returncode == 0, r.stderr
    stop = 2 if name == "curriculum" else 1  # the last phase, so that resuming must restore its state
    r = run(tmp_path / "s.pt", tmp_path / "ws", stop=stop)
    assert r.returncode == 130, r.stderr
    r = run(tmp_path / "s.pt", tmp_path / "ws")
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr
    assert_same_weights(tmp_path / "s.pt", tmp_path / "ref.pt")
    ck = torch.load(tmp_path / "ref.pt", map_location="cpu", weights_only=False)
    m = ck["metrics"]
    assert all(h["ce"] > 0 for h in m["history"])
    if name == "els":
        assert any(k.startswith("els.") for k in ck["state_dict"])
        assert any(not torch.equal(v, torch.eye(v.shape[-1]).expand_as(v))
                   for k, v in ck["state_dict"].items() if k.startswith("els.")), "the stabilizers were not trained"
    if name == "curriculum":
        assert [g["phase"] for g in m["growth"]] == ["grown"]
        assert (tmp_path / "ws" / "curriculum-teacher-1.pt").exists()
    if name in ("spos", "fairnas"):
        assert m["sampler"] == name and all(h["kd"] == 0 for h in m["history"])
    if name == "sandwich":
        assert m["sampler"] == "sandwich" and all(h["kd"] > 0 for h in m["history"])


# ---------------------------------------------------------------- the loss applies what params say
def _train(tiny_run, tmp_path, name, monkeypatch=None, **supernet):
    from tailor import supernet_training

    p = tiny_params(supernet={"phases": [{"name": "all", "epochs": 1, "lr": 0.05, "kernels": [3, 5, 7],
                                          "depths": [2, 3, 4], "expands": [3, 4, 6]}], **supernet})
    m = supernet_training.train_supernet(p, tiny_run["data"], tiny_run["teacher"], tmp_path / f"{name}.pt",
                                         tmp_path / f"{name}.json", tmp_path / f"w{name}")
    return m, torch.load(tmp_path / f"{name}.pt", weights_only=True)["state_dict"]


def _differ(a, b) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_superclass_dropout_is_applied_in_training(tiny_run, tmp_path, monkeypatch):
    from tailor import supernet_training

    seen = []
    real = supernet_training.masked_cross_entropy

    def ce(logits, y, keep, smoothing=0.0):
        seen.append(keep.clone())
        return real(logits, y, keep, smoothing)

    monkeypatch.setattr(supernet_training, "masked_cross_entropy", ce)
    _, with_q = _train(tiny_run, tmp_path, "q", superclass_dropout=0.9)
    dropped = 1 - torch.cat(seen).float().mean().item()
    # 3 superclasses of 2 classes: each sample drops the 4 other classes with probability 0.9.
    assert abs(dropped - 0.9 * 4 / 6) < 0.08
    monkeypatch.undo()
    _, without = _train(tiny_run, tmp_path, "q0", superclass_dropout=0.0)
    assert _differ(with_q, without)


def test_teacher_distillation_is_in_the_loss(tiny_run, tmp_path):
    m1, kd1 = _train(tiny_run, tmp_path, "kd1", kd_weight=1.0)
    _, kd0 = _train(tiny_run, tmp_path, "kd0", kd_weight=0.0)
    assert all(h["kd"] > 0 for h in m1["history"])
    assert _differ(kd1, kd0), "kd_weight changed nothing: the KD term is not in the loss"

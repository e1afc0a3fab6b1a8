"""SCARLET's constrained, weighted NSGA-II on a fake setup: no supernet, accuracy from a function of
the architecture, costs from the tiny space's real MAdds and parameter tables."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT, TINY

from tailor.config import NSGA2Config, SpaceConfig, deep_merge
from tailor.cost import madds_cost_model
from tailor.search import nsga2 as nsga2_mod
from tailor.search.common import Scenario, Snapper, params_cost_model
from tailor.search.nsga2 import Individuals, dominates, hierarchical_mutate, non_dominated_sort, nsga2, run_nsga2
from tailor.space import SearchSpace

NUM_CLASSES = 6


@pytest.fixture(scope="module")
def raw():
    """params.yaml + tests/tiny.yaml as a dict: only the sections used here are validated, so these
    tests do not depend on the rest of params being in step with tailor.config."""
    return deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(TINY.read_text()))


@pytest.fixture(scope="module")
def setup(raw):
    space = SearchSpace(SpaceConfig.model_validate(raw["space"]), raw["data"]["image_size"])
    cost = madds_cost_model(space, NUM_CLASSES)
    return SimpleNamespace(space=space, cost=cost, params_model=params_cost_model(space, NUM_CLASSES),
                           snap=Snapper(space, cost, 0.05), scenarios=[])


def config(raw, **kw) -> NSGA2Config:
    return NSGA2Config.model_validate({**raw["search"]["nsga2"], **kw})


class Recorder:
    """A fake fitness: accuracy rising with cost (so the search is pulled towards the budget), and a
    record of every architecture it was asked to score."""

    def __init__(self, setup):
        self.cost, self.calls = setup.cost, []
        self.low, self.high = setup.cost.low_high

    def __call__(self, archs):
        self.calls += archs
        return [0.3 + 0.6 * (self.cost.cost(a) - self.low) / (self.high - self.low) for a in archs]


class Table:
    """A cost model from a dict: objectives set by hand."""

    def __init__(self, values: dict, low_high=(0.0, 100.0)):
        self.values, self.low_high = values, low_high

    def cost(self, arch):
        return self.values[arch]


def distinct_archs(space, n, seed=0):
    rng, out = random.Random(seed), []
    while len(out) < n:
        a = space.sample(rng)
        if a not in out:
            out.append(a)
    return out


def hand_set(space, accs, costs, params, budget_max=100.0, acc_min=0.0):
    """Individuals over len(accs) architectures whose accuracy, cost and params are given."""
    archs = distinct_archs(space, len(accs))
    fake = SimpleNamespace(cost=Table(dict(zip(archs, costs))), params_model=Table(dict(zip(archs, params))))
    calls = []

    def acc_fn(batch):
        calls.extend(batch)
        return [accs[archs.index(a)] for a in batch]

    ind = Individuals(fake, acc_fn, budget_max, acc_min)
    ind.add(archs)
    return archs, ind, calls


# ---------------------------------------------------------------- objectives and constraints
def test_defaults_are_scarlets(raw):
    cfg = NSGA2Config.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text())["search"]["nsga2"])
    assert cfg.weights == [0.4, 0.4, 0.2] and cfg.acc_min == 0.4
    with pytest.raises(ValueError):
        config(raw, weights=[0.4, -0.4, 0.2])


def test_objective_signs_maximise_params(setup):
    # (accuracy, cost, params): 0 vs 1 differ in params only, 2 vs 3 in cost only, 4 vs 5 in accuracy only
    accs = [0.5, 0.5, 0.6, 0.6, 0.8, 0.7]
    costs = [10.0, 10.0, 20.0, 30.0, 40.0, 40.0]
    params = [5.0, 9.0, 7.0, 7.0, 3.0, 3.0]
    archs, ind, _ = hand_set(setup.space, accs, costs, params)
    o = [ind.obj[a] for a in archs]
    assert dominates(o[1], o[0]) and not dominates(o[0], o[1])  # more parameters is better
    assert dominates(o[2], o[3]) and not dominates(o[3], o[2])  # lower cost is better
    assert dominates(o[4], o[5]) and not dominates(o[5], o[4])  # higher accuracy is better
    for better, worse in ((1, 0), (2, 3), (4, 5)):
        fronts = non_dominated_sort([o[better], o[worse]], [0.0, 0.0])
        assert fronts == [[0], [1]]


def test_budget_is_checked_before_accuracy_then_acc_min(setup):
    # 0: over budget (and objective-wise incomparable with 1: dearer but bigger);
    # 1: within budget, below acc_min; 2: feasible.
    archs, ind, calls = hand_set(setup.space, [0.9, 0.2, 0.5], [120.0, 50.0, 60.0], [9.0, 1.0, 2.0],
                                 budget_max=100.0, acc_min=0.4)
    over, weak, ok = archs
    assert over not in calls and over not in ind.acc and sorted(map(str, calls)) == sorted(map(str, (weak, ok)))
    assert ind.viol[ok] == 0 < ind.viol[weak] < ind.viol[over]
    assert non_dominated_sort([ind.obj[a] for a in archs], [ind.viol[a] for a in archs]) == [[2], [1], [0]]


# ---------------------------------------------------------------- the run
def test_over_budget_children_are_discarded(setup, raw, monkeypatch):
    low, high = setup.cost.low_high
    bmax = low + 0.15 * (high - low)
    pops = []
    real_select = nsga2_mod.select

    def recording_select(*args, **kw):
        out = real_select(*args, **kw)
        pops.append(out[0])
        return out

    monkeypatch.setattr(nsga2_mod, "select", recording_select)
    fit = Recorder(setup)
    pop, ind = nsga2(setup, fit, bmax, config(raw, population=8, generations=6, mutate_prob=0.3),
                     random.Random(0))
    assert len(pops) == 7 and all(len(p) == 8 for p in pops)
    assert all(setup.cost.cost(a) <= bmax for p in pops for a in p)
    # nothing over budget was even kept as an infeasible individual, let alone scored
    assert all(setup.cost.cost(a) <= bmax for a in ind.obj) and all(setup.cost.cost(a) <= bmax for a in fit.calls)
    assert ind.discarded > 0


def test_children_come_from_hierarchical_mutation(setup, raw, monkeypatch):
    used = []
    real = nsga2_mod.hierarchical_mutate

    def counting(*args):
        used.append(args[1])
        return real(*args)

    monkeypatch.setattr(nsga2_mod, "hierarchical_mutate", counting)
    low, high = setup.cost.low_high
    nsga2(setup, Recorder(setup), low + 0.5 * (high - low), config(raw, population=6, generations=2), random.Random(1))
    assert len(used) >= 2 * 6


@pytest.mark.parametrize("cap", [5, 13])
def test_evaluation_cap(setup, raw, cap):
    low, high = setup.cost.low_high
    fit = Recorder(setup)
    pop, ind = nsga2(setup, fit, low + 0.5 * (high - low), config(raw, population=8, generations=6),
                     random.Random(2), max_scored=cap)
    assert ind.scored == len(fit.calls) == len(set(fit.calls)) == cap  # the cap is spent, never passed
    assert pop and all(a in ind.acc for a in pop)


def test_run_nsga2_caps_each_superclass_and_reports_discards(setup, raw):
    low, high = setup.cost.low_high
    budgets = [low + f * (high - low) for f in (0.1, 0.2)]
    sc = SimpleNamespace(**vars(setup))
    sc.scenarios = [Scenario(name, i, b, b) for i, name in enumerate(("sc0", "sc1")) for b in budgets]
    calls = {}

    def acc_fn_for(i):
        calls[i] = Recorder(setup)
        return calls[i]

    cap = 10
    picks, fronts, timing = run_nsga2(sc, acc_fn_for, config(raw, population=8, generations=6), seed=0,
                                      max_scored_per_superclass=cap)
    assert all(len(r.calls) <= cap for r in calls.values()) and timing["scored"] <= 2 * cap
    assert timing["discarded"] > 0 and timing["max_scored_per_superclass"] == cap
    for s in sc.scenarios:
        assert setup.cost.cost(picks[s.key][0]) <= s.budget
    assert all(r["params"] > 0 and r["cost"] <= budgets[-1] for f in fronts.values() for r in f)


# ---------------------------------------------------------------- hierarchical mutation
def test_hierarchical_mutation(setup):
    space, rng = setup.space, random.Random(3)
    for a in distinct_archs(space, 50, seed=4):
        assert hierarchical_mutate(space, a, rng, 0.0) == a
        child = hierarchical_mutate(space, a, rng, 1.0)
        space.validate(child)
        # the unit-level decision comes first: with prob 1 every unit changes its depth
        assert all(len(u) != len(v) for u, v in zip(a.units, child.units))
        space.validate(hierarchical_mutate(space, a, rng, 0.3))

"""EAT-NAS transfer in the OFA evolution: the seeded first population, the population-quality curve,
seeded against unseeded at equal evaluations, determinism. No supernet: a synthetic fitness."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from conftest import arch_changes, tiny_params

from tailor.cost import madds_cost_model
from tailor.search.common import Scenario, Snapper
from tailor.search.evolution import evolve, run_ofa_t, run_ofa_v, transfer_compare
from tailor.space import Arch, SearchSpace

NUM_CLASSES = 6  # tests/tiny.yaml: 3 superclasses x 2 classes


@pytest.fixture(scope="module")
def space():
    return SearchSpace(tiny_params().space, 16)


@pytest.fixture(scope="module")
def cost(space):
    return madds_cost_model(space, NUM_CLASSES)


@pytest.fixture(scope="module")
def snap(space, cost):
    return Snapper(space, cost, 0.05)


def config(**kw):
    base = dict(population=16, generations=6, seed_fraction=1.0, transfer_budgets=True)
    return tiny_params().search.evolution.model_copy(update={**base, **kw})


def at(cost, frac: float) -> float:
    low, high = cost.low_high
    return low + frac * (high - low)


class Distance:
    """Synthetic fitness: minus the L1 distance of the encoding to a hidden target; records every call."""

    def __init__(self, space: SearchSpace, target: Arch, on_call=None):
        self.space, self.target = space, space.encode(target)
        self.calls: list[list[Arch]] = []
        self.on_call = on_call

    def __call__(self, archs: list[Arch]) -> list[float]:
        self.calls.append(list(archs))
        if self.on_call:
            self.on_call()
        return [-sum(abs(x - y) for x, y in zip(self.space.encode(a), self.target)) for a in archs]


class RecordingSnap:
    def __init__(self, snap: Snapper):
        self.snap, self.outputs = snap, []

    def __call__(self, arch: Arch, budget: float) -> Arch:
        self.outputs.append(self.snap(arch, budget))
        return self.outputs[-1]


def basic_and_target(space, cost, snap, budget, seed=0):
    """A basic arch in the budget's window (so some perturbations pass the budget) and an optimum near it."""
    from tailor.search.common import perturb

    rng = random.Random(seed)
    basic = snap(space.sample(rng), budget)
    target = perturb(space, basic, rng)
    return basic, (target if cost.cost(target) <= budget else snap(target, budget))


# ---------------------------------------------------------------- 1. the seeded first population
def test_full_seeding_is_distinct_perturbations_within_budget(space, cost, snap):
    budget = at(cost, 0.4)
    basic, target = basic_and_target(space, cost, snap, budget)
    cfg = config()
    rec = RecordingSnap(snap)
    snapped_before_first_call = []
    fit = Distance(space, target, on_call=lambda: snapped_before_first_call.append(len(rec.outputs)))
    _, _, curve = evolve(space, cost, rec, budget, fit, cfg, random.Random(0), basic)
    first, snapped = fit.calls[0], rec.outputs[:snapped_before_first_call[0]]
    assert len(first) == cfg.population and len(set(first)) == cfg.population
    assert (curve["seeded"], curve["random"], curve["seed_fallback"]) == (cfg.population, 0, 0)
    kinds = set()
    for a in first:
        space.validate(a)
        assert cost.cost(a) <= budget
        if arch_changes(basic, a) == [1] * space.n_units:
            kinds.add("perturbed")
        else:
            assert a in snapped, a
            kinds.add("snapped")
    assert kinds == {"perturbed", "snapped"}  # the case exercises both branches


def test_repeating_perturbations_fall_back_to_samples_and_are_counted(space, cost, snap):
    """At the cheapest budget every perturbation of the cheapest arch snaps back to one arch."""
    budget = cost.low_high[0]
    cfg = config(population=8, generations=1)
    fit = Distance(space, space.min_arch)
    _, _, curve = evolve(space, cost, snap, budget, fit, cfg, random.Random(0), space.min_arch)
    assert (curve["seeded"], curve["random"], curve["seed_fallback"]) == (1, 7, 7)
    assert len(fit.calls[0]) == cfg.population
    assert all(cost.cost(a) <= budget for a in fit.calls[0])


# ---------------------------------------------------------------- 2. the population-quality curve
@pytest.mark.parametrize("seeded", [True, False])
def test_curve_is_mean_and_best_of_each_generation(space, cost, snap, seeded):
    budget = at(cost, 0.5)
    basic, _ = basic_and_target(space, cost, snap, budget, seed=1)
    target = snap(space.sample(random.Random(7)), budget)  # away from basic: the search must move
    cfg = config()
    fit = Distance(space, target)
    arch, best_fit, curve = evolve(space, cost, snap, budget, fit, cfg, random.Random(3), basic if seeded else None)
    n = cfg.generations + 1
    assert len(fit.calls) == n and len(curve["best"]) == n and len(curve["mean"]) == n
    pops = list(fit.calls)
    scores = [fit(pop) for pop in pops]
    assert curve["best"] == [round(max(s), 5) for s in scores]
    assert curve["mean"] == [round(sum(s) / len(s), 5) for s in scores]
    assert all(b >= m for b, m in zip(curve["best"], curve["mean"]))
    assert all(x <= y for x, y in zip(curve["best"], curve["best"][1:]))
    n_parents = max(1, round(cfg.parent_ratio * cfg.population))
    for pop, score, after in zip(pops, scores, pops[1:]):  # the elites survive
        assert all(pop[i] in after for i in sorted(range(len(pop)), key=lambda i: -score[i])[:n_parents])
    assert curve["best"][-1] > curve["best"][0]  # and the search improves on a moving target
    assert curve["fitness_evaluations"] == cfg.population * n
    assert round(best_fit, 5) == curve["best"][-1] and cost.cost(arch) <= budget


# ---------------------------------------------------------------- 3. seeded vs unseeded, equal evaluations
def test_seeding_near_the_optimum_raises_the_first_population_at_equal_evaluations(space, cost, snap):
    budget = at(cost, 0.4)
    basic, target = basic_and_target(space, cost, snap, budget, seed=2)
    cfg = config()
    fit = Distance(space, target)
    out = transfer_compare(space, cost, snap, budget, fit, cfg, 0, basic)
    seeded, unseeded = out["seeded"]["curve"], out["unseeded"]["curve"]
    assert seeded["seeded"] == cfg.population and unseeded["seeded"] == 0
    assert seeded["mean"][0] > unseeded["mean"][0]
    # Counted at the fitness function: the same calls and architectures scored in both runs.
    n = cfg.generations + 1
    assert len(fit.calls) == 2 * n
    spent = [sum(len(c) for c in fit.calls[:n]), sum(len(c) for c in fit.calls[n:])]
    assert spent[0] == spent[1] == seeded["fitness_evaluations"] == unseeded["fitness_evaluations"]
    assert out["basic"] == str(basic) and Arch.parse(out["seeded"]["arch"])
    with pytest.raises(ValueError, match="seed_fraction"):
        transfer_compare(space, cost, snap, budget, fit, config(seed_fraction=0.0), 0, basic)


# ---------------------------------------------------------------- 4. determinism
def test_same_seed_same_curves(space, cost, snap):
    budget = at(cost, 0.4)
    basic, target = basic_and_target(space, cost, snap, budget, seed=3)
    cfg = config()
    runs = [transfer_compare(space, cost, snap, budget, Distance(space, target), cfg, s, basic) for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0]["seeded"]["curve"] != runs[2]["seeded"]["curve"]  # the seed does reach the search


# ---------------------------------------------------------------- the OFA variants
class FakePredictor:
    """Per superclass, minus the distance to its own target; records the calls per superclass."""

    def __init__(self, space, targets):
        self.fits = [Distance(space, t) for t in targets]

    def __call__(self, archs, sc):
        return self.fits[sc](archs)

    def mean_over(self, archs, scs):
        per = [self(archs, s) for s in scs]
        return [sum(v) / len(v) for v in zip(*per)]


def test_ofa_variants_seed_each_budget_from_the_previous_result(space, cost, snap):
    budgets = [at(cost, 0.3), at(cost, 0.6)]
    rng = random.Random(11)
    targets = [snap(space.sample(rng), budgets[1]) for _ in range(2)]
    setup = SimpleNamespace(space=space, cost=cost, snap=snap, grid_scs=[0, 1],
                            scenarios=[Scenario(n, i, b, b) for i, n in enumerate(["sc0", "sc1"]) for b in budgets])
    cfg = config(population=8, generations=2)
    n = cfg.generations + 1
    pred = FakePredictor(space, targets)
    picks, timing = run_ofa_t(setup, pred, cfg, 0)
    assert set(picks) == {s.key for s in setup.scenarios} and "evolution_s" in timing
    for s in setup.scenarios:
        arch, fitness, curve = picks[s.key]
        assert isinstance(arch, Arch) and isinstance(fitness, float) and cost.cost(arch) <= s.budget
        assert len(curve["best"]) == len(curve["mean"]) == n
    for sc, name in enumerate(["sc0", "sc1"]):
        calls = pred.fits[sc].calls
        assert len(calls) == 2 * n
        first = picks[f"{name}@{budgets[0]:.12g}"]
        assert first[2]["seeded"] == 0  # no seed_arch: the first budget starts from samples
        basic = first[0]
        assert picks[f"{name}@{budgets[1]:.12g}"][2]["seeded"] == cfg.population
        for a in calls[n]:  # the second budget's first population
            assert arch_changes(basic, a) == [1] * space.n_units or cost.cost(a) >= 0.95 * budgets[1] * (1 - 1e-9)

    picks_v, _ = run_ofa_v(setup, FakePredictor(space, targets), cfg, 0, seed_arch=targets[0])
    by_budget = {b: {str(picks_v[s.key][0]) for s in setup.scenarios if s.budget == b} for b in budgets}
    assert all(len(v) == 1 for v in by_budget.values())
    assert all(picks_v[s.key][2]["seeded"] == cfg.population for s in setup.scenarios)
    assert run_ofa_v(setup, FakePredictor(space, targets), cfg, 0, seed_arch=targets[0])[0] == picks_v

"""SCARLET-NAS's constrained, weighted NSGA-II over (accuracy, cost, parameters).

Objectives are minimised as (-accuracy, cost, params). Constraints are checked cheapest first:
the budget (a table lookup) before accuracy, so an over-budget architecture is never scored; then
acc_min. Constrained domination (Deb): a feasible individual beats an infeasible one, two
infeasible ones compare by violation (any budget violation is worse than any accuracy shortfall),
two feasible ones by Pareto dominance. The crowding distance weights each objective's spread, so
the front is kept densest along accuracy when its weight is largest.

One run per superclass, constrained by the largest budget of its scenarios. SCARLET takes K
points equispaced in cost along the final front; here the K targets are the scenario budgets
(equispaced on the cost range by default) and each takes the most accurate front member within
it, snapped into the budget window like every other method's result.
"""
from __future__ import annotations

import math
import random
import time

from tailor.config import NSGA2Config
from tailor.search.common import Setup, crossover, mutate, sample_within, seeded_population
from tailor.space import Arch
from tailor.utils import fingerprint


def dominates(a: tuple, b: tuple) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def constrained_dominates(oa: tuple, va: float, ob: tuple, vb: float) -> bool:
    if va == 0 and vb > 0:
        return True
    if va > 0 and vb > 0:
        return va < vb
    return va == 0 and vb == 0 and dominates(oa, ob)


def non_dominated_sort(objs: list[tuple], viol: list[float]) -> list[list[int]]:
    """Fronts (lists of indices), best first, under constrained domination."""
    n = len(objs)
    beaten_by = [[] for _ in range(n)]
    count = [0] * n
    for i in range(n):
        for j in range(i + 1, n):
            if constrained_dominates(objs[i], viol[i], objs[j], viol[j]):
                beaten_by[i].append(j)
                count[j] += 1
            elif constrained_dominates(objs[j], viol[j], objs[i], viol[i]):
                beaten_by[j].append(i)
                count[i] += 1
    fronts, cur = [], [i for i in range(n) if count[i] == 0]
    while cur:
        fronts.append(cur)
        nxt = []
        for i in cur:
            for j in beaten_by[i]:
                count[j] -= 1
                if count[j] == 0:
                    nxt.append(j)
        cur = nxt
    return fronts


def weighted_crowding(front: list[int], objs: list[tuple], weights: list[float]) -> dict[int, float]:
    """Crowding distance with each objective's normalised gap scaled by its weight; the ends of every
    weighted objective are infinite (always kept)."""
    dist = dict.fromkeys(front, 0.0)
    if len(front) <= 2:
        return dict.fromkeys(front, math.inf)
    for m, w in enumerate(weights):
        if w <= 0:  # an objective weighted out neither spreads the front nor protects its extremes
            continue
        order = sorted(front, key=lambda i: objs[i][m])
        lo, hi = objs[order[0]][m], objs[order[-1]][m]
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi == lo:
            continue
        for a, i, b in zip(order, order[1:], order[2:]):
            dist[i] += w * (objs[b][m] - objs[a][m]) / (hi - lo)
    return dist


class Individuals:
    """Objectives and violations of architectures, computed once each (budget before accuracy)."""

    def __init__(self, setup: Setup, acc_fn, budget_max: float, acc_min: float):
        self.setup, self.acc_fn, self.budget_max, self.acc_min = setup, acc_fn, budget_max, acc_min
        low, high = setup.cost.low_high
        self.range = high - low
        self.obj: dict[Arch, tuple] = {}
        self.viol: dict[Arch, float] = {}
        self.acc: dict[Arch, float] = {}
        self.scored = 0

    def add(self, archs: list[Arch]) -> None:
        new = [a for a in dict.fromkeys(archs) if a not in self.obj]
        fits = []
        for a in new:
            c = self.setup.cost.cost(a)
            if c > self.budget_max:
                # Budget checked first: an over-budget architecture is never scored.
                self.viol[a] = 1.0 + (c - self.budget_max) / self.range
                self.obj[a] = (0.0, c, self.setup.params_model.cost(a))
            else:
                fits.append(a)
        if fits:
            accs = self.acc_fn(fits)
            self.scored += len(fits)
            for a, acc in zip(fits, accs):
                self.acc[a] = acc
                self.viol[a] = max(0.0, self.acc_min - acc)
                self.obj[a] = (-acc, self.setup.cost.cost(a), self.setup.params_model.cost(a))


def select(pop: list[Arch], ind: Individuals, n: int, weights: list[float]) -> tuple[list[Arch], dict, dict]:
    """Environmental selection: whole fronts, the last one cut by weighted crowding distance."""
    objs = [ind.obj[a] for a in pop]
    fronts = non_dominated_sort(objs, [ind.viol[a] for a in pop])
    keep, rank, crowd = [], {}, {}
    for r, front in enumerate(fronts):
        d = weighted_crowding(front, objs, weights)
        for i in front:
            rank[pop[i]], crowd[pop[i]] = r, d[i]
        if len(keep) + len(front) <= n:
            keep += front
        else:
            keep += sorted(front, key=lambda i: -d[i])[:n - len(keep)]
            break
    return [pop[i] for i in keep], rank, crowd


def nsga2(setup: Setup, acc_fn, budget_max: float, cfg: NSGA2Config, rng: random.Random,
          seed_arch: Arch | None = None) -> tuple[list[Arch], Individuals]:
    """The final population (front members first) and everything scored on the way."""
    space, cost, snap = setup.space, setup.cost, setup.snap
    ind = Individuals(setup, acc_fn, budget_max, cfg.acc_min)
    n_seed = int(round(cfg.seed_fraction * cfg.population)) if seed_arch is not None else 0
    pop = seeded_population(space, seed_arch, n_seed, budget_max, cost, snap, rng)
    seen = set(pop)
    for _ in range(20 * cfg.population):
        if len(pop) >= cfg.population:
            break
        a = sample_within(space, cost, snap, budget_max, rng, cfg.max_tries)
        if a not in seen:
            seen.add(a)
            pop.append(a)
    ind.add(pop)
    pop, rank, crowd = select(pop, ind, cfg.population, cfg.weights)

    def tournament() -> Arch:
        a, b = rng.choice(pop), rng.choice(pop)
        return a if (rank[a], -crowd[a]) <= (rank[b], -crowd[b]) else b

    for _ in range(cfg.generations):
        children = [mutate(space, crossover(tournament(), tournament(), rng), rng, cfg.mutate_prob)
                    for _ in range(cfg.population)]
        ind.add(children)
        pop, rank, crowd = select(list(dict.fromkeys(pop + children)), ind, cfg.population, cfg.weights)
    pop.sort(key=lambda a: (rank[a], ind.obj[a][1]))
    return pop, ind


def pick_for_budgets(pop: list[Arch], ind: Individuals, budgets: list[float]) -> dict[float, Arch | None]:
    """Per budget, the most accurate feasible front member within it (else any feasible population member)."""
    feasible = [a for a in pop if ind.viol[a] == 0]
    fronts = non_dominated_sort([ind.obj[a] for a in feasible], [0.0] * len(feasible))
    first = [feasible[i] for i in fronts[0]] if fronts else []
    out: dict[float, Arch | None] = {}
    for b in budgets:
        out[b] = None
        for group in (first, feasible):
            fit = [a for a in group if ind.obj[a][1] <= b]
            if fit:
                out[b] = max(fit, key=lambda a: (ind.acc[a], -ind.obj[a][1]))
                break
    return out


def run_nsga2(setup: Setup, acc_fn_for, cfg: NSGA2Config, seed: int,
              seed_arch: Arch | None = None) -> tuple[dict, dict, dict]:
    """One NSGA-II per superclass; returns ({scenario key: (arch, fitness accuracy)}, fronts, timing).

    `acc_fn_for(superclass index)` gives the accuracy function for that superclass.
    """
    by_sc: dict[str, list] = {}
    for s in setup.scenarios:
        by_sc.setdefault(s.superclass, []).append(s)
    picks, fronts, scored = {}, {}, 0
    t0 = time.perf_counter()
    for name, scs in by_sc.items():
        rng = random.Random(fingerprint("nsga2", seed, name))
        bmax = max(s.budget for s in scs)
        pop, ind = nsga2(setup, acc_fn_for(scs[0].sc), bmax, cfg, rng, seed_arch)
        scored += ind.scored
        chosen = pick_for_budgets(pop, ind, [s.budget for s in scs])
        for s in scs:
            a = chosen[s.budget]
            if a is None:  # nothing feasible fits this budget: fall back to a random fitting arch
                a = sample_within(setup.space, setup.cost, setup.snap, s.budget, rng, cfg.max_tries)
                ind.add([a])
            picks[s.key] = (a, ind.acc.get(a))
        first = non_dominated_sort([ind.obj[a] for a in pop], [ind.viol[a] for a in pop])[0]
        fronts[name] = sorted(({"arch": str(pop[i]), "acc": ind.acc.get(pop[i]),
                                "cost": ind.obj[pop[i]][1], "params": int(ind.obj[pop[i]][2])} for i in first),
                              key=lambda r: r["cost"])
    return picks, fronts, {"search_s": round(time.perf_counter() - t0, 3), "scored": scored}

"""SCARLET-NAS's constrained, weighted NSGA-II over (accuracy, cost, parameters) (SCARLET Eq. 4).

SCARLET maximises accuracy, minimises cost (MAdds, or whatever unit the budgets are in) and
*maximises* parameters: at a fixed cost, more parameters is more capacity, which the supernet's
accuracy estimate under-credits. Objectives are kept as minimised tuples (-accuracy, cost, -params).

Constraints are checked cheapest first: the budget (a table lookup) before accuracy, so an
over-budget architecture is never scored; then acc_min. Children that exceed the budget are
redrawn and, if still over, dropped rather than snapped: snapping would make the children whatever
the snapper prefers, not what crossover and mutation proposed, and keeping them as infeasible
individuals would spend population slots on architectures no scenario can use. Constrained
domination (Deb) still orders the rest: a feasible individual beats an infeasible one, two
infeasible ones compare by violation (any budget violation is worse than any accuracy shortfall),
two feasible ones by Pareto dominance. The crowding distance weights each objective's spread
(SCARLET: 0.4 accuracy, 0.4 cost, 0.2 params), so the front stays densest where it matters most.

Mutation is hierarchical, as SCARLET's: whether a unit changes its depth is decided before its
blocks' kernels and expands, so a depth change is not drowned out by the many block-level draws.

With supernet fitness every scored architecture costs a BN recalibration and a validation pass,
so the run takes an evaluation cap (`max_scored`) to be compared with the other methods at equal
search cost; the last generation is cut short rather than exceeding it.

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
from tailor.search.common import Setup, crossover, sample_within, seeded_population
from tailor.space import Arch, SearchSpace
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


def hierarchical_mutate(space: SearchSpace, arch: Arch, rng: random.Random, prob: float) -> Arch:
    """SCARLET's mutation: per unit, first whether its depth changes (to another allowed depth), then
    per kept block whether its kernel and its expand are resampled, each with `prob`."""
    c = space.cfg
    units = []
    for unit in arch.units:
        blocks = [list(b) for b in unit]
        kept = len(blocks)
        if len(c.depths) > 1 and rng.random() < prob:
            d = rng.choice([x for x in c.depths if x != len(blocks)])
            kept = min(kept, d)
            # Blocks a deeper unit gains are drawn fresh, so block-level mutation would add nothing.
            blocks = blocks[:d] + [[rng.choice(c.kernels), rng.choice(c.expands)] for _ in range(d - len(blocks))]
        for b in blocks[:kept]:
            if rng.random() < prob:
                b[0] = rng.choice(c.kernels)
            if rng.random() < prob:
                b[1] = rng.choice(c.expands)
        units.append(tuple(tuple(b) for b in blocks))
    return Arch(tuple(units))


class Individuals:
    """Objectives and violations of architectures, computed once each (budget before accuracy), and
    the run's bookkeeping: evaluations spent (`scored`, against `max_scored`) and over-budget
    children thrown away (`discarded`)."""

    def __init__(self, setup: Setup, acc_fn, budget_max: float, acc_min: float, max_scored: int | None = None):
        self.setup, self.acc_fn, self.budget_max, self.acc_min = setup, acc_fn, budget_max, acc_min
        low, high = setup.cost.low_high
        self.range = high - low
        self.obj: dict[Arch, tuple] = {}
        self.viol: dict[Arch, float] = {}
        self.acc: dict[Arch, float] = {}
        self.scored = 0
        self.max_scored = max_scored
        self.discarded = 0

    @property
    def room(self) -> float:
        """Evaluations the cap still allows."""
        return math.inf if self.max_scored is None else max(0, self.max_scored - self.scored)

    def within_cap(self, archs: list[Arch]) -> list[Arch]:
        """`archs` less the new ones that would score past the cap (already known ones cost nothing)."""
        if self.max_scored is None:
            return archs
        out, new = [], set()
        for a in archs:
            if a not in self.obj and a not in new and self.setup.cost.cost(a) <= self.budget_max:
                if len(new) >= self.room:
                    continue
                new.add(a)
            out.append(a)
        return out

    def add(self, archs: list[Arch]) -> None:
        new = [a for a in dict.fromkeys(archs) if a not in self.obj]
        fits = []
        for a in new:
            c = self.setup.cost.cost(a)
            if c > self.budget_max:
                # Budget checked first: an over-budget architecture is never scored.
                self.viol[a] = 1.0 + (c - self.budget_max) / self.range
                self.obj[a] = (0.0, c, -self.setup.params_model.cost(a))
            else:
                fits.append(a)
        if fits:
            accs = self.acc_fn(fits)
            self.scored += len(fits)
            for a, acc in zip(fits, accs):
                self.acc[a] = acc
                self.viol[a] = max(0.0, self.acc_min - acc)
                self.obj[a] = (-acc, self.setup.cost.cost(a), -self.setup.params_model.cost(a))


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
          seed_arch: Arch | None = None, max_scored: int | None = None) -> tuple[list[Arch], Individuals]:
    """The final population (front members first) and everything scored on the way.

    At most `max_scored` architectures are passed to `acc_fn` (None: no cap).
    """
    space, cost, snap = setup.space, setup.cost, setup.snap
    ind = Individuals(setup, acc_fn, budget_max, cfg.acc_min, max_scored)
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
    pop = ind.within_cap(pop)
    ind.add(pop)
    pop, rank, crowd = select(pop, ind, cfg.population, cfg.weights)
    if not pop:
        return pop, ind

    def tournament() -> Arch:
        a, b = rng.choice(pop), rng.choice(pop)
        return a if (rank[a], -crowd[a]) <= (rank[b], -crowd[b]) else b

    def child() -> Arch | None:
        """Crossover then hierarchical mutation, redrawn while over budget; None if every draw was."""
        for _ in range(cfg.max_tries):
            a = hierarchical_mutate(space, crossover(tournament(), tournament(), rng), rng, cfg.mutate_prob)
            if cost.cost(a) <= budget_max:
                return a
            ind.discarded += 1
        return None

    for _ in range(cfg.generations):
        if ind.room <= 0:
            break
        children = ind.within_cap([a for a in (child() for _ in range(cfg.population)) if a is not None])
        ind.add(children)
        pop, rank, crowd = select(list(dict.fromkeys(pop + children)), ind, cfg.population, cfg.weights)
    pop.sort(key=lambda a: (rank[a], ind.obj[a][1]))
    return pop, ind


def pick_for_budgets(pop: list[Arch], ind: Individuals, budgets: list[float]) -> dict[float, Arch | None]:
    """Per budget, the most accurate feasible front member within it, else any feasible population
    member, else (nothing reached acc_min) the most accurate scored member within it."""
    feasible = [a for a in pop if ind.viol[a] == 0]
    fronts = non_dominated_sort([ind.obj[a] for a in feasible], [0.0] * len(feasible))
    first = [feasible[i] for i in fronts[0]] if fronts else []
    scored = [a for a in pop if a in ind.acc]
    out: dict[float, Arch | None] = {}
    for b in budgets:
        out[b] = None
        for group in (first, feasible, scored):
            fit = [a for a in group if ind.obj[a][1] <= b]
            if fit:
                out[b] = max(fit, key=lambda a: (ind.acc[a], -ind.obj[a][1]))
                break
    return out


def run_nsga2(setup: Setup, acc_fn_for, cfg: NSGA2Config, seed: int, seed_arch: Arch | None = None,
              max_scored_per_superclass: int | None = None) -> tuple[dict, dict, dict]:
    """One NSGA-II per superclass; returns ({scenario key: (arch, fitness accuracy)}, fronts, timing).

    `acc_fn_for(superclass index)` gives the accuracy function for that superclass; each
    superclass's run scores at most `max_scored_per_superclass` architectures (None: no cap).
    timing["discarded"] counts the over-budget children thrown away unscored.
    """
    by_sc: dict[str, list] = {}
    for s in setup.scenarios:
        by_sc.setdefault(s.superclass, []).append(s)
    picks, fronts, scored, discarded = {}, {}, 0, 0
    t0 = time.perf_counter()
    for name, scs in by_sc.items():
        rng = random.Random(fingerprint("nsga2", seed, name))
        bmax = max(s.budget for s in scs)
        pop, ind = nsga2(setup, acc_fn_for(scs[0].sc), bmax, cfg, rng, seed_arch, max_scored_per_superclass)
        chosen = pick_for_budgets(pop, ind, [s.budget for s in scs])
        for s in scs:
            a = chosen[s.budget]
            if a is None:  # nothing scored fits this budget: fall back to a random fitting arch
                a = sample_within(setup.space, setup.cost, setup.snap, s.budget, rng, cfg.max_tries)
                ind.add(ind.within_cap([a]))  # past the cap it is reported without a fitness accuracy
            picks[s.key] = (a, ind.acc.get(a))
        scored += ind.scored
        discarded += ind.discarded
        first = (non_dominated_sort([ind.obj[a] for a in pop], [ind.viol[a] for a in pop]) or [[]])[0]
        fronts[name] = sorted(({"arch": str(pop[i]), "acc": ind.acc.get(pop[i]), "cost": ind.obj[pop[i]][1],
                                "params": int(round(setup.params_model.cost(pop[i])))} for i in first),
                              key=lambda r: r["cost"])
    return picks, fronts, {"search_s": round(time.perf_counter() - t0, 3), "scored": scored, "discarded": discarded,
                           "max_scored_per_superclass": max_scored_per_superclass}

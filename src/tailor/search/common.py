"""What every search method shares: scenarios, cost models, budget snapping, architecture
operators, and the supernet validation accuracy that all methods are judged by.

A scenario is (superclass, budget). Every method returns one architecture per scenario, snapped
into the window [(1 - slack) B, B] so that methods are compared at matched budgets (a method must
not win by spending less or more than the budget allows).
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tailor.config import Params, SearchBudgets, SearchCost
from tailor.cost import SlotCostModel, madds_cost_model
from tailor.space import Arch, SearchSpace


class SearchError(ValueError):
    """A scenario cannot be searched (budget outside the space's range, unknown superclass, ...)."""


# ---------------------------------------------------------------- cost models
def make_cost_model(cfg: SearchCost, space: SearchSpace, num_classes: int) -> SlotCostModel:
    """The model budgets are measured in: analytic MAdds, or a profiled latency table (ms)."""
    if cfg.kind == "madds":
        return madds_cost_model(space, num_classes)
    from tailor.latency import load_latency_model

    return load_latency_model(cfg.lut, space, num_classes)


def params_cost_model(space: SearchSpace, num_classes: int) -> SlotCostModel:
    """Parameter count in the slot-table form (NSGA-II's third objective), counted on real modules.

    Counting the modules rather than re-deriving a formula keeps it exact by construction; BN
    running buffers are not parameters and are not counted.
    """
    from tailor.nets import MBConv, StaticNet
    from tailor.space import mid_channels

    c = space.cfg
    table = torch.zeros(space.n_units, space.max_depth, len(c.kernels), len(c.expands), dtype=torch.float64)
    for i, (cin, cout, s, _) in enumerate(space.unit_geometry()):
        for j in range(space.max_depth):
            bcin, bs = (cin, s) if j == 0 else (cout, 1)
            for a, k in enumerate(c.kernels):
                for b, e in enumerate(c.expands):
                    blk = MBConv(bcin, cout, bs, k, mid_channels(bcin, e), c.se[i], c.activations[i])
                    table[i, j, a, b] = sum(q.numel() for q in blk.parameters())
    net = StaticNet(space, space.min_arch, num_classes)
    fixed = sum(q.numel() for q in net.parameters()) - sum(q.numel() for q in net.blocks.parameters())
    return SlotCostModel("params", float(fixed), table, list(c.kernels), list(c.expands), min(c.depths))


def _block_at(cfg, flat: int) -> tuple[int, int]:
    """(kernel, expand) of a flat index into a slot's (kernels x expands) table."""
    return cfg.kernels[flat // len(cfg.expands)], cfg.expands[flat % len(cfg.expands)]


def cheapest_arch(space: SearchSpace, cost: SlotCostModel) -> Arch:
    """The architecture of lowest cost the table allows (min_arch for MAdds; a LUT may differ)."""
    c, t = space.cfg, cost.table
    return Arch(tuple(tuple(_block_at(c, int(torch.argmin(t[i, j]))) for j in range(min(c.depths)))
                      for i in range(space.n_units)))


def dearest_arch(space: SearchSpace, cost: SlotCostModel) -> Arch:
    """The architecture of highest cost the table allows: each slot's dearest entry, and per unit the
    depth whose blocks add the most (a calibrated LUT can give a block a negative cost)."""
    c, t = space.cfg, cost.table
    units = []
    for i in range(space.n_units):
        best = [int(torch.argmax(t[i, j])) for j in range(space.max_depth)]
        gain = [float(t[i, j].max()) for j in range(space.max_depth)]
        depth = max(c.depths, key=lambda d: sum(gain[:d]))
        units.append(tuple(_block_at(c, b) for b in best[:depth]))
    return Arch(tuple(units))


# ---------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Scenario:
    superclass: str
    sc: int          # superclass index in the dataset
    budget: float    # in the cost model's unit
    spec: float      # the value params gave (a fraction or the absolute budget)

    @property
    def key(self) -> str:
        return f"{self.superclass}@{self.budget:.12g}"


def resolve_budgets(cfg: SearchBudgets, cost: SlotCostModel, where: str = "search.budgets") -> list[tuple[float, float]]:
    """[(budget in the cost unit, value as given)], or one SearchError naming every bad value."""
    low, high = cost.low_high
    out, bad = [], []
    for v in cfg.values:
        if cfg.kind == "fraction":
            if not 0 <= v <= 1:
                bad.append(f"{v} (fractions lie in [0, 1])")
                continue
            out.append((low + v * (high - low), v))
        else:
            if not low <= v <= high:
                bad.append(f"{v:.6g}")
                continue
            out.append((float(v), v))
    if bad:
        raise SearchError(f"{where}.values: {', '.join(bad)} outside the space's {cost.unit} range "
                          f"[{low:.6g}, {high:.6g}] (kind {cfg.kind!r}; cheapest and dearest architectures)")
    return out


def check_budget(budget: float, cost: SlotCostModel) -> None:
    low, high = cost.low_high
    if not low <= budget <= high:
        raise SearchError(f"budget {budget:.6g} {cost.unit} is outside the space's range [{low:.6g}, {high:.6g}]")


def scenario_grid(p: Params, superclass_names: list[str], cost: SlotCostModel,
                  only: list[str] | None = None) -> list[Scenario]:
    """Superclasses (params, or `only`) x budgets, in params order."""
    names = only or p.search.superclasses or superclass_names
    unknown = [n for n in names if n not in superclass_names]
    if unknown:
        src = "--superclass" if only else "search.superclasses"
        raise SearchError(f"{src}: unknown superclass(es) {unknown}; the dataset has {superclass_names}")
    budgets = resolve_budgets(p.search.budgets, cost)
    return [Scenario(n, superclass_names.index(n), b, v) for n in names for b, v in budgets]


# ---------------------------------------------------------------- architecture operators
Units = list[list[list[int]]]  # mutable form: units -> blocks -> [kernel, expand]


def _mutable(arch: Arch) -> Units:
    return [[[k, e] for k, e in unit] for unit in arch.units]


def _frozen(units: Units) -> Arch:
    return Arch(tuple(tuple((k, e) for k, e in unit) for unit in units))


class Snapper:
    """Greedy elasticity scaling (TF-NAS) into [(1 - slack) B, B], one primitive at a time.

    Over budget: take the single change (kernel or expand one level, a block dropped or added)
    that lands highest inside the window if one does, else the one that lowers the cost least,
    so the architecture keeps as much of its shape as it can. Under the window: the change that
    raises the cost most without passing B; when every single raise passes B (a block costs more
    than the window is wide, as in a latency table dominated by per-block overhead), the best pair
    of independent changes, e.g. one block added and one kernel shrunk. Moves are chosen by their
    cost effect, not by their direction, so a latency table that is not monotone in kernel or
    expand still converges (every move strictly lowers, then strictly raises, the cost). Cost
    changes are table deltas, so a step costs a few microseconds per neighbour.
    """

    def __init__(self, space: SearchSpace, cost: SlotCostModel, slack: float):
        self.space, self.cost, self.slack = space, cost, slack
        c = space.cfg
        self.kernels, self.expands = list(c.kernels), list(c.expands)
        self.dmin, self.dmax = min(c.depths), max(c.depths)
        # Scaled entries indexed [unit][slot][kernel index][expand index]; blocks are held as index pairs.
        self.rows = (cost.table * cost.scale).tolist()
        self.ki = {k: i for i, k in enumerate(self.kernels)}
        self.ei = {e: i for i, e in enumerate(self.expands)}
        self.floor = cheapest_arch(space, cost)
        self.ceiling = dearest_arch(space, cost)

    def moves(self, units: list[list[list[int]]]) -> list[tuple[float, tuple]]:
        """(cost delta, move) for every one-primitive change of `units` (index form)."""
        out = []
        nk, ne = len(self.kernels), len(self.expands)
        for i, unit in enumerate(units):
            ri = self.rows[i]
            for j, (a, b) in enumerate(unit):
                row = ri[j]
                base = row[a][b]
                if a > 0:
                    out.append((row[a - 1][b] - base, (0, i, j, a - 1)))
                if a + 1 < nk:
                    out.append((row[a + 1][b] - base, (0, i, j, a + 1)))
                if b > 0:
                    out.append((row[a][b - 1] - base, (1, i, j, b - 1)))
                if b + 1 < ne:
                    out.append((row[a][b + 1] - base, (1, i, j, b + 1)))
            d = len(unit)
            a, b = unit[-1]
            if d > self.dmin:
                out.append((-ri[d - 1][a][b], (2, i, 0, 0)))
            if d < self.dmax:
                # A new last block either repeats the current last one or is the smallest choice.
                out.append((ri[d][a][b], (3, i, a, b)))
                if (a, b) != (0, 0):
                    out.append((ri[d][0][0], (3, i, 0, 0)))
        return out

    @staticmethod
    def _apply(units: list[list[list[int]]], move: tuple) -> None:
        kind, i, a, b = move
        if kind == 0:
            units[i][a][0] = b
        elif kind == 1:
            units[i][a][1] = b
        elif kind == 2:
            units[i].pop()
        else:
            units[i].append([a, b])

    @staticmethod
    def _independent(m1: tuple, m2: tuple) -> bool:
        """Whether two moves' cost deltas add up: different units, or kernel / expand of different blocks."""
        (k1, i1, j1, _), (k2, i2, j2, _) = m1, m2
        return i1 != i2 or (k1 < 2 and k2 < 2 and j1 != j2)

    def _index_form(self, arch: Arch) -> list[list[list[int]]]:
        return [[[self.ki[k], self.ei[e]] for k, e in unit] for unit in arch.units]

    def __call__(self, arch: Arch, budget: float) -> Arch:
        eps = 1e-9 * max(1.0, abs(budget))
        lo, hi = (1 - self.slack) * budget - eps, budget + eps
        units, c = self._snap(self._index_form(arch), self.cost.cost(arch), lo, hi)
        if c < lo:
            # Stuck below the window: every raise of one or two primitives passes B, or none raises
            # the cost at all (a local maximum of a non-monotone table). Two more starts, each
            # snapped down from above B: the stuck arch after the raise that passes B least (then
            # small cuts can land inside), and the dearest arch. The highest result within B wins.
            starts = []
            over = [(d, m) for d, m in self.moves(units) if c + d > hi]
            if over:
                d, m = min(over, key=lambda t: t[0])
                raised = copy.deepcopy(units)
                self._apply(raised, m)
                starts.append((raised, c + d))
            starts.append((self._index_form(self.ceiling), self.cost.cost(self.ceiling)))
            for start, cost in starts:
                again, c2 = self._snap(start, cost, lo, hi)
                if c < c2 <= hi:
                    units, c = again, c2
                if c >= lo:
                    break
        ks, es = self.kernels, self.expands
        return Arch(tuple(tuple((ks[a], es[b]) for a, b in unit) for unit in units))

    def _snap(self, units: list[list[list[int]]], c: float, lo: float, hi: float) -> tuple[list, float]:
        """Down until within hi, then up towards [lo, hi]: (index-form units, their cost)."""
        while c > hi:
            down = [t for t in self.moves(units) if t[0] < 0]
            if not down:  # a local minimum of a non-monotone table: restart from the cheapest arch
                units, c = self._index_form(self.floor), self.cost.cost(self.floor)
                break
            inside = [t for t in down if lo <= c + t[0] <= hi]
            d, m = max(inside or down, key=lambda t: t[0])
            self._apply(units, m)
            c += d
        while c < lo:
            moves = self.moves(units)
            up = [(d, (m,)) for d, m in moves if 0 < d and c + d <= hi]
            if not up:
                up = [(d1 + d2, (m1, m2)) for n, (d1, m1) in enumerate(moves) for d2, m2 in moves[n + 1:]
                      if 0 < d1 + d2 and c + d1 + d2 <= hi and self._independent(m1, m2)]
            if not up:
                break  # no change of one or two primitives fits: within budget, below the window
            d, ms = max(up, key=lambda t: t[0])
            for m in ms:
                self._apply(units, m)
            c += d
        return units, c


def sample_within(space: SearchSpace, cost: SlotCostModel, snap: Snapper, budget: float, rng: random.Random,
                  max_tries: int) -> Arch:
    """A uniform architecture that fits the budget (rejection sampling), else a snapped one."""
    arch = space.sample(rng)
    for _ in range(max_tries - 1):
        if cost.cost(arch) <= budget:
            return arch
        arch = space.sample(rng)
    return arch if cost.cost(arch) <= budget else snap(arch, budget)


def mutate(space: SearchSpace, arch: Arch, rng: random.Random, prob: float) -> Arch:
    """OFA's mutation: each unit's depth, and each block's kernel and expand, resampled with `prob`."""
    c = space.cfg
    units = []
    for unit in arch.units:
        blocks = [list(b) for b in unit]
        if rng.random() < prob:
            d = rng.choice(c.depths)
            blocks = blocks[:d] + [[rng.choice(c.kernels), rng.choice(c.expands)] for _ in range(d - len(blocks))]
        for b in blocks:
            if rng.random() < prob:
                b[0] = rng.choice(c.kernels)
            if rng.random() < prob:
                b[1] = rng.choice(c.expands)
        units.append(blocks)
    return _frozen(units)


def crossover(a: Arch, b: Arch, rng: random.Random) -> Arch:
    """Uniform crossover: each unit's depth and each block slot's (kernel, expand) from either parent."""
    units = []
    for ua, ub in zip(a.units, b.units):
        d = len(ua) if rng.random() < 0.5 else len(ub)
        blocks = []
        for j in range(d):
            have = [u[j] for u in (ua, ub) if j < len(u)]
            blocks.append(list(rng.choice(have)))
        units.append(blocks)
    return _frozen(units)


def perturb(space: SearchSpace, arch: Arch, rng: random.Random) -> Arch:
    """EAT-NAS's perturbation: exactly one primitive of every unit changed (its depth, or one block's
    kernel or expand). A unit whose primitives all have a single choice is left as it is."""
    c = space.cfg
    units = _mutable(arch)
    for unit in units:
        choices = [("depth", None)] if len(c.depths) > 1 else []
        if len(c.kernels) > 1:
            choices += [("k", j) for j in range(len(unit))]
        if len(c.expands) > 1:
            choices += [("e", j) for j in range(len(unit))]
        if not choices:
            continue
        kind, j = rng.choice(choices)
        if kind == "depth":
            d = rng.choice([x for x in c.depths if x != len(unit)])
            if d < len(unit):
                del unit[d:]
            else:
                unit += [list(unit[-1]) for _ in range(d - len(unit))]
        elif kind == "k":
            unit[j][0] = rng.choice([k for k in c.kernels if k != unit[j][0]])
        else:
            unit[j][1] = rng.choice([e for e in c.expands if e != unit[j][1]])
    return _frozen(units)


def seeded_population(space: SearchSpace, seed_arch: Arch | None, n_seeds: int, budget: float,
                      cost: SlotCostModel, snap: Snapper, rng: random.Random, tries: int = 50) -> list[Arch]:
    """EAT-NAS transfer seeding: up to `n_seeds` distinct perturbations of the basic architecture
    (`perturb`), each one over the budget snapped into it.

    Fewer come back when `tries` draws in a row bring nothing new: snapping folds the perturbations
    of a basic architecture far over the budget onto a few architectures, and a small space has few
    perturbations. The caller fills the rest (n_seeds - len(result)) and can report the shortfall.
    """
    if seed_arch is None or n_seeds <= 0:
        return []
    space.validate(seed_arch)
    out: list[Arch] = []
    seen: set[Arch] = set()
    misses = 0
    while len(out) < n_seeds and misses < tries:
        a = perturb(space, seed_arch, rng)
        if cost.cost(a) > budget:
            a = snap(a, budget)
        if a in seen:
            misses += 1
            continue
        seen.add(a)
        out.append(a)
        misses = 0
    return out


# ---------------------------------------------------------------- supernet validation accuracy
class Evaluator:
    """Supernet accuracy of architectures on one split, per superclass, cached by architecture string.

    Each architecture is extracted and its BN statistics recalibrated on a fixed sample of training
    images of all classes (the first `recal_batches` batches of the sample `Context.recal_batches`
    draws; the deployed network's statistics also come from all classes). `acc(arch, t)` then
    scores it on t's images of the split only, argmax over t's classes (`evaluate` restricts it to
    the image's own superclass); `__call__(arch)` scores every superclass in one pass over the
    whole split. Recalibrated networks stay in a small LRU cache, so an architecture asked for
    several superclasses is recalibrated once.

    The search's evaluator reads `val` with search.recal_batches; the report's reads `test` with
    every recalibration batch of the runtime (>= 1,000 images by default) and is never consulted
    by a method. Evaluations are counted per run (`begin_run`): one per (architecture, superclass)
    a method asked for, cached or not, so that re-running a method with another seed pays again.
    """

    def __init__(self, ctx, supernet, recal_batches: int | None = None, split: str = "val", keep_nets: int = 16,
                 keep_classes: set[int] | None = None):
        self.ctx, self.supernet, self.keep_nets, self.split = ctx, supernet, keep_nets, split
        self.keep_classes = keep_classes  # TF-NAS proxy classes: score only their images
        self.n_recal = ctx.p.search.recal_batches if recal_batches is None else recal_batches
        self.cache: dict[str, dict[str, float]] = {}
        self.seconds = 0.0
        self.recalibrations = 0
        self._recal = None
        self._nets: dict[str, torch.nn.Module] = {}
        self._split: dict[str, object] = {}
        self._asked: set[tuple[str, str]] = set()

    def begin_run(self) -> None:
        """Start counting a new method run's evaluations (the cache of scores is kept)."""
        self._asked = set()

    @property
    def evaluations(self) -> int:
        """(architecture, superclass) pairs scored for the current run."""
        return len(self._asked)

    def recal_sample(self) -> list[torch.Tensor]:
        """The recalibration batches (normalised float images of all classes)."""
        if self._recal is None:
            # A prefix of the stages' own recalibration sample: the same images, fewer of them.
            self._recal = self.ctx.recal_batches(self.ctx.p.seed)[:self.n_recal]
        return self._recal

    def _net(self, key: str, arch: Arch) -> torch.nn.Module:
        from tailor.supernet import recalibrate_bn

        if key in self._nets:
            self._nets[key] = self._nets.pop(key)  # most recently used last
            return self._nets[key]
        net = self.ctx.prepare_model(self.supernet.extract(arch))
        recalibrate_bn(net, self.recal_sample())
        self.recalibrations += 1
        self._nets[key] = net.eval()
        while len(self._nets) > self.keep_nets:
            self._nets.pop(next(iter(self._nets)))
        return net

    def _split_of(self, superclass: str | None):
        """One superclass's images of the split (None: every superclass's), as their own Batches."""
        if superclass not in self._split:
            from tailor.data import Batches, load_split

            x, y = load_split(self.ctx.data_dir, self.split)
            meta = self.ctx.meta
            t = None if superclass is None else meta.superclass_index(superclass)
            sel = [i for i, c in enumerate(y.tolist()) if (t is None or meta.class_superclass[c] == t)
                   and (self.keep_classes is None or c in self.keep_classes)]
            self._split[superclass] = Batches(x[sel], y[sel], meta, self.ctx.device,
                                              self.ctx.p.runtime.eval_batch_size,
                                              channels_last=self.ctx.p.runtime.channels_last)
        return self._split[superclass]

    def _score(self, key: str, arch: Arch, batches) -> dict[str, float]:
        from tailor.train import autocast, evaluate

        t0 = time.perf_counter()
        net = self._net(key, arch)
        with autocast(self.ctx.device, self.ctx.p.runtime):
            res = evaluate(net, batches, self.ctx.meta)["sc_top1"]
        self.seconds += time.perf_counter() - t0
        return res

    def __call__(self, arch: Arch) -> dict[str, float]:
        """Accuracy on every superclass (one evaluation each)."""
        key = str(arch)
        got = self.cache.get(key, {})
        if len(got) < len(self.ctx.meta.superclasses):
            whole = self.ctx.batches(self.split) if self.keep_classes is None else self._split_of(None)
            self.cache[key] = self._score(key, arch, whole)
        self._asked.update((key, t) for t in self.cache[key])
        return self.cache[key]

    def acc(self, arch: Arch, superclass: str) -> float:
        key = str(arch)
        got = self.cache.setdefault(key, {})
        if superclass not in got:
            got[superclass] = self._score(key, arch, self._split_of(superclass))[superclass]
        self._asked.add((key, superclass))
        return got[superclass]


# ---------------------------------------------------------------- the shared setup of a search stage
@dataclass
class Setup:
    p: Params
    ctx: object                 # tailor.context.Context
    supernet: torch.nn.Module
    space: SearchSpace
    cost: SlotCostModel         # what budgets are in
    madds: SlotCostModel
    params_model: SlotCostModel
    scenarios: list[Scenario]
    snap: Snapper
    evaluator: Evaluator        # validation split: what the methods may see
    reporter: Evaluator         # test split: what the table reports, never seen by a method
    grid_scs: list[int]         # superclass indices of the params grid (even when a run does only some)
    proxy: dict | None = None   # TF-NAS proxy classes the search scores on (None: all classes)

    @property
    def superclasses(self) -> list[str]:
        return list(self.ctx.meta.superclasses)

    def row(self, sc: Scenario, arch: Arch, seed: int, **extra) -> dict:
        """One result: the architecture, its costs, its supernet validation accuracy (what the method
        saw) and test accuracy (what the table reports). Call it after the method's run has ended:
        the validation score it asks for is not the method's spending."""
        c = self.cost.cost(arch)
        out = {"superclass": sc.superclass, "budget": sc.budget, "budget_spec": sc.spec, "arch": str(arch),
               "cost": round(c, 6), "cost_unit": self.cost.unit, "madds": int(round(self.madds.cost(arch))),
               "params": int(round(self.params_model.cost(arch))), "budget_used": round(c / sc.budget, 4),
               "within_budget": c <= sc.budget * (1 + 1e-9),
               "in_window": (1 - self.p.search.slack) * sc.budget * (1 - 1e-9) <= c <= sc.budget * (1 + 1e-9),
               "seed": seed, "val_acc": self.evaluator.acc(arch, sc.superclass),
               "test_acc": self.reporter.acc(arch, sc.superclass)}
        if self.cost.unit == "ms":
            out["latency_ms"] = round(c, 6)
        out.update(extra)
        return out


def load_setup(p: Params, data_dir: Path, supernet_path: Path, only: list[str] | None = None) -> Setup:
    from tailor.context import Context, load_supernet

    ctx = Context(p, data_dir)
    supernet, ck = load_supernet(supernet_path, ctx.device, ctx)
    supernet = ctx.prepare_model(supernet).eval()
    for q in supernet.parameters():
        q.requires_grad_(False)
    space = ctx.space
    cost = make_cost_model(p.search.cost, space, ctx.num_classes)
    madds = madds_cost_model(space, ctx.num_classes)
    names = list(ctx.meta.superclasses)
    scenarios = scenario_grid(p, names, cost, only)
    grid_scs = sorted({s.sc for s in scenario_grid(p, names, cost)})
    proxy = None
    if p.search.proxy_fraction < 1:
        proxy = proxy_classes(ctx, supernet, space, p.search.proxy_fraction, p.seed)
    keep = None if proxy is None else {c for cs in proxy["classes"].values() for c in cs}
    return Setup(p, ctx, supernet, space, cost, madds, params_cost_model(space, ctx.num_classes), scenarios,
                 Snapper(space, cost, p.search.slack), Evaluator(ctx, supernet, keep_classes=keep),
                 Evaluator(ctx, supernet, recal_batches=p.runtime.bn_recal_batches, split="test"), grid_scs, proxy)


# ---------------------------------------------------------------- TF-NAS proxy classes
def choose_proxy(acc: dict[int, float], classes_of: list[list[int]], fraction: float,
                 rng: random.Random) -> list[list[int]]:
    """Per superclass, ceil(fraction x its classes) of them: rank its classes by accuracy, cut the
    ranking into that many groups of neighbouring ranks, and draw one class from each group, so
    the subset spans easy to hard classes as the whole superclass does (TF-NAS)."""
    out = []
    for classes in classes_of:
        k = max(1, math.ceil(fraction * len(classes)))
        ranked = sorted(classes, key=lambda c: (-acc[c], c))
        bounds = [round(i * len(ranked) / k) for i in range(k + 1)]
        out.append(sorted(rng.choice(ranked[a:b]) for a, b in zip(bounds, bounds[1:])))
    return out


@torch.no_grad()
def proxy_classes(ctx, supernet, space: SearchSpace, fraction: float, seed: int) -> dict:
    """The proxy classes of every superclass, ranked by the largest subnet's per-class validation
    accuracy (BN recalibrated; superclass-restricted). The largest subnet stands in for TF-NAS's
    pretrained network: it is what the supernet distils into (from the teacher, or in place)."""
    from tailor.supernet import recalibrate_bn

    net = ctx.prepare_model(supernet.extract(space.max_arch))
    recalibrate_bn(net, ctx.recal_batches(ctx.p.seed)).eval()
    meta = ctx.meta
    hits = torch.zeros(ctx.num_classes)
    count = torch.zeros(ctx.num_classes)
    batches = ctx.batches("val")
    for x, y, sc in batches.epoch(None, augment=False, drop_last=False):
        logits = net(x).float()
        own = batches.sc_of_class[None, :] == sc[:, None]
        pred = logits.masked_fill(~own, float("-inf")).argmax(1)
        hits.index_add_(0, y.cpu(), (pred == y).float().cpu())
        count.index_add_(0, y.cpu(), torch.ones(len(y)))
    acc = {c: float(hits[c] / max(1.0, float(count[c]))) for c in range(ctx.num_classes)}
    classes_of = [meta.classes_of(t) for t in range(len(meta.superclasses))]
    chosen = choose_proxy(acc, classes_of, fraction, random.Random(f"proxy-{seed}"))
    return {"fraction": fraction, "ranked_by": "largest subnet, validation, per class",
            "classes": {meta.superclasses[t]: cs for t, cs in enumerate(chosen)},
            "class_accuracy": {meta.classes[c]: round(a, 4) for c, a in acc.items()}}

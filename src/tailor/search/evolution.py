"""Once-for-All's search: an accuracy predictor trained on measured subnets, then evolution under
the budget, with EAT-NAS transfer seeding.

Predictor: sample N subnets, measure each one's BN-recalibrated validation accuracy on every
superclass (one evaluation gives all of them), and fit an MLP on (arch encoding, superclass
one-hot) -> accuracy. Its held-out error and Kendall tau are reported.

Variants (as in the EAS paper): OFA-V runs one search per budget for all superclasses (fitness:
the mean predicted accuracy over the scenarios' superclasses), so every superclass gets the same
architecture; OFA-T runs one search per (superclass, budget) with that superclass's prediction.
`run_ofa_t` searches only its setup's scenarios, so a pipeline can run one superclass per task.

Transfer (EAT-NAS): budgets are searched in ascending order, and each search's first population
is made of distinct perturbations of a basic architecture (one primitive per unit changed, snapped
into the budget when over it): the previous budget's result for the same superclass
(transfer_budgets), or search.evolution.seed_arch for the first budget; seed_fraction 1.0 seeds all
of it. `evolve` returns the population-quality curve (mean and best fitness per generation), and
`transfer_compare` runs one evolution seeded and unseeded at equal evaluations to compare them.
"""
from __future__ import annotations

import random
import time

import torch
from torch import nn

from tailor.config import EvolutionConfig, PredictorConfig
from tailor.cost import SlotCostModel
from tailor.search.common import Setup, Snapper, crossover, mutate, sample_within, seeded_population
from tailor.stats import kendall_tau
from tailor.space import Arch, SearchSpace
from tailor.utils import fingerprint, load_checkpoint, log


# ---------------------------------------------------------------- the accuracy predictor
class AccuracyPredictor(nn.Module):
    def __init__(self, encoding_size: int, n_superclasses: int, hidden: int, layers: int):
        super().__init__()
        dims = [encoding_size + n_superclasses] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*mods, nn.Linear(dims[-1], 1))
        self.n_superclasses = n_superclasses

    def forward(self, enc: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(sc, self.n_superclasses).to(enc.dtype)
        return self.mlp(torch.cat([enc, onehot], dim=1)).squeeze(1)


class Predictor:
    """A trained AccuracyPredictor with an encoding cache: predicted accuracy of archs for a superclass."""

    def __init__(self, model: AccuracyPredictor, space: SearchSpace):
        self.model, self.space = model.eval(), space
        self._enc: dict[Arch, list[float]] = {}

    def _encode(self, archs: list[Arch]) -> torch.Tensor:
        for a in archs:
            if a not in self._enc:
                self._enc[a] = self.space.encode(a)
        return torch.tensor([self._enc[a] for a in archs])

    @torch.no_grad()
    def __call__(self, archs: list[Arch], sc: int) -> list[float]:
        return self.model(self._encode(archs), torch.full((len(archs),), sc, dtype=torch.long)).tolist()

    @torch.no_grad()
    def mean_over(self, archs: list[Arch], scs: list[int]) -> list[float]:
        enc = self._encode(archs)
        preds = torch.stack([self.model(enc, torch.full((len(archs),), s, dtype=torch.long)) for s in scs])
        return preds.mean(0).tolist()


def collect(setup: Setup, n: int, seed: int) -> tuple[list[dict], float]:
    """N distinct uniform random subnets with their measured accuracy on every superclass."""
    rng = random.Random(fingerprint("predictor-data", seed))
    archs, seen = [], set()
    tries = 0
    while len(archs) < n and tries < 100 * n:
        a = setup.space.sample(rng)
        tries += 1
        if a not in seen:
            seen.add(a)
            archs.append(a)
    t0 = time.perf_counter()
    rows = []
    for i, a in enumerate(archs):
        rows.append({"arch": str(a), "acc": setup.evaluator(a)})
        if (i + 1) % max(1, n // 5) == 0:
            log(f"search-predictor: measured {i + 1}/{n} subnets ({time.perf_counter() - t0:.1f}s)")
    return rows, time.perf_counter() - t0


def fit_predictor(space: SearchSpace, superclasses: list[str], rows: list[dict], cfg: PredictorConfig,
                  seed: int) -> tuple[AccuracyPredictor, dict]:
    """Train on (1 - holdout) of the architectures (all their superclasses); report error on the rest."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=gen).tolist()
    n_hold = int(round(cfg.holdout * len(rows)))
    if cfg.holdout and n_hold == 0:
        n_hold = 1
    if len(rows) - n_hold < 1:
        raise ValueError(f"search.predictor: {len(rows)} sampled subnets leave none to train on "
                         f"with holdout {cfg.holdout}")
    hold, train = [rows[i] for i in order[:n_hold]], [rows[i] for i in order[n_hold:]]

    def tensors(part):
        enc, sc, y = [], [], []
        for r in part:
            e = space.encode(Arch.parse(r["arch"]))
            for s, name in enumerate(superclasses):
                enc.append(e)
                sc.append(s)
                y.append(r["acc"][name])
        return torch.tensor(enc), torch.tensor(sc), torch.tensor(y)

    x, s, y = tensors(train)
    torch.manual_seed(seed)
    model = AccuracyPredictor(space.encoding_size, len(superclasses), cfg.hidden, cfg.layers)
    with torch.no_grad():
        model.mlp[-1].bias.fill_(float(y.mean()))  # start from the mean: the MLP only learns differences
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for b in range(0, len(y), cfg.batch_size):
            idx = perm[b:b + cfg.batch_size]
            loss = torch.nn.functional.mse_loss(model(x[idx], s[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    quality = {"train_archs": len(train), "holdout_archs": len(hold), "train_s": round(time.perf_counter() - t0, 3)}
    with torch.no_grad():
        quality["train_rmse"] = round(float(((model(x, s) - y) ** 2).mean().sqrt()), 5)
        if hold:
            hx, hs, hy = tensors(hold)
            pred = model(hx, hs)
            quality["holdout_rmse"] = round(float(((pred - hy) ** 2).mean().sqrt()), 5)
            quality["holdout_rmse_of_mean"] = round(float(((y.mean() - hy) ** 2).mean().sqrt()), 5)
            quality["holdout_kendall_tau"] = round(kendall_tau(pred.tolist(), hy.tolist()), 4)
    return model, quality


def save_predictor(path, cfg: PredictorConfig, setup: Setup, per_seed: dict) -> None:
    """One predictor per seed of search.seeds: {seed: {"model", "rows", "quality", "timing", "evaluations"}}."""
    from tailor.context import provenance
    from tailor.utils import atomic_torch_save

    seeds = {str(s): {"state_dict": r["model"].state_dict(), "data": r["rows"], "quality": r["quality"],
                      "timing": r["timing"], "evaluations": r["evaluations"]} for s, r in per_seed.items()}
    atomic_torch_save({"config": cfg.model_dump(mode="json"), "superclasses": setup.superclasses,
                       "encoding_size": setup.space.encoding_size, "seeds": seeds,
                       **provenance(setup.p, "search-predictor")}, path)


def load_predictor(path, setup: Setup, seed: int) -> tuple[Predictor, dict]:
    """The predictor fitted for `seed`, and its record (data, quality, timing, evaluations)."""
    ck = load_checkpoint(path, "accuracy predictor", ("superclasses", "encoding_size"))
    if ck["superclasses"] != setup.superclasses or ck["encoding_size"] != setup.space.encoding_size:
        raise ValueError(f"{path}: accuracy predictor built for other superclasses or another search space; "
                         f"re-run search-predictor")
    if str(seed) not in ck.get("seeds", {}):
        raise ValueError(f"{path}: no predictor for seed {seed} (has {sorted(ck.get('seeds', {}))}); "
                         f"re-run search-predictor with the same search.seeds")
    cfg = PredictorConfig.model_validate(ck["config"])
    model = AccuracyPredictor(ck["encoding_size"], len(ck["superclasses"]), cfg.hidden, cfg.layers)
    rec = ck["seeds"][str(seed)]
    model.load_state_dict(rec["state_dict"])
    return Predictor(model, setup.space), rec


# ---------------------------------------------------------------- evolution
def _within(make, cost: SlotCostModel, snap: Snapper, budget: float, tries: int) -> Arch:
    """A child from `make()` that fits the budget, redrawn up to `tries` times, else snapped down."""
    a = make()
    for _ in range(tries - 1):
        if cost.cost(a) <= budget:
            return a
        a = make()
    return a if cost.cost(a) <= budget else snap(a, budget)


def initial_population(space: SearchSpace, cost: SlotCostModel, snap: Snapper, budget: float, cfg: EvolutionConfig,
                       rng: random.Random, seed_arch: Arch | None = None) -> tuple[list[Arch], dict]:
    """The first generation: round(seed_fraction * population) distinct perturbations of `seed_arch`
    within budget (none without one), the rest uniform samples within budget. Returns it with the
    counts {"seeded", "random", "seed_fallback"}: seed_fallback counts the samples drawn in place of
    perturbations that repeated too often (`seeded_population`)."""
    n_seed = int(round(cfg.seed_fraction * cfg.population)) if seed_arch is not None else 0
    pop = seeded_population(space, seed_arch, n_seed, budget, cost, snap, rng, cfg.max_tries)
    seeded = len(pop)
    if seeded < n_seed:
        log(f"search-evolution: only {seeded} distinct perturbations of {seed_arch} within {budget:.6g}; "
            f"{n_seed - seeded} of the seeded population drawn at random instead")
    while len(pop) < cfg.population:
        pop.append(sample_within(space, cost, snap, budget, rng, cfg.max_tries))
    return pop, {"seeded": seeded, "random": len(pop) - seeded, "seed_fallback": n_seed - seeded}


def evolve(space: SearchSpace, cost: SlotCostModel, snap: Snapper, budget: float, fitness, cfg: EvolutionConfig,
           rng: random.Random, seed_arch: Arch | None = None) -> tuple[Arch, float, dict]:
    """OFA's evolutionary search under `cost <= budget`: keep the top parent_ratio, refill with
    mutants and crossovers that fit. `fitness(list[Arch]) -> list[float]` is called once per
    generation on the whole population (generations + 1 times: the last on the final population).

    Returns (best arch, its fitness, curve). The curve is the population quality EAT-NAS compares:
    {"best": [...], "mean": [...]} of the population's fitness per generation (index 0 is the initial
    population), with "fitness_evaluations" (architectures scored by `fitness`, not supernet
    evaluations) and `initial_population`'s counts. The parents survive each generation, so "best"
    never falls for a deterministic fitness.
    """
    pop, init = initial_population(space, cost, snap, budget, cfg, rng, seed_arch)
    n_parents = max(1, int(round(cfg.parent_ratio * cfg.population)))
    n_mut = int(round(cfg.mutation_ratio * (cfg.population - n_parents)))
    best, best_fit = pop[0], float("-inf")
    curve = {"best": [], "mean": [], "fitness_evaluations": 0, **init}

    def score(pop: list[Arch]) -> list[float]:
        nonlocal best, best_fit
        fit = fitness(pop)
        i = max(range(len(pop)), key=lambda j: fit[j])
        if fit[i] > best_fit:
            best, best_fit = pop[i], fit[i]
        curve["best"].append(round(fit[i], 5))
        curve["mean"].append(round(sum(fit) / len(fit), 5))
        curve["fitness_evaluations"] += len(pop)
        return fit

    for _ in range(cfg.generations):
        fit = score(pop)
        ranked = sorted(range(len(pop)), key=lambda i: -fit[i])
        parents = [pop[i] for i in ranked[:n_parents]]
        children = [_within(lambda: mutate(space, rng.choice(parents), rng, cfg.mutate_prob), cost, snap, budget,
                            cfg.max_tries) for _ in range(n_mut)]
        while len(parents) + len(children) < cfg.population:
            children.append(_within(lambda: crossover(rng.choice(parents), rng.choice(parents), rng), cost, snap,
                                    budget, cfg.max_tries))
        pop = parents + children
    score(pop)
    return best, best_fit, curve


def transfer_compare(space: SearchSpace, cost: SlotCostModel, snap: Snapper, budget: float, fitness,
                     cfg: EvolutionConfig, seed: int, basic: Arch) -> dict:
    """EAT-NAS's comparison at equal evaluations: the same evolution (population, generations, random
    seed) started from perturbations of `basic` (cfg.seed_fraction of the population) and from uniform
    samples only. Returns {"budget", "basic", "seeded": {"arch", "fitness", "curve"}, "unseeded": ...}
    with architectures as strings, JSON-ready."""
    if cfg.seed_fraction <= 0:
        raise ValueError("transfer_compare: seed_fraction 0 seeds nothing, both runs would be unseeded")
    out: dict = {"budget": budget, "basic": str(basic)}
    for name, arch in (("seeded", basic), ("unseeded", None)):
        rng = random.Random(fingerprint("transfer-compare", seed, budget))
        a, f, curve = evolve(space, cost, snap, budget, fitness, cfg, rng, arch)
        out[name] = {"arch": str(a), "fitness": f, "curve": curve}
    return out


def _by_superclass(scenarios):
    out: dict[str, list] = {}
    for s in scenarios:
        out.setdefault(s.superclass, []).append(s)
    return {k: sorted(v, key=lambda s: s.budget) for k, v in out.items()}


def run_ofa_t(setup: Setup, predictor: Predictor, cfg: EvolutionConfig, seed: int,
              seed_arch: Arch | None = None) -> tuple[dict, dict]:
    """One evolutionary search per (superclass, budget); budgets ascending. The first budget is seeded
    from `seed_arch` (if given), each later one, when transfer_budgets, from the previous budget's
    result for the same superclass (EAT-NAS's proxy task). Returns ({scenario key: (arch, predicted,
    curve)}, timing), the curve as `evolve` gives it."""
    picks, t0 = {}, time.perf_counter()
    for name, scs in _by_superclass(setup.scenarios).items():
        basic = seed_arch
        for s in scs:
            rng = random.Random(fingerprint("ofa-t", seed, s.superclass, s.budget))
            arch, pred, curve = evolve(setup.space, setup.cost, setup.snap, s.budget,
                                       lambda archs, t=s.sc: predictor(archs, t), cfg, rng, basic)
            picks[s.key] = (arch, pred, curve)
            if cfg.transfer_budgets:
                basic = arch
    return picks, {"evolution_s": round(time.perf_counter() - t0, 3)}


def run_ofa_v(setup: Setup, predictor: Predictor, cfg: EvolutionConfig, seed: int,
              seed_arch: Arch | None = None) -> tuple[dict, dict]:
    """One evolutionary search per budget for all the grid's superclasses together (also when this run
    covers only some of them: every part of a fanned-out run then finds the same architectures).
    Seeded as `run_ofa_t` is, from the previous budget's result; returns the same shape."""
    scs = setup.grid_scs
    budgets = sorted({s.budget for s in setup.scenarios})
    t0, found, basic = time.perf_counter(), {}, seed_arch
    for b in budgets:
        rng = random.Random(fingerprint("ofa-v", seed, b))
        found[b] = evolve(setup.space, setup.cost, setup.snap, b, lambda archs: predictor.mean_over(archs, scs),
                          cfg, rng, basic)
        if cfg.transfer_budgets:
            basic = found[b][0]
    picks = {s.key: found[s.budget] for s in setup.scenarios}
    return picks, {"evolution_s": round(time.perf_counter() - t0, 3)}

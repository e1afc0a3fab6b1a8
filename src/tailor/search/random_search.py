"""Random search: for each budget, random architectures within it, the best per superclass by
supernet validation accuracy.

The same candidates serve every superclass at a budget (one evaluation scores all superclasses),
so the comparison with the other methods spends the same kind of evaluations.
"""
from __future__ import annotations

import random
import time

from tailor.config import RandomSearchConfig
from tailor.search.common import Setup, sample_within
from tailor.space import Arch
from tailor.utils import fingerprint


def run_random(setup: Setup, cfg: RandomSearchConfig, seed: int) -> tuple[dict[str, Arch], dict]:
    """({scenario key: arch}, timing): uniform samples (rejection, then snapped into the window)."""
    t0 = time.perf_counter()
    candidates: dict[float, list[Arch]] = {}
    for b in sorted({s.budget for s in setup.scenarios}):
        rng = random.Random(fingerprint("random", seed, b))
        archs = [setup.snap(sample_within(setup.space, setup.cost, setup.snap, b, rng, cfg.max_tries), b)
                 for _ in range(cfg.samples)]
        candidates[b] = list(dict.fromkeys(archs))
    t1 = time.perf_counter()
    picks = {}
    for s in setup.scenarios:
        # max() keeps the first of equals: ties go to the earlier sample, deterministically.
        picks[s.key] = max(candidates[s.budget], key=lambda a: setup.evaluator.acc(a, s.superclass))
    t2 = time.perf_counter()
    return picks, {"sample_s": round(t1 - t0, 4), "select_s": round(t2 - t1, 3)}

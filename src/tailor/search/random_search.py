"""Random search: for each budget, `samples` random architectures within it, the best per
superclass by supernet validation accuracy.

The same candidates serve every superclass at a budget; scoring one on one superclass is one
evaluation, so a scenario spends `samples` evaluations (search.evaluations).
"""
from __future__ import annotations

import random
import time

from tailor.config import RandomSearchConfig
from tailor.search.common import Setup, sample_within
from tailor.space import Arch
from tailor.utils import fingerprint


def run_random(setup: Setup, cfg: RandomSearchConfig, seed: int, samples: int) -> tuple[dict[str, Arch], dict]:
    """({scenario key: arch}, timing): uniform samples (rejection, then snapped into the window)."""
    t0 = time.perf_counter()
    candidates: dict[float, list[Arch]] = {}
    for b in sorted({s.budget for s in setup.scenarios}):
        rng = random.Random(fingerprint("random", seed, b))
        # Distinct candidates, so that every scenario spends its full `samples` evaluations.
        found: dict[Arch, None] = {}
        for _ in range(20 * samples):
            if len(found) == samples:
                break
            found[setup.snap(sample_within(setup.space, setup.cost, setup.snap, b, rng, cfg.max_tries), b)] = None
        candidates[b] = list(found)
    t1 = time.perf_counter()
    picks = {}
    for s in setup.scenarios:
        # max() keeps the first of equals: ties go to the earlier sample, deterministically.
        picks[s.key] = max(candidates[s.budget], key=lambda a: setup.evaluator.acc(a, s.superclass))
    t2 = time.perf_counter()
    return picks, {"sample_s": round(t1 - t0, 4), "select_s": round(t2 - t1, 3)}

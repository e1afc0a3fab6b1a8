"""Confidence intervals for the comparisons the report makes (tailored vs stock, image by image)."""
from __future__ import annotations

import numpy as np


def as_hits(correct: str) -> np.ndarray:
    """The '0'/'1' string `train.evaluate(per_image=True)` writes -> a float array of 0s and 1s."""
    return np.frombuffer(correct.encode(), dtype=np.uint8).astype(np.float64) - ord("0")


def paired_bootstrap(groups: list[tuple[np.ndarray, np.ndarray]], resamples: int = 2000, seed: int = 0,
                     level: float = 0.95, keys: list | None = None) -> dict:
    """Mean over groups of mean(a) - mean(b), with a percentile bootstrap CI.

    Each group is one comparison on one set of test images (a scenario's superclass): `a[i]` and
    `b[i]` are two models' hits on the same image i. Images are resampled with replacement within
    each group, the same indices for both models (paired), so the CI reflects which images the
    test set happens to hold, not the models' training noise. Groups with the same key (e.g. one
    superclass at two budgets) are the same images: they share their resample indices, otherwise
    the CI would treat them as independent samples and come out too narrow.
    Returns diff, lo, hi, n_images.
    """
    if not groups:
        raise ValueError("paired_bootstrap: no groups")
    keys = list(range(len(groups))) if keys is None else list(keys)
    if len(keys) != len(groups):
        raise ValueError(f"paired_bootstrap: {len(keys)} keys for {len(groups)} groups")
    for (a, b), k in zip(groups, keys):
        if len(a) != len(b) or len(a) == 0:
            raise ValueError(f"paired_bootstrap: paired hit vectors need equal, non-zero lengths, got {len(a)}, {len(b)}")
        if len(a) != len(groups[keys.index(k)][0]):
            raise ValueError(f"paired_bootstrap: groups of key {k!r} have different numbers of images")
    rng = np.random.default_rng(seed)
    diff = float(np.mean([a.mean() - b.mean() for a, b in groups]))
    boots = np.zeros(resamples)
    indices: dict = {}
    for (a, b), k in zip(groups, keys):
        d = a - b
        if k not in indices:
            indices[k] = rng.integers(0, len(d), size=(resamples, len(d)))
        boots += d[indices[k]].mean(axis=1)
    boots /= len(groups)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "n_images": int(sum(len(a) for a, _ in groups)),
            "resamples": resamples, "level": level}


# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96 is
# within 2%): the few seeds a search comparison runs make the normal interval far too narrow.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def mean_ci(values: list[float]) -> dict:
    """Mean with a 95% Student-t interval (n, mean, lo, hi; lo and hi None for one value)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_ci: no values")
    mean = float(v.mean())
    if v.size == 1:
        return {"n": 1, "mean": mean, "lo": None, "hi": None}
    t = _T975[v.size - 2] if v.size - 1 <= len(_T975) else 1.96
    half = t * float(v.std(ddof=1)) / np.sqrt(v.size)
    return {"n": int(v.size), "mean": mean, "lo": mean - half, "hi": mean + half}


def kendall_tau(a, b) -> float:
    """Kendall's tau-b (ties counted in neither concordant nor discordant pairs)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    i, j = np.triu_indices(len(a), 1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    s = float((da * db).sum())
    denom = float(np.sqrt(float((da != 0).sum()) * float((db != 0).sum())))
    return s / denom if denom else 0.0  # a Python float: it goes into weights-only checkpoints


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks from 0, tied values sharing their average rank."""
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v), dtype=np.float64)
    for x in np.unique(v):
        tied = v == x
        if tied.sum() > 1:
            r[tied] = r[tied].mean()
    return r


def spearman_rho(a, b) -> float:
    """Spearman's rank correlation: Pearson's r of the (average-tie) ranks."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom else 0.0


def rank_agreement(a, b, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Kendall tau and Spearman rho of two scorings of the same items, with percentile bootstrap CIs.

    Items (architectures) are resampled with replacement, the same indices for both scorings, so
    the CI reflects which architectures the benchmark happened to draw.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b) or len(a) < 3:
        raise ValueError(f"rank_agreement: needs two equal-length scorings of >= 3 items, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    taus = np.array([kendall_tau(a[k], b[k]) for k in idx])
    rhos = np.array([spearman_rho(a[k], b[k]) for k in idx])
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    return {"n": int(len(a)), "kendall_tau": kendall_tau(a, b), "kendall_tau_ci": [float(x) for x in np.quantile(taus, q)],
            "spearman_rho": spearman_rho(a, b), "spearman_rho_ci": [float(x) for x in np.quantile(rhos, q)],
            "resamples": resamples, "level": level}


def tau_difference(a, b, truth, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Kendall tau of scoring `a` minus that of scoring `b`, both against `truth`, on the same items;
    paired percentile bootstrap (one resample of items serves both), so a shared draw of easy or
    hard architectures cancels out of the difference."""
    a, b, truth = (np.asarray(v, dtype=np.float64) for v in (a, b, truth))
    if not len(a) == len(b) == len(truth) or len(a) < 3:
        raise ValueError(f"tau_difference: needs three equal-length scorings of >= 3 items, got "
                         f"{len(a)}, {len(b)}, {len(truth)}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    diffs = np.array([kendall_tau(a[k], truth[k]) - kendall_tau(b[k], truth[k]) for k in idx])
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff": kendall_tau(a, truth) - kendall_tau(b, truth), "lo": float(lo), "hi": float(hi),
            "resamples": resamples, "level": level}

"""Shared fixtures: tiny params, and one tiny trained pipeline (data, teacher, supernet) per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tailor.config import load_params

# Tests run beside other jobs on 2 shared cores: oversubscribed OpenMP threads spin-wait and made
# small forward passes ~15x slower than one thread does.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
TINY = Path(__file__).with_name("tiny.yaml")
TIN_SC10 = ROOT.parent / "shared" / "data" / "tin-sc10.zip"


def arch_changes(a, b) -> list[int]:
    """Primitives changed per unit between two Archs: a depth change counts once (kept blocks must be
    unchanged). EAT-NAS's perturbation changes exactly one per unit."""
    out = []
    for ua, ub in zip(a.units, b.units):
        n = int(len(ua) != len(ub))
        for (ka, ea), (kb, eb) in zip(ua, ub):
            n += (ka != kb) + (ea != eb)
        out.append(n)
    return out


def tiny_params(**overrides):
    """params.yaml + tests/tiny.yaml + nested `overrides`."""
    return load_params(ROOT / "params.yaml", [TINY], overrides or None)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """prepare-data, train-teacher and train-supernet on tiny params, once per test session.

    Returns a dict of paths: params (the Params object), data, teacher, supernet, root.
    Tests must not modify these files.
    """
    from tailor import stages

    root = tmp_path_factory.mktemp("tiny_run")
    p = tiny_params()
    stages.prepare_data(p, root / "data", root / "metrics" / "data.json")
    stages.train_teacher(p, root / "data", root / "teacher.pt", root / "metrics" / "teacher.json", root / "runs" / "t")
    stages.train_supernet(p, root / "data", root / "teacher.pt", root / "supernet.pt",
                          root / "metrics" / "supernet.json", root / "runs" / "s")
    return {"params": p, "root": root, "data": root / "data", "teacher": root / "teacher.pt",
            "supernet": root / "supernet.pt"}

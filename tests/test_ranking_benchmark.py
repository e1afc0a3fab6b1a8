"""benchmarks/ranking.py end to end on the tiny overlay: stand-alone cache, one variant, the table;
and the architecture spread it ranks."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import ROOT, TINY, tiny_params

from tailor.space import SearchSpace


@pytest.fixture()
def ranking(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("ranking_bench", ROOT / "benchmarks" / "ranking.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(mod, "RESULTS_MD", tmp_path / "RESULTS.md")
    return mod


def test_selected_architectures_spread_over_the_cost_range(ranking):
    p = tiny_params()
    space = SearchSpace(p.space, p.data.image_size)
    archs = ranking.select_archs(space, 6, 20, seed=0)
    madds = [space.madds(a, 6) for a in archs]
    assert len({str(a) for a in archs}) == 20 and madds == sorted(madds)
    assert {space.min_arch, space.mid_arch, space.max_arch} <= set(archs)
    gaps = [b - a for a, b in zip(madds, madds[1:])]
    assert max(gaps) < 3 * (madds[-1] - madds[0]) / 19  # no stretch of the range left empty
    assert archs == ranking.select_archs(space, 6, 20, seed=0)


@pytest.mark.slow
def test_standalone_cache_variant_and_table(ranking, tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ranking.py"])
    common = ["--preset", str(TINY), "--work", str(tmp_path / "w"), "--data", str(tiny_run["data"]),
              "--data-name", "tiny"]
    ranking.main(["standalone", *common, "--archs", "5"])
    sa = json.loads((tmp_path / "results" / "ranking-standalone-tiny.json").read_text())
    assert len(sa["results"]) == 5
    first = {k: v["train_seconds"] for k, v in sa["results"].items()}
    ranking.main(["standalone", *common, "--archs", "5"])  # cached: nothing retrained
    again = json.loads((tmp_path / "results" / "ranking-standalone-tiny.json").read_text())
    assert {k: v["train_seconds"] for k, v in again["results"].items()} == first

    # A second training seed of the same architectures, in two shards side by side: the ground
    # truth's own noise, and a mean over seeds to score against.
    with pytest.raises(SystemExit, match="--truth"):  # would replace the preset seed's figures
        ranking.main(["standalone", *common, "--archs", "5", "--seed", "1"])
    for shard in ("0/2", "1/2"):
        ranking.main(["standalone", *common, "--archs", "5", "--seed", "1", "--truth", "s1", "--shard", shard])
    s1 = json.loads((tmp_path / "results" / "ranking-standalone-tiny-s1.json").read_text())
    assert sorted(s1["results"]) == sorted(sa["results"]) and s1["recipe"]["seed"] == 1
    assert [s1["results"][a]["test_sc_top1_mean"] for a in sorted(sa["results"])] != \
        [sa["results"][a]["test_sc_top1_mean"] for a in sorted(sa["results"])]  # trained anew
    both = ranking.load_truth("tiny", "default+s1")
    a = sorted(sa["results"])[0]
    assert both["results"][a]["test_sc_top1_mean"] == pytest.approx(
        (sa["results"][a]["test_sc_top1_mean"] + s1["results"][a]["test_sc_top1_mean"]) / 2)

    ranking.main(["variant", *common, "--name", "base", "--quiet-load", "1000"])
    res = json.loads((tmp_path / "results" / "ranking-tiny-base.json").read_text())
    g = res["ranking"]
    assert g["n"] == 5 and -1 <= g["kendall_tau"] <= 1
    assert g["kendall_tau_ci"][0] <= g["kendall_tau"] <= g["kendall_tau_ci"][1]
    assert [r["standalone"] for r in res["archs"]] == [sa["results"][r["arch"]]["test_sc_top1_mean"]
                                                      for r in res["archs"]]
    md = (tmp_path / "RESULTS.md").read_text()
    sampler = tiny_params().supernet.sampler  # the tiny overlay keeps params.yaml's recipe
    assert "## Supernet ranking: tiny" in md and f"| base | 0 | {sampler} | no | no | 0.5 |" in md

    # A second training seed of the same recipe: its own file, the preset's data split, one row.
    ranking.main(["variant", *common, "--name", "base", "--seed", "1", "--quiet-load", "1000"])
    s1 = json.loads((tmp_path / "results" / "ranking-tiny-base-s1.json").read_text())
    assert (s1["seed"], s1["params"]["seed"], s1["name"]) == (1, 1, "base")
    assert s1["subnets"]["max"]["test_correct"] != res["subnets"]["max"]["test_correct"]  # trained anew
    assert [r["arch"] for r in s1["archs"]] == [r["arch"] for r in res["archs"]]
    md = (tmp_path / "RESULTS.md").read_text()
    assert f"| base | 0, 1 | {sampler} | no | no | 0.5 |" in md and "| base | 1 |" not in md

    ranking.main(["table", "--data-name", "tiny", "--truth", "default+s1"])
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## Supernet ranking: tiny, stand-alone mean of default, s1" in md
    assert "each at training seeds 0, 1" in md and "The ground truth's own noise" in md


def _run(name: str, seed: int, tau: float, min_acc: float) -> dict:
    return {"name": name, "seed": seed, "date": f"2026-01-0{seed + 1}", "ranking": {"kendall_tau": tau},
            "subnets": {"min": {"test_sc_top1_mean": min_acc}}}


def test_recipe_differences_are_paired_by_seed(ranking):
    from tailor.stats import mean_ci

    x = ranking.group([_run("x", s, t, a) for s, t, a in [(0, 0.3, 0.40), (1, 0.5, 0.42), (2, 0.1, 0.41)]])["x"]
    y = ranking.group([_run("y", s, t, a) for s, t, a in [(0, 0.2, 0.41), (1, 0.1, 0.40), (2, 0.3, 0.40), (3, 0.9, 0.5)]])["y"]
    d = mean_ci([0.1, 0.4, -0.2])  # seed 3 ran only for y: left out
    assert ranking.over_seeds(x, y, None, ranking._tau) == \
        f"{d['mean']:+.3f} [{d['lo']:+.2f}, {d['hi']:+.2f}] (3 seeds)"
    m = mean_ci([-1.0, 2.0, 1.0])
    assert ranking.over_seeds(x, y, None, ranking._min_acc, 1, " points") == \
        f"{m['mean']:+.1f} [{m['lo']:+.1f}, {m['hi']:+.1f}] points (3 seeds)"
    # One common seed: the per-run (bootstrap) comparison it is given, labelled as such.
    assert ranking.over_seeds({0: x[0]}, y, lambda a, b: f"{a['seed']}-{b['seed']}", ranking._tau) == "0-0 (1 seed)"
    assert ranking.over_seeds({5: x[0]}, y, None, ranking._tau) == "-"

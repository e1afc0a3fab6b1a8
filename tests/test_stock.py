"""Stock anchors and the tailored-vs-stock comparison: torchvision builds them, the same loop trains
them, MAdds agree with torchvision's own figures, the bootstrap CI has the known answers, the
headline picks stock by validation at <= cost, and the report shows it all (with pictures)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torchvision
from conftest import tiny_params

from tailor.config import ParamsError, StockModel
from tailor.headline import best_stock, scenario_rows, summary
from tailor.nets import count_madds
from tailor.stats import as_hits, paired_bootstrap
from tailor.stock import build


# ---------------------------------------------------------------- the family
@pytest.mark.parametrize("arch, ops", [("mobilenet_v3_large", 0.217), ("mobilenet_v3_small", 0.057)])
def test_hook_count_matches_torchvisions_published_madds(arch, ops):
    """torchvision states each model's GMAdds at 224x224 for 1000 classes (weights meta `_ops`); the
    project's hook counter, which scores stock and tailored nets alike, must agree to its rounding."""
    assert torchvision.models.get_model_weights(arch).DEFAULT.meta["_ops"] == ops
    net = build(StockModel(arch=arch, width=1.0), 1000)
    assert abs(count_madds(net, 224) / 1e9 - ops) < 0.0005


def test_stock_nets_are_torchvisions_own_at_the_width_asked():
    small = build(StockModel(arch="mobilenet_v3_small", width=0.5), 7)
    assert isinstance(small, torchvision.models.MobileNetV3)
    assert small.classifier[-1].out_features == 7
    full = build(StockModel(arch="mobilenet_v3_small", width=1.0), 7)
    assert small.features[1].block[0][0].out_channels < full.features[1].block[0][0].out_channels
    assert count_madds(small, 32) < count_madds(full, 32)


# ---------------------------------------------------------------- params
def test_stock_must_train_at_least_the_spines_epochs():
    with pytest.raises(ParamsError, match=r"stock\.epochs"):
        tiny_params(stock={"epochs": 1})
    with pytest.raises(ParamsError, match=r"stock\.specialist_epochs"):
        tiny_params(stock={"specialist_epochs": 1})
    p = tiny_params(teacher={"epochs": 3})  # null follows the spine
    assert p.stock_epochs() == p.stock_epochs(specialist=True) == 3 + sum(ph.epochs for ph in p.supernet.phases)
    assert tiny_params(stock={"epochs": 9}).stock_epochs() == 9


def test_untrained_teacher_needs_inplace_distillation():
    with pytest.raises(ParamsError, match=r"teacher\.epochs.*kd_source"):
        tiny_params(teacher={"epochs": 0})
    p = tiny_params(teacher={"epochs": 0}, supernet={"kd_source": "inplace", "sampler": "sandwich",
                                                     "subnets_per_step": 2})
    assert p.teacher.epochs == 0


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_known_answers():
    same = np.array([1.0, 0, 1, 1, 0, 1])
    r = paired_bootstrap([(same, same)])
    assert r["diff"] == r["lo"] == r["hi"] == 0.0
    r = paired_bootstrap([(np.ones(50), np.zeros(50))])
    assert r["diff"] == r["lo"] == r["hi"] == 1.0
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap([(np.ones(3), np.ones(4))])


def test_bootstrap_ci_matches_the_normal_approximation():
    """Independent hits at 60% and 50% on 4,000 images: the paired difference d in {-1, 0, 1} has
    variance 0.6 + 0.5 - 2 * 0.3 - 0.01 = 0.49, so the 95% CI is 0.1 +- 1.96 * 0.7 / sqrt(4000)."""
    rng = np.random.default_rng(1)
    a = (rng.random(4000) < 0.6).astype(float)
    b = (rng.random(4000) < 0.5).astype(float)
    r = paired_bootstrap([(a, b)], resamples=4000, seed=3)
    half = 1.96 * np.std(a - b) / np.sqrt(4000)
    assert r["lo"] < r["diff"] < r["hi"]
    assert abs((r["hi"] - r["lo"]) / 2 - half) < 0.1 * half
    assert abs(r["diff"] - (a.mean() - b.mean())) < 1e-12


def test_bootstrap_groups_on_the_same_images_share_their_resamples():
    """One superclass at two budgets: the same test images, so not two independent samples. With a
    shared key two copies of a group give exactly the CI of one; as independent keys it would shrink."""
    rng = np.random.default_rng(0)
    a, b = (rng.random(300) < 0.7).astype(float), (rng.random(300) < 0.6).astype(float)
    one = paired_bootstrap([(a, b)], seed=5)
    shared = paired_bootstrap([(a, b), (a, b)], seed=5, keys=["sc", "sc"])
    apart = paired_bootstrap([(a, b), (a, b)], seed=5, keys=["sc", "other"])
    assert (shared["lo"], shared["hi"]) == pytest.approx((one["lo"], one["hi"]))
    assert apart["hi"] - apart["lo"] < 0.85 * (shared["hi"] - shared["lo"])
    with pytest.raises(ValueError, match="different numbers of images"):
        paired_bootstrap([(a, b), (a[:5], b[:5])], keys=["sc", "sc"])


def test_bootstrap_over_groups_averages_group_means():
    """Two scenarios of different sizes weigh equally, as a mean over scenarios does."""
    g1 = (np.ones(10), np.zeros(10))       # +1
    g2 = (np.zeros(1000), np.zeros(1000))  # 0
    assert paired_bootstrap([g1, g2])["diff"] == pytest.approx(0.5)


# ---------------------------------------------------------------- headline
def _stock(**val):
    def model(madds, val_acc, hits):
        return {"madds": madds, "madds_by_superclass": {"a": madds}, "val_sc_top1_mean": val_acc,
                "test_sc_top1": {"a": as_hits(hits).mean()}, "test_sc_top1_mean": as_hits(hits).mean(),
                "test_correct": {"a": hits}, "ort_cpu_latency_ms": {"batch_1": madds / 1e6}}
    return {"models": {"cheap": model(1e6, val.get("cheap", 0.5), "1100"),
                       "mid_good_on_test": model(2e6, val.get("mid", 0.4), "1111"),
                       "dear": model(9e6, 0.9, "1111")},
            "specialists": {"a": {"name": "spec_a", "madds": 1e6, "test_sc_top1_mean": 0.25,
                                  "test_correct": {"a": "1000"}}}}


def test_best_stock_is_chosen_by_validation_among_nets_within_cost():
    stock = _stock(cheap=0.5, mid=0.4)
    name, _ = best_stock(stock, lambda m: m["madds"] <= 3e6)
    assert name == "cheap"  # better on val, although mid_good_on_test is better on test
    assert best_stock(stock, lambda m: m["madds"] <= 0.5e6) is None


def test_scenario_rows_compare_on_the_same_images():
    stock = _stock(cheap=0.5, mid=0.6)
    retrain = {"superclass": "a", "budget": 3e6, "arch": "x", "madds": 3e6, "test_top1": 0.75,
               "test_correct": "1110"}
    export = {"models": {"a__3000000": {"superclass": "a", "budget": 3e6, "ort_cpu_latency_ms": {"batch_1": 1.5}}}}
    (row,) = scenario_rows(stock, [retrain], export)
    assert row["stock_madds"]["name"] == "mid_good_on_test"
    assert row["stock_madds"]["diff"] == pytest.approx(0.75 - 1.0)
    assert row["stock_madds"]["cost_ratio"] == pytest.approx(1.5)
    stock2 = _stock(cheap=0.7, mid=0.6)  # the best at <= cost is now the cheap one; the dearest is still mid
    (row2,) = scenario_rows(stock2, [retrain], export)
    assert row2["stock_madds"]["name"] == "cheap" and row2["stock_equal_cost"]["name"] == "mid_good_on_test"
    assert row2["stock_equal_cost"]["diff"] == pytest.approx(0.75 - 1.0)
    assert row["stock_latency"]["name"] == "cheap"  # only it is at <= 1.5 ms
    assert row["stock_latency"]["diff"] == pytest.approx(0.75 - 0.5)
    assert row["specialist"]["diff"] == pytest.approx(0.5)
    s = summary(stock, [retrain], export)
    assert s["stock_madds"]["scenarios"] == 1 and s["stock_madds"]["diff"] == pytest.approx(-0.25)


# ---------------------------------------------------------------- the stage, on the tiny data
@pytest.fixture(scope="module")
def stock_run(tiny_run, tmp_path_factory):
    from tailor import stages

    root = tmp_path_factory.mktemp("stock")
    p = tiny_run["params"]
    metrics = stages.train_stock(p, tiny_run["data"], root / "stock", root / "metrics" / "stock.json", root / "work")
    return {"root": root, "metrics": metrics, "params": p}


def test_train_stock_trains_and_scores_every_anchor(stock_run, tiny_run):
    from tailor.data import Meta, load_split

    m, p = stock_run["metrics"], stock_run["params"]
    meta = Meta.load(tiny_run["data"])
    _, y = load_split(tiny_run["data"], "test")
    (name,) = m["models"]
    g = m["models"][name]
    assert name == "mobilenet_v3_small_w0.25" and g["epochs"] == p.stock_epochs() == len(g["history"])
    assert g["madds"] == count_madds(build(p.stock.models[0], len(meta.classes)), meta.image_size)
    for i, sc in enumerate(meta.superclasses):
        n_sc = int(np.isin(y, meta.classes_of(i)).sum())
        assert len(g["test_correct"][sc]) == n_sc
        assert g["test_sc_top1"][sc] == pytest.approx(as_hits(g["test_correct"][sc]).mean(), abs=1e-5)
        spec = m["specialists"][sc]
        assert spec["classes"] == meta.classes_of(i) and len(spec["test_correct"][sc]) == n_sc
        assert spec["train_images"] < g["train_images"]
    assert set(g["ort_cpu_latency_ms"]) == {f"batch_{b}" for b in p.export.latency_batch_sizes}
    assert (stock_run["root"] / "stock" / f"{name}.pt").is_file()


def test_train_stock_resumes_finished_networks(stock_run, tiny_run, capfd):
    from tailor import stages

    root = stock_run["root"]
    again = stages.train_stock(stock_run["params"], tiny_run["data"], root / "stock2", root / "m2.json", root / "work")
    assert "done earlier" in capfd.readouterr().err
    assert again["models"] == stock_run["metrics"]["models"]


def test_train_stock_resumes_after_a_kill(tiny_run, tmp_path, monkeypatch):
    """Killed after epoch 1 of the first network, then run again: the same result as uninterrupted."""
    from tailor import stages

    p = tiny_params(stock={"specialist": None})
    whole = stages.train_stock(p, tiny_run["data"], tmp_path / "a", tmp_path / "a.json", tmp_path / "wa")
    monkeypatch.setenv("TAILOR_STOP_AFTER_EPOCH", "1")
    with pytest.raises(KeyboardInterrupt):
        stages.train_stock(p, tiny_run["data"], tmp_path / "b", tmp_path / "b.json", tmp_path / "wb")
    monkeypatch.delenv("TAILOR_STOP_AFTER_EPOCH")
    resumed = stages.train_stock(p, tiny_run["data"], tmp_path / "b", tmp_path / "b.json", tmp_path / "wb")
    strip = lambda m: {k: v for k, v in m.items() if k not in ("history", "train_seconds", "ort_cpu_latency_ms")}  # noqa: E731
    assert [strip(v) for v in resumed["models"].values()] == [strip(v) for v in whole["models"].values()]


def test_report_shows_the_headline_and_the_pictures(stock_run, tiny_run, tmp_path):
    """Retrain one scenario, then the report: headline row, stock section, PNGs and dvc plot data."""
    from tailor import stages
    from tailor.space import Arch

    p = tiny_run["params"]
    metrics = tmp_path / "metrics"
    for f in ("supernet", "teacher"):
        (metrics).mkdir(exist_ok=True)
        (metrics / f"{f}.json").write_bytes((tiny_run["root"] / "metrics" / f"{f}.json").read_bytes())
    (metrics / "stock.json").write_bytes((stock_run["root"] / "metrics" / "stock.json").read_bytes())
    sc = p.retrain.scenarios[0]
    stages.retrain(p, tiny_run["data"], tiny_run["supernet"], sc.superclass, sc.budget, Arch.parse(sc.arch),
                   tmp_path / "m.pt", metrics / "retrain" / "a.json", tmp_path / "w")
    out = tmp_path / "reports" / "report.md"
    summ = stages.report(p, metrics, tmp_path / "none.md", out, tmp_path / "summary.json")
    text = out.read_text()
    assert text.index("## Headline") < text.index("## Teacher")
    assert "## Stock anchors" in text and "mobilenet_v3_small_w0.25" in text
    assert "![accuracy vs MAdds](plots/pareto-madds.png)" in text
    assert summ["headline"]["stock_madds"] is None or summ["headline"]["stock_madds"]["scenarios"] == 1
    assert summ["headline"]["specialist"]["scenarios"] == 1
    png = out.parent / "plots" / "pareto-madds.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((out.parent / "plots" / "pareto.json").read_text())
    kinds = {r["kind"] for r in rows}
    assert {"supernet subnet (test)", "retrained tailored (test)", "stock generalist (test)",
            "stock specialist (test)"} <= kinds
    curves = {f.stem: json.loads(f.read_text()) for f in (out.parent / "plots" / "training").glob("*.json")}
    assert {"teacher", "supernet", "stock-mobilenet_v3_small_w0.25", "retrain-sc0@300000"} <= set(curves)
    assert all("epoch" in c and "loss" in c for rows in curves.values() for c in rows)
    assert oct(os.stat(png).st_mode & 0o777) == "0o644"

"""The comparison the project exists for: tailored networks against stock ones, at equal or lower cost.

Pure functions over the stages' metrics files (metrics/stock.json, metrics/retrain/*.json,
metrics/supernet.json, metrics/export.json), so the report and the benchmarks compute it one way.

- Which stock net: the best by *validation* accuracy among stock generalists whose cost (MAdds
  with the classifier sliced to the superclass, as deployed; or measured onnxruntime latency) is
  at most the tailored net's. Test only scores.
- The difference: tailored minus stock test top-1 on the same test images of the superclass, in
  points, with a paired bootstrap CI over those images (tailor.stats).
"""
from __future__ import annotations

from tailor.config import same_budget
from tailor.stats import as_hits, paired_bootstrap


def _latency_ms(export: dict | None, superclass: str, budget: float) -> float | None:
    for m in (export or {}).get("models", {}).values():
        if m["superclass"] == superclass and same_budget(m["budget"], budget):
            return m.get("ort_cpu_latency_ms", {}).get("batch_1")
    return None


def best_stock(stock: dict, fits) -> tuple[str, dict] | None:
    """(name, metrics) of the stock generalist with the best val accuracy among those `fits` accepts."""
    ok = [(n, m) for n, m in stock["models"].items() if fits(m)]
    return max(ok, key=lambda nm: (nm[1]["val_sc_top1_mean"], -nm[1]["madds"])) if ok else None


def _compare(hits, other_hits, seed: int) -> dict:
    return paired_bootstrap([(hits, other_hits)], seed=seed)


def scenario_rows(stock: dict, retrains: list[dict], export: dict | None, seed: int = 0) -> list[dict]:
    """One row per retrained scenario: the tailored net beside the best stock at <= MAdds, the dearest
    stock at <= MAdds (the same cost class), the best stock at <= latency, and the specialist."""
    rows = []
    for r in retrains:
        sc = r["superclass"]
        if "test_correct" not in r:
            continue
        hits = as_hits(r["test_correct"])
        row = {"superclass": sc, "budget": r["budget"], "budget_unit": r.get("budget_unit", "MAdds"),
               "arch": r["arch"], "madds": r["madds"], "test_top1": r["test_top1"],
               "latency_ms": _latency_ms(export, sc, r["budget"])}
        within = [(n, m) for n, m in stock["models"].items() if m["madds_by_superclass"][sc] <= r["madds"]]
        if within:  # the dearest stock net within the budget: the same cost class, whether or not it is the best
            name, m = max(within, key=lambda nm: nm[1]["madds_by_superclass"][sc])
            row["stock_equal_cost"] = {"name": name, "madds": m["madds_by_superclass"][sc],
                                       "test_top1": m["test_sc_top1"][sc],
                                       "cost_ratio": r["madds"] / m["madds_by_superclass"][sc],
                                       **_compare(hits, as_hits(m["test_correct"][sc]), seed)}
        by_madds = best_stock(stock, lambda m: m["madds_by_superclass"][sc] <= r["madds"])
        if by_madds:
            name, m = by_madds
            row["stock_madds"] = {"name": name, "madds": m["madds_by_superclass"][sc], "test_top1": m["test_sc_top1"][sc],
                                  "cost_ratio": r["madds"] / m["madds_by_superclass"][sc],
                                  **_compare(hits, as_hits(m["test_correct"][sc]), seed)}
        if row["latency_ms"] is not None:
            by_lat = best_stock(stock, lambda m: m.get("ort_cpu_latency_ms", {}).get("batch_1", float("inf"))
                                <= row["latency_ms"])
            if by_lat:
                name, m = by_lat
                row["stock_latency"] = {"name": name, "latency_ms": m["ort_cpu_latency_ms"]["batch_1"],
                                        "test_top1": m["test_sc_top1"][sc],
                                        "cost_ratio": row["latency_ms"] / m["ort_cpu_latency_ms"]["batch_1"],
                                        **_compare(hits, as_hits(m["test_correct"][sc]), seed)}
        spec = stock.get("specialists", {}).get(sc)
        if spec:
            row["specialist"] = {"name": spec["name"], "madds": spec["madds"], "test_top1": spec["test_sc_top1_mean"],
                                 **_compare(hits, as_hits(spec["test_correct"][sc]), seed)}
        rows.append(row)
    return rows


def overall(rows: list[dict], stock: dict, retrains: list[dict], key: str, seed: int = 0) -> dict | None:
    """Mean over scenarios of tailored minus the `key` comparison of `rows` ('stock_madds',
    'stock_equal_cost', 'stock_latency', 'specialist'), CI by resampling test images within every scenario; wins and
    losses count the scenarios whose own CI excludes 0."""
    by_id = {(r["superclass"], r["budget"]): r for r in retrains}
    groups, keys, wins, losses = [], [], 0, 0
    for row in rows:
        c = row.get(key)
        if not c:
            continue
        r = by_id[(row["superclass"], row["budget"])]
        sc = row["superclass"]
        other = stock["specialists"][sc] if key == "specialist" else stock["models"][c["name"]]
        groups.append((as_hits(r["test_correct"]), as_hits(other["test_correct"][sc])))
        keys.append(sc)  # one superclass at several budgets: the same test images
        wins += c["lo"] > 0
        losses += c["hi"] < 0
    if not groups:
        return None
    return {**paired_bootstrap(groups, seed=seed, keys=keys), "scenarios": len(groups), "wins": int(wins), "losses": int(losses)}


def summary(stock: dict, retrains: list[dict], export: dict | None, seed: int = 0) -> dict:
    rows = scenario_rows(stock, retrains, export, seed)
    return {"rows": rows, **{k: overall(rows, stock, retrains, k, seed)
                             for k in ("stock_madds", "stock_equal_cost", "stock_latency", "specialist")}}


def subnet_rows(stock: dict, supernet: dict, seed: int = 0) -> list[dict]:
    """Each supernet subnet (min / mid / max, all classes) against the best stock generalist at <= its MAdds,
    on every superclass's test images (mean over superclasses, as sc_top1_mean is)."""
    rows = []
    for name, s in supernet["subnets"].items():
        row = {"subnet": name, "madds": s["madds_m"] * 1e6, "test_top1": s["test_sc_top1_mean"]}
        best = best_stock(stock, lambda m: m["madds"] <= s["madds_m"] * 1e6)
        if best and "test_correct" in s:
            bn, m = best
            groups = [(as_hits(s["test_correct"][sc]), as_hits(m["test_correct"][sc])) for sc in s["test_correct"]]
            row["stock"] = {"name": bn, "madds": m["madds"], "test_top1": m["test_sc_top1_mean"],
                            **paired_bootstrap(groups, seed=seed)}
        rows.append(row)
    return rows

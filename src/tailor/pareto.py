"""Accuracy against cost, one panel per superclass: what the report shows and `dvc plots` renders.

`points(...)` gathers every network the DAG scored (supernet subnets, each search method's picks,
the retrained nets, stock generalists and specialists) as flat rows, written as JSON for
`dvc plots`; `plot_grid(...)` draws them as a PNG with Pillow (already a dependency).
"""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tailor.latency_plot import _nice_ticks, save_png

# kind -> (colour, filled, marker size): what a reader tells apart at a glance.
STYLE = {
    "supernet subnet (test)": ((127, 127, 127), True, 4),
    "search pick (supernet, test)": ((188, 189, 34), False, 3),
    "retrained tailored (test)": ((214, 39, 40), True, 6),
    "stock generalist (test)": ((31, 119, 180), True, 6),
    "stock specialist (test)": ((23, 190, 207), False, 6),
}


def points(supernet: dict | None, search: dict | None, retrains: list[dict], stock: dict | None,
           export: dict | None = None, lut: dict | None = None) -> list[dict]:
    """Rows {superclass, kind, name, madds_m, latency_ms, top1}. latency_ms: the LUT's prediction for
    architectures of the space, the measured onnxruntime time for stock nets (which no LUT covers)."""
    predict = None
    if lut is not None:
        from tailor.latency import latency_model, lut_space
        from tailor.space import Arch

        model, space = latency_model(lut), lut_space(lut)

        def predict(arch: str) -> float | None:
            try:
                return round(model.cost(space.validate(Arch.parse(arch))), 5)
            except ValueError:
                return None

    def lat(arch: str | None) -> float | None:
        return predict(arch) if predict and arch else None

    rows: list[dict] = []
    for name, s in (supernet or {}).get("subnets", {}).items():
        for sc, acc in s["test_sc_top1"].items():
            rows.append({"superclass": sc, "kind": "supernet subnet (test)", "name": name, "madds_m": s["madds_m"],
                         "latency_ms": lat(s["arch"]), "top1": acc})
    first_seed = ((search or {}).get("seeds") or [None])[0]
    for method, m in (search or {}).get("methods", {}).items():
        for r in m["rows"]:
            if r.get("seed", first_seed) != first_seed:  # one point per scenario: the run retrain uses
                continue
            rows.append({"superclass": r["superclass"], "kind": "search pick (supernet, test)", "name": method,
                         "madds_m": round(r["madds"] / 1e6, 4), "latency_ms": lat(r["arch"]),
                         "top1": r.get("test_acc", r["val_acc"])})
    for r in retrains:
        rows.append({"superclass": r["superclass"], "kind": "retrained tailored (test)", "name": f"@{r['budget']:g}",
                     "madds_m": round(r["madds"] / 1e6, 4), "latency_ms": lat(r["arch"]), "top1": r["test_top1"]})
    for name, m in (stock or {}).get("models", {}).items():
        for sc, acc in m["test_sc_top1"].items():
            rows.append({"superclass": sc, "kind": "stock generalist (test)", "name": name,
                         "madds_m": round(m["madds_by_superclass"][sc] / 1e6, 4),
                         "latency_ms": m.get("ort_cpu_latency_ms", {}).get("batch_1"), "top1": acc})
    for sc, m in (stock or {}).get("specialists", {}).items():
        rows.append({"superclass": sc, "kind": "stock specialist (test)", "name": m["name"],
                     "madds_m": round(m["madds"] / 1e6, 4), "latency_ms": None, "top1": m["test_sc_top1_mean"]})
    return rows


PANEL_W, PANEL_H = 330, 250
PAD_L, PAD_R, PAD_T, PAD_B = 48, 10, 24, 34


def plot_grid(rows: list[dict], x_key: str, x_label: str, title: str, path: str | Path, columns: int = 4) -> Path:
    """One scatter panel per superclass (x = x_key, y = top-1), a shared legend; atomic PNG write."""
    path = Path(path)
    rows = [r for r in rows if r.get(x_key) is not None]
    superclasses = list(dict.fromkeys(r["superclass"] for r in rows)) or ["(no data)"]
    cols = min(columns, len(superclasses))
    nrows = math.ceil(len(superclasses) / cols)
    legend_h = 22 * math.ceil(len(STYLE) / 3) + 10
    img = Image.new("RGB", (cols * PANEL_W, 36 + nrows * PANEL_H + legend_h), "white")
    d = ImageDraw.Draw(img)
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=11)
    d.text((img.width / 2, 8), title, fill="black", font=font, anchor="mt")
    xs = [r[x_key] for r in rows] or [0.0, 1.0]
    ys = [r["top1"] for r in rows] or [0.0, 1.0]
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = min(ys), max(ys)
    xpad, ypad = 0.05 * (xhi - xlo or 1.0), 0.05 * (yhi - ylo or 0.1)
    xlo, xhi, ylo, yhi = max(0.0, xlo - xpad), xhi + xpad, max(0.0, ylo - ypad), min(1.0, yhi + ypad)
    for n, sc in enumerate(superclasses):
        ox, oy = (n % cols) * PANEL_W, 36 + (n // cols) * PANEL_H
        x0, x1, y0, y1 = ox + PAD_L, ox + PANEL_W - PAD_R, oy + PANEL_H - PAD_B, oy + PAD_T

        def px(x: float, y: float) -> tuple[float, float]:
            return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y0 - (y - ylo) / (yhi - ylo) * (y0 - y1)

        for t in _nice_ticks(xlo, xhi, 4):
            gx, _ = px(t, ylo)
            d.line([(gx, y0), (gx, y1)], fill=(235, 235, 235))
            d.text((gx, y0 + 4), f"{t:g}", fill="black", font=small, anchor="mt")
        for t in _nice_ticks(ylo, yhi, 4):
            _, gy = px(xlo, t)
            d.line([(x0, gy), (x1, gy)], fill=(235, 235, 235))
            d.text((x0 - 4, gy), f"{100 * t:.0f}%", fill="black", font=small, anchor="rm")
        d.rectangle([x0, y1, x1, y0], outline="black")
        d.text(((x0 + x1) / 2, oy + 6), sc, fill="black", font=font, anchor="mt")
        d.text(((x0 + x1) / 2, y0 + 18), x_label, fill="black", font=small, anchor="mt")
        for kind, (colour, filled, r) in STYLE.items():  # legend order = drawing order: stock on top
            for row in rows:
                if row["superclass"] == sc and row["kind"] == kind:
                    cx, cy = px(row[x_key], row["top1"])
                    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour if filled else None, outline=colour,
                              width=2)
    ly = 36 + nrows * PANEL_H + 6
    for i, (kind, (colour, filled, _)) in enumerate(STYLE.items()):
        lx = 20 + (i % 3) * (img.width // 3)
        yy = ly + 22 * (i // 3)
        d.ellipse([lx, yy + 3, lx + 10, yy + 13], fill=colour if filled else None, outline=colour, width=2)
        d.text((lx + 16, yy + 8), kind, fill="black", font=small, anchor="lm")
    return save_png(img, path)

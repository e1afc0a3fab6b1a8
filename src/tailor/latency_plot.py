"""Predicted vs measured latency as a PNG, drawn with Pillow (already a dependency; no matplotlib)."""
from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tailor.utils import _tmp_beside

W, H = 760, 620
LEFT, RIGHT, TOP, BOTTOM = 80, 20, 56, 64
SERIES = [  # (rows of lut["networks"], y field, label, colour, filled)
    ("held_out", "predicted_ms", "held-out, calibrated", (214, 39, 40), True),
    ("calibration", "predicted_ms", "calibration set, calibrated", (31, 119, 180), True),
    ("held_out", "sum_ms", "held-out, plain sum of entries", (127, 127, 127), False),
]


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    step = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(step))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= step)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def plot_predicted_vs_measured(lut: dict, path: str | Path) -> Path:
    """Scatter of every measured subnet: x measured, y predicted, with y = x and a +-5% band."""
    path = Path(path)
    pts = [(r["measured_ms"], r[field], colour, filled, label)
           for key, field, label, colour, filled in SERIES for r in lut["networks"][key]]
    vals = [v for p in pts for v in p[:2]]
    lo, hi = min(vals), max(vals)
    pad = 0.05 * (hi - lo or hi or 1.0)
    lo, hi = max(0.0, lo - pad), hi + pad

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    x0, x1, y0, y1 = LEFT, W - RIGHT, H - BOTTOM, TOP  # y0 is the bottom edge in pixels

    def px(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - lo) / (hi - lo) * (x1 - x0), y0 - (y - lo) / (hi - lo) * (y0 - y1)

    for t in _nice_ticks(lo, hi):
        gx, gy = px(t, t)
        d.line([(gx, y0), (gx, y1)], fill=(235, 235, 235))
        d.line([(x0, gy), (x1, gy)], fill=(235, 235, 235))
        d.text((gx, y0 + 6), f"{t:g}", fill="black", font=small, anchor="mt")
        d.text((x0 - 6, gy), f"{t:g}", fill="black", font=small, anchor="rm")
    for f, colour in ((1.05, (200, 200, 200)), (0.95, (200, 200, 200)), (1.0, (80, 80, 80))):
        d.line([px(lo, lo * f), px(hi / f if f > 1 else hi, hi if f > 1 else hi * f)], fill=colour, width=1)
    d.rectangle([x0, y1, x1, y0], outline="black")
    for x, y, colour, filled, _ in pts:
        cx, cy = px(x, y)
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour if filled else None, outline=colour, width=2)

    v = lut["validation"]
    t = lut["target"]
    title = (f"{lut['target_name']} ({t['runtime']} {t['device']} {t['dtype']}, batch {t['batch_size']}, "
             f"{t['threads']} threads), {lut['image_size']}x{lut['image_size']}")
    d.text((W / 2, 8), title, fill="black", font=font, anchor="mt")
    d.text((W / 2, 28), f"held-out |error|: median {100 * v['held_out']['median']:.1f}%, p90 "
           f"{100 * v['held_out']['p90']:.1f}% ({v['method']}); plain sum median "
           f"{100 * v['plain_sum']['median']:.1f}%", fill="black", font=small, anchor="mt")
    d.text(((x0 + x1) / 2, H - 24), "measured whole network (ms)", fill="black", font=font, anchor="mt")
    label_img = Image.new("RGB", (260, 20), "white")
    ImageDraw.Draw(label_img).text((130, 10), "predicted (ms)", fill="black", font=font, anchor="mm")
    img.paste(label_img.rotate(90, expand=True), (8, int((y0 + y1) / 2 - 130)))
    ly = y1 + 8
    for _, _, label, colour, filled in SERIES:
        d.ellipse([x0 + 10, ly + 2, x0 + 18, ly + 10], fill=colour if filled else None, outline=colour, width=2)
        d.text((x0 + 24, ly + 6), label, fill="black", font=small, anchor="lm")
        ly += 18
    d.text((x0 + 24, ly + 6), "grey lines: y = x and +-5%", fill="black", font=small, anchor="lm")

    return save_png(img, path)


def save_png(img: Image.Image, path: Path) -> Path:
    """Write `img` as a PNG atomically (temporary name beside `path`, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

"""What every benchmark script shares: where results go, RESULTS.md sections, waiting for a quiet machine."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"


def upsert_section(path: Path, heading: str, body: str) -> None:
    """Replace the `## heading` section of a Markdown file (up to the next `## `), or append it."""
    from tailor.utils import atomic_write_text

    text = path.read_text() if path.exists() else "# Benchmark results\n\nOne section per benchmark; each script rewrites only its own.\n"
    lines = text.splitlines()
    title = f"## {heading}"
    section = [title, "", *body.strip("\n").splitlines(), ""]
    if title in lines:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section
    else:
        if lines and lines[-1].strip():
            lines.append("")
        lines += section
    atomic_write_text(path, "\n".join(lines).rstrip("\n") + "\n")


def wait_for_quiet(threshold: float, max_wait: float) -> tuple[bool, float]:
    """Wait (at most max_wait s) for the 1-minute load average to drop to threshold: (reached, seconds waited)."""
    t0 = time.monotonic()
    while os.getloadavg()[0] > threshold:
        if time.monotonic() - t0 > max_wait:
            return False, time.monotonic() - t0
        print(f"load {os.getloadavg()[0]:.2f} > {threshold}: waiting", file=sys.stderr, flush=True)
        time.sleep(20)
    return True, time.monotonic() - t0

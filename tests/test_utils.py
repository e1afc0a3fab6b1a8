"""Atomic writes: whole files or none, with the mode of an ordinary shared artifact."""
from __future__ import annotations

import stat

import pytest
import torch

from tailor.utils import atomic_dir, atomic_torch_save, atomic_write_json, atomic_write_text


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_are_readable_by_others(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "b.json", {"k": 1})
    atomic_torch_save({"t": torch.zeros(1)}, tmp_path / "c.pt")
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("y")
    assert [mode(tmp_path / n) for n in ("a.txt", "b.json", "c.pt", "d")] == [0o644, 0o644, 0o644, 0o755]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.pt", "d"]  # no temporaries left


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "a.txt", {"not json": object()})
    assert (tmp_path / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]

"""`tailor` CLI: stages listed, bad input -> exit 2 with one error line, stage commands write their outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY

STAGES = ("prepare-data", "train-teacher", "train-supernet")


def tailor(*args, cwd=None, env_extra=None, timeout=300):
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["COLUMNS"] = "200"  # rich wraps help text to the terminal width
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "tailor.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


def test_help_lists_the_stages():
    r = tailor("--help")
    assert r.returncode == 0, r.stderr
    for s in STAGES:
        assert s in r.stdout
    r = tailor()
    assert r.returncode in (0, 2) and "prepare-data" in r.stdout + r.stderr  # no_args_is_help


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "tailor"
    assert exe.exists()
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0 and "train-supernet" in r.stdout


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help_shows_default_paths_matching_dvc_yaml(stage):
    r = tailor(stage, "--help")
    assert r.returncode == 0, r.stderr
    cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    for tok in cmd.split():
        if "/" in tok and not tok.startswith("-"):
            assert tok in r.stdout, f"{stage}: default {tok} of dvc.yaml not in --help"


def write_params(tmp_path: Path, change) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    change(raw)
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw, sort_keys=False))
    return f


@pytest.mark.parametrize("change, field", [
    (lambda r: r["data"].update(val_fraction=2.0), "data.val_fraction"),
    (lambda r: r["supernet"].update(kd_wieght=1.0), "supernet.kd_wieght"),
    (lambda r: r["teacher"]["optim"].pop("lr"), "teacher.optim.lr"),
])
def test_bad_params_exit_2_with_one_line_naming_the_field(tmp_path, change, field):
    f = write_params(tmp_path, change)
    r = tailor("prepare-data", "--params", f, "--out", tmp_path / "out", "--metrics", tmp_path / "m.json")
    assert r.returncode == 2, r.stderr
    lines = error_lines(r)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("tailor: error:") and field in lines[0] and str(f) in lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_bad_preset_is_named(tmp_path):
    bad = tmp_path / "preset.yaml"
    bad.write_text("space: {kernels: [3, 4]}\n")
    r = tailor("prepare-data", "--params", ROOT / "params.yaml", "--preset", bad, "--out", tmp_path / "o")
    assert r.returncode == 2 and "space.kernels" in r.stderr and len(error_lines(r)) == 1, r.stderr
    r = tailor("prepare-data", "--params", ROOT / "params.yaml", "--preset", tmp_path / "nope.yaml")
    assert r.returncode == 2 and "nope.yaml: no such file" in r.stderr, r.stderr


def test_missing_params_file(tmp_path):
    r = tailor("prepare-data", cwd=tmp_path)
    assert r.returncode == 2 and "params.yaml: no such file" in r.stderr, r.stderr


def test_missing_data_dir_is_a_clear_error(tmp_path):
    r = tailor("train-teacher", "--params", ROOT / "params.yaml", "--preset", TINY, "--data", tmp_path / "nodata",
               "--out", tmp_path / "t.pt", "--metrics", tmp_path / "t.json", "--work-dir", tmp_path / "w")
    assert r.returncode == 2, r.stderr
    lines = error_lines(r)
    assert len(lines) == 1 and "nodata" in lines[0] and "prepare-data" in lines[0], r.stderr
    assert not (tmp_path / "t.pt").exists()


def test_missing_imagefolder_source_is_a_clear_error(tmp_path):
    f = write_params(tmp_path, lambda r: r["data"].update(source="imagefolder", path=str(tmp_path / "images.zip")))
    r = tailor("prepare-data", "--params", f, "--out", tmp_path / "out", "--metrics", tmp_path / "m.json")
    assert r.returncode == 2 and "images.zip: not a directory or a zip file" in r.stderr, r.stderr
    assert len(error_lines(r)) == 1


def test_missing_teacher_is_a_clear_error(tiny_run, tmp_path):
    r = tailor("train-supernet", "--params", ROOT / "params.yaml", "--preset", TINY, "--data", tiny_run["data"],
               "--teacher", tmp_path / "teacher.pt", "--out", tmp_path / "s.pt", "--work-dir", tmp_path / "w")
    assert r.returncode == 2 and "teacher.pt" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_unknown_option_is_a_usage_error():
    r = tailor("prepare-data", "--no-such-option")
    assert r.returncode == 2 and "no-such-option" in r.stderr


def test_prepare_data_command_writes_outputs(tmp_path):
    r = tailor("prepare-data", "--params", ROOT / "params.yaml", "--preset", TINY, "--out", tmp_path / "d",
               "--metrics", tmp_path / "m" / "data.json")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "m" / "data.json").read_text())
    assert m["classes"] == 6 and m["superclasses"] == 3 and m["source"] == "synthetic"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [".tailor-output", "meta.json", "test", "train", "val"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "m"]  # no temporary dirs left

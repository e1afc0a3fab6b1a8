"""Bad inputs through the CLI: one line naming the culprit, exit status 2, earlier outputs untouched;
checkpoints never run code (weights_only); a corrupt resume checkpoint is set aside."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, tiny_params
from test_train import cli_env, tailor_cmd


class _Crafted:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "payload": _Crafted(marker)}, path)
    return path


def test_a_crafted_pickle_would_run_code_with_weights_only_false(tmp_path):
    """The crafted file below is a real exploit: loading it the old way runs the command."""
    marker = tmp_path / "ran"
    f = crafted_checkpoint(tmp_path / "evil.pt", marker)
    code = f"import torch; torch.load({str(f)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)
    assert marker.exists()


def run_cli(*args, cwd=None):
    r = subprocess.run(tailor_cmd(*args), env=cli_env(), capture_output=True, text=True, timeout=300, cwd=cwd)
    return r


def assert_one_line_error(r, *culprits):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("tailor: error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    for c in culprits:
        assert str(c) in errors[0], (c, errors[0])
    return errors[0]


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[:4096])
    return dst


@pytest.fixture(scope="module")
def bad_files(tiny_run, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    other = tiny_params(space={"widths": [8, 12, 16, 20, 24]})
    from tailor import stages

    stages.train_teacher(other, tiny_run["data"], d / "other_teacher.pt", d / "m.json", d / "wt")
    (d / "text.pt").write_text("not a checkpoint\n")
    return {"marker": d / "ran", "crafted": crafted_checkpoint(d / "crafted.pt", d / "ran"),
            "truncated": _truncated(tiny_run["supernet"], d / "truncated.pt"), "text": d / "text.pt",
            "other_teacher": d / "other_teacher.pt"}


# (name, stage, the bad file's key in bad_files, the flag it goes to, what the message must name)
CASES = [
    ("crafted supernet", "search-random", "crafted", "--supernet", "supernet"),
    ("truncated supernet", "search-random", "truncated", "--supernet", "supernet"),
    ("text file as supernet", "search-random", "text", "--supernet", "supernet"),
    ("crafted teacher", "train-supernet", "crafted", "--teacher", "supernet"),
    ("teacher of another space", "train-supernet", "other_teacher", "--teacher", "teacher"),
    ("supernet as a retrained model", "export", "supernet", "--models", "'arch'"),
    ("crafted retrained model", "export", "crafted", "--models", "specialised model"),
]


def _args(stage: str, flag: str, bad: Path, tiny_run, out: Path) -> list:
    common = ["--params", ROOT / "params.yaml", "--preset", TINY, "--data", tiny_run["data"]]
    if stage == "search-random":
        return [stage, *common, "--out", out / "random.json", flag, bad]
    if stage == "train-supernet":
        return [stage, *common, "--out", out / "s.pt", "--metrics", out / "s.json", "--work-dir", out / "w", flag, bad]
    if stage == "export":
        return [stage, *common, "--repo", out / "triton", "--onnx-dir", out / "onnx", "--metrics", out / "e.json",
                flag, bad]
    raise AssertionError(stage)


@pytest.mark.parametrize("name,stage,key,flag,what", CASES, ids=[c[0] for c in CASES])
def test_bad_checkpoint_is_one_line_naming_it(tiny_run, bad_files, tmp_path, name, stage, key, flag, what):
    bad = tiny_run["supernet"] if key == "supernet" else bad_files[key]
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    r = run_cli(*_args(stage, flag, bad, tiny_run, out))
    line = assert_one_line_error(r, bad, what)
    if key == "crafted":
        assert "refused without running them" in line
    assert not bad_files["marker"].exists(), "loading a checkpoint ran code"
    assert sorted(p.name for p in out.iterdir()) == ["earlier.txt"], "a failed stage wrote outputs"
    assert (out / "earlier.txt").read_text() == "kept"


def test_a_corrupt_resume_checkpoint_is_set_aside_and_training_restarts(tiny_run, tmp_path):
    from tailor import stages

    p = tiny_params()
    work = tmp_path / "w"
    work.mkdir()
    _truncated(tiny_run["supernet"], work / "checkpoint.pt")
    stages.train_teacher(p, tiny_run["data"], tmp_path / "t.pt", tmp_path / "t.json", work)
    aside = [f for f in work.iterdir() if f.name.startswith("checkpoint.pt.corrupt-")]
    assert len(aside) == 1 and aside[0].stat().st_size == 4096
    # The run from scratch equals the session's uninterrupted one.
    a = torch.load(tmp_path / "t.pt", weights_only=True)["state_dict"]
    b = torch.load(tiny_run["teacher"], weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


# ---------------------------------------------------------------- outputs tailor did not write
def test_output_dirs_replace_only_what_tailor_wrote(tmp_path, monkeypatch):
    from tailor.utils import OUTPUT_MARKER, OutputError, atomic_dir

    monkeypatch.chdir(tmp_path)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="did not write"):
        with atomic_dir(user) as d:
            (d / "x").write_text("new")
    assert (user / "notes.txt").read_text() == "mine" and not (user / "x").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    with pytest.raises(OutputError, match="is a file"):
        with atomic_dir(a_file):
            pass
    for cwd_like in (tmp_path, Path(".")):
        with pytest.raises(OutputError, match="working directory"):
            with atomic_dir(cwd_like, force=True):
                pass
    # What tailor wrote (the marker) and empty directories are replaced; --force replaces the rest.
    ours = tmp_path / "ours"
    for content in ("one", "two"):
        with atomic_dir(ours) as d:
            (d / "f").write_text(content)
        assert (ours / "f").read_text() == content and (ours / OUTPUT_MARKER).exists()
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty") as d:
        (d / "f").write_text("x")
    with atomic_dir(user, force=True) as d:
        (d / "f").write_text("x")
    assert sorted(p.name for p in user.iterdir()) == [OUTPUT_MARKER, "f"]


def test_a_killed_runs_temporary_dir_is_removed_at_the_next_start(tmp_path):
    from tailor.utils import atomic_dir

    stale = tmp_path / ".prepared.abc123.tmp"
    stale.mkdir()
    (stale / "big.npy").write_bytes(b"0" * 1000)
    other = tmp_path / ".other.abc.tmp"
    other.mkdir()
    with atomic_dir(tmp_path / "prepared") as d:
        (d / "f").write_text("x")
    assert not stale.exists() and other.exists()  # only this output's leftovers


def test_export_refuses_a_user_directory_before_any_work(tiny_run, tmp_path):
    user = tmp_path / "repo"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    r = run_cli("export", "--params", ROOT / "params.yaml", "--preset", TINY, "--data", tiny_run["data"],
                "--models", tiny_run["supernet"], "--repo", user, "--onnx-dir", tmp_path / "onnx",
                "--metrics", tmp_path / "e.json")
    assert_one_line_error(r, user, "--force")
    assert (user / "keep.txt").read_text() == "mine" and not (tmp_path / "e.json").exists()
    r = run_cli("export", "--params", ROOT / "params.yaml", "--preset", TINY, "--data", tiny_run["data"],
                "--models", tiny_run["supernet"], "--repo", tmp_path / "r2", "--onnx-dir", ".",
                "--metrics", tmp_path / "e.json", cwd=tmp_path)
    assert_one_line_error(r, "working directory")
    assert (user / "keep.txt").exists()


def test_a_superclass_of_one_class_is_rejected_by_name():
    from tailor.data import DataError, check_superclass_map

    with pytest.raises(DataError, match="superclass 'solo' has one class \\('c'\\)"):
        check_superclass_map({"pair": ["a", "b"], "solo": ["c"]}, ["a", "b", "c"], "map.yaml")


def test_retrain_scenarios_outside_the_search_grid_fail_when_params_load():
    from tailor.config import ParamsError

    with pytest.raises(ParamsError, match=r"retrain.scenarios\[0\].budget 0.3 is not one of search.budgets.values"):
        tiny_params(retrain={"scenarios": [{"superclass": "sc0", "budget": 0.3, "arch": None}]})
    with pytest.raises(ParamsError, match=r"retrain.scenarios.0.budget \(set in overrides\): Input should be a finite number"):
        tiny_params(retrain={"scenarios": [{"superclass": "sc0", "budget": float("nan"), "arch": None}]})
    # With fraction budgets the fraction is the spelling; an explicit arch needs no grid entry.
    tiny_params(search={"budgets": {"kind": "fraction", "values": [0.3, 0.7]}},
                retrain={"scenarios": [{"superclass": "sc0", "budget": 0.3, "arch": None}]})
    tiny_params(retrain={"scenarios": [{"superclass": "sc0", "budget": 123, "arch": "k3e3.k3e3_k3e3.k3e3_k3e3.k3e3_"
                                        "k3e3.k3e3_k3e3.k3e3"}]})


def test_prepare_data_rejects_superclass_names_the_data_lacks(tmp_path):
    from tailor import stages
    from tailor.data import DataError

    p = tiny_params(retrain={"scenarios": [{"superclass": "dogs", "budget": 300000, "arch": None}]})
    with pytest.raises(DataError, match=r"retrain.scenarios\[0\].superclass 'dogs': not a superclass of the data"):
        stages.prepare_data(p, tmp_path / "d", tmp_path / "m.json")
    assert not (tmp_path / "d").exists() and not (tmp_path / "m.json").exists()


def test_a_bad_overlay_key_is_blamed_on_the_overlay(tmp_path):
    from tailor.config import ParamsError, load_params

    ov = tmp_path / "mine.yaml"
    ov.write_text("supernet:\n  colour: red\n  sampler: bogus\n")
    with pytest.raises(ParamsError) as e:
        load_params(ROOT / "params.yaml", [TINY, ov])
    msg = str(e.value)
    assert f"supernet.colour (set in {ov})" in msg and f"supernet.sampler (set in {ov})" in msg
    assert "\n" not in msg


def test_a_superclass_map_that_is_not_yaml_is_one_error_naming_it(tmp_path):
    from tailor.data import DataError, load_imagefolder

    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "tree" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "tree" / split / c / "0.png")
    bad = tmp_path / "map.yaml"
    bad.write_text("dogs: [a, b\ncats: c]\n")
    cfg = tiny_params(data={"source": "imagefolder", "path": str(tmp_path / "tree"),
                            "superclass_map": str(bad)}).data
    with pytest.raises(DataError, match=f"{bad}: superclass map is not valid YAML \\(line"):
        load_imagefolder(cfg)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_prepared_split_is_one_error_naming_the_file(tiny_run, tmp_path, damage):
    import shutil

    from tailor.data import DataError, load_split

    d = tmp_path / "data"
    shutil.copytree(tiny_run["data"], d)
    x = d / "train" / "x.npy"
    if damage == "truncate":
        x.write_bytes(x.read_bytes()[:200])
    else:
        x.unlink()
    with pytest.raises(DataError, match=str(x)):
        load_split(d, "train")


def test_a_truncated_results_json_is_one_error_naming_it(tiny_run, tmp_path):
    (tmp_path / "results.json").write_text('{"cost": {"unit": "MAdds", ')
    r = run_cli("retrain", "--params", ROOT / "params.yaml", "--preset", TINY, "--data", tiny_run["data"],
                "--supernet", tiny_run["supernet"], "--superclass", "sc0", "--budget", "600000",
                "--search-dir", tmp_path, "--out", tmp_path / "m.pt", "--metrics", tmp_path / "m.json",
                "--work-dir", tmp_path / "w")
    assert_one_line_error(r, tmp_path / "results.json", "not valid JSON")


def test_retrain_refuses_an_explicit_arch_over_its_budget(tiny_run, tmp_path):
    from tailor.nets import StaticNet, count_madds
    from tailor.space import SearchSpace

    p = tiny_params()
    space = SearchSpace(p.space, p.data.image_size)
    arch = space.max_arch
    madds = count_madds(StaticNet(space, arch, 6), p.data.image_size)  # counted on the module, not the cost table
    budget = 300000
    assert madds > budget
    r = run_cli("retrain", "--params", ROOT / "params.yaml", "--preset", TINY, "--data", tiny_run["data"],
                "--supernet", tiny_run["supernet"], "--superclass", "sc0", "--budget", budget, "--arch", arch,
                "--out", tmp_path / "m.pt", "--metrics", tmp_path / "m.json", "--work-dir", tmp_path / "w")
    assert_one_line_error(r, arch, f"costs {madds:.6g} MAdds, over the scenario's budget {budget}")
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "m.json").exists() and not (tmp_path / "w").exists()


# ---------------------------------------------------------------- the CLI table: every bad input above, end to end
def _tree(root: Path, classes=("a", "b", "c", "d")) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(root / split / c / f"{i}.png")
    return root


def _overlay(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _imagefolder_overlay(t, mapping_text: str) -> tuple[Path, Path]:
    tree = _tree(t["tmp"] / "tree")
    m = _overlay(t["tmp"] / "map.yaml", mapping_text)
    return _overlay(t["tmp"] / "data.yaml", f"data: {{source: imagefolder, path: {tree}, superclass_map: {m}}}\n"
                                             f"retrain: {{scenarios: [{{superclass: null, budget: 300000, arch: {t['arch']}}}]}}\n"), m


def _c_prepare_onto_a_file(t):
    return ["prepare-data", *t["base"], "--out", t["out"] / "earlier.txt", "--metrics", t["out"] / "m.json"], \
        [t["out"] / "earlier.txt"]


def _c_map_not_yaml(t):
    ov, m = _imagefolder_overlay(t, "dogs: [a, b\ncats: c]\n")
    return ["prepare-data", *t["base"], "--preset", ov, "--out", t["out"] / "d", "--metrics", t["out"] / "m.json"], \
        [m, "not valid YAML"]


def _c_superclass_of_one(t):
    ov, _ = _imagefolder_overlay(t, "pair: [a, b, c]\nsolo: [d]\n")
    return ["prepare-data", *t["base"], "--preset", ov, "--out", t["out"] / "d", "--metrics", t["out"] / "m.json"], \
        ["'solo'", "one class"]


def _c_overlay_unknown_key(t):
    ov = _overlay(t["tmp"] / "mine.yaml", "supernet:\n  colour: red\n")
    return ["search-random", *t["base"], "--preset", ov, "--data", t["data"], "--supernet", t["supernet"],
            "--out", t["out"] / "r.json"], ["supernet.colour", ov]


def _c_scenario_outside_grid(t):
    ov = _overlay(t["tmp"] / "grid.yaml", "retrain: {scenarios: [{superclass: sc0, budget: 12345, arch: null}]}\n")
    return ["search-random", *t["base"], "--preset", ov, "--data", t["data"], "--supernet", t["supernet"],
            "--out", t["out"] / "r.json"], ["retrain.scenarios[0].budget", "12345"]


def _c_params_missing(t):
    missing = t["tmp"] / "no-params.yaml"
    return ["search-random", "--params", missing, "--data", t["data"], "--supernet", t["supernet"],
            "--out", t["out"] / "r.json"], [missing]


def _c_preset_missing(t):
    missing = t["tmp"] / "no-preset.yaml"
    return ["search-random", *t["base"], "--preset", missing, "--data", t["data"], "--supernet", t["supernet"],
            "--out", t["out"] / "r.json"], [missing]


def _retrain(t, *extra, supernet=None):
    return ["retrain", *t["base"], "--data", t["data"], "--supernet", supernet or t["supernet"],
            "--out", t["out"] / "m.pt", "--metrics", t["out"] / "m.json", "--work-dir", t["out"] / "w", *extra]


def _c_unknown_superclass(t):
    return _retrain(t, "--superclass", "nope", "--budget", "300000", "--arch", t["arch"]), ["'nope'", "superclass"]


def _c_malformed_arch(t):
    return _retrain(t, "--superclass", "sc0", "--budget", "300000", "--arch", "k3e3.k9e9"), ["k3e3.k9e9"]


def _c_retrain_supernet_of_another_space(t):
    bad = t["bad"]["other_teacher"]
    return _retrain(t, "--superclass", "sc0", "--budget", "300000", "--arch", t["arch"], supernet=bad), [bad]


def _c_search_supernet_of_another_space(t):
    bad = t["bad"]["other_teacher"]
    return ["search-random", *t["base"], "--data", t["data"], "--supernet", bad, "--out", t["out"] / "r.json"], [bad]


def _c_supernet_missing(t):
    missing = t["tmp"] / "absent.pt"
    return ["search-random", *t["base"], "--data", t["data"], "--supernet", missing, "--out", t["out"] / "r.json"], \
        [missing]


def _c_damaged_split(t):
    import shutil

    d = t["tmp"] / "data"
    shutil.copytree(t["data"], d)
    x = d / "val" / "x.npy"
    x.write_bytes(x.read_bytes()[:200])
    return ["search-random", *t["base"], "--data", d, "--supernet", t["supernet"], "--out", t["out"] / "r.json"], [x]


def _c_truncated_teacher(t):
    return ["train-supernet", *t["base"], "--data", t["data"], "--teacher", t["bad"]["truncated"],
            "--out", t["out"] / "s.pt", "--metrics", t["out"] / "s.json", "--work-dir", t["out"] / "w"], \
        [t["bad"]["truncated"]]


def _c_serve_check_bad_port(t):
    return ["serve-check", *t["base"], "--repo", t["tmp"], "--data", t["data"], "--metrics", t["out"] / "s.json",
            "--url", "127.0.0.1:99999"], ["--url", "99999"]


def _c_export_bad_s3_url(t):
    return ["export", *t["base"], "--data", t["data"], "--models", t["supernet"], "--repo", "s3://",
            "--onnx-dir", t["out"] / "onnx", "--metrics", t["out"] / "e.json"], ["s3://"]


def _c_export_missing_model(t):
    missing = t["tmp"] / "absent.pt"
    return ["export", *t["base"], "--data", t["data"], "--models", missing, "--repo", t["out"] / "triton",
            "--onnx-dir", t["out"] / "onnx", "--metrics", t["out"] / "e.json"], [missing]


def _c_budget(value):
    def case(t):
        return _retrain(t, "--superclass", "sc0", "--budget", value, "--arch", t["arch"]), ["--budget", value]
    case.__name__ = f"_c_budget_{value.replace('-', 'minus')}"
    return case


def _c_export_onto_a_user_dir(t):
    return ["export", *t["base"], "--data", t["data"], "--models", t["supernet"], "--repo", t["out"],
            "--onnx-dir", t["tmp"] / "onnx", "--metrics", t["tmp"] / "e.json"], [t["out"], "--force"]


CLI_CASES = [(f.__name__[3:], f) for f in (
    _c_prepare_onto_a_file, _c_map_not_yaml, _c_superclass_of_one, _c_overlay_unknown_key, _c_scenario_outside_grid,
    _c_params_missing, _c_preset_missing, _c_unknown_superclass, _c_malformed_arch,
    _c_retrain_supernet_of_another_space, _c_search_supernet_of_another_space, _c_supernet_missing, _c_damaged_split,
    _c_truncated_teacher, _c_serve_check_bad_port, _c_export_bad_s3_url, _c_export_missing_model,
    _c_export_onto_a_user_dir, *(_c_budget(v) for v in ("nan", "-5", "0", "inf")))]


@pytest.mark.parametrize("case", [f for _, f in CLI_CASES], ids=[n for n, _ in CLI_CASES])
def test_cli_bad_input_is_one_line_naming_it(tiny_run, bad_files, tmp_path, case):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    t = {"tmp": tmp_path, "out": out, "bad": bad_files, "data": tiny_run["data"], "supernet": tiny_run["supernet"],
         "base": ["--params", ROOT / "params.yaml", "--preset", TINY], "arch": tiny_params().retrain.scenarios[0].arch}
    argv, culprits = case(t)
    assert_one_line_error(run_cli(*argv), *culprits)
    assert sorted(p.name for p in out.iterdir()) == ["earlier.txt"], "a failed stage wrote outputs"
    assert (out / "earlier.txt").read_text() == "kept"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA works here: nothing to refuse")
def test_device_cuda_without_usable_cuda_is_one_line_before_any_work(tiny_run, tmp_path):
    overlay = tmp_path / "cuda.yaml"
    overlay.write_text("runtime: {device: cuda}\n")
    r = run_cli("train-teacher", "--params", ROOT / "params.yaml", "--preset", TINY, "--preset", overlay,
                "--data", tiny_run["data"], "--out", tmp_path / "t.pt", "--metrics", tmp_path / "t.json",
                "--work-dir", tmp_path / "w")
    assert_one_line_error(r, "runtime.device is 'cuda'", f"CUDA runtime {torch.version.cuda}")
    assert not (tmp_path / "t.pt").exists() and not (tmp_path / "t.json").exists()


def test_device_auto_warns_when_a_mounted_gpu_is_unusable(monkeypatch, capsys):
    from tailor import train
    from tailor.config import RuntimeConfig

    rt = RuntimeConfig(**{**tiny_params().runtime.model_dump(), "device": "auto"})
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train, "_nvidia_device_nodes", lambda: ["/dev/nvidia0"])  # a pod whose driver is too old
    assert train.resolve_device(rt).type == "cpu"
    err = capsys.readouterr()
    assert "warning: training on the CPU" in err.out + err.err and "/dev/nvidia0" in err.out + err.err
    monkeypatch.setattr(train, "_nvidia_device_nodes", lambda: [])
    assert train.resolve_device(rt).type == "cpu"
    err = capsys.readouterr()
    assert "warning" not in err.out + err.err

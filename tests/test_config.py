"""params.yaml schema: the shipped files validate, and every kind of mistake names its dotted field."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, tiny_params

from tailor.config import Params, ParamsError, deep_merge, load_params, params_from_dict

PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def raw_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def error_of(raw: dict) -> str:
    with pytest.raises(ParamsError) as e:
        params_from_dict(raw, source="params.yaml")
    return str(e.value)


def test_params_yaml_validates():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    # Every value comes from the file: the schema adds no key of its own (no defaults), so the
    # model's dump has exactly the file's keys (values may be normalised, e.g. str -> [str]).
    def keys(d, where=""):
        out = set()
        for k, v in d.items():
            out.add(where + k)
            if isinstance(v, dict):
                out |= keys(v, f"{where}{k}.")
        return out

    assert keys(p.model_dump(mode="json")) == keys(raw_params())
    assert p.seed == raw_params()["seed"] and p.space.widths == raw_params()["space"]["widths"]


def test_tiny_overlay_validates_and_merges():
    p = tiny_params()
    tiny = yaml.safe_load(TINY.read_text())
    assert p.data.image_size == tiny["data"]["image_size"]
    assert p.teacher.optim.batch_size == tiny["teacher"]["optim"]["batch_size"]
    # Keys the overlay does not mention keep params.yaml's values (merged, not replaced).
    base = load_params(ROOT / "params.yaml")
    assert p.teacher.optim.lr == base.teacher.optim.lr
    assert p.data.synthetic.class_signal == base.data.synthetic.class_signal


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_presets_validate(preset):
    p = load_params(ROOT / "params.yaml", [preset])
    overlay = yaml.safe_load(preset.read_text())
    dumped = p.model_dump(mode="json")

    def check(ov, got, where):
        for k, v in ov.items():
            if isinstance(v, dict):
                check(v, got[k], f"{where}{k}.")
            else:
                assert got[k] == v, f"{preset.name}: {where}{k} not applied"

    check(overlay, dumped, "")


def test_presets_exist():
    # The real-data preset of the issue (tin-sc10 at 64x64) lives in configs/.
    assert PRESETS, "configs/ holds no preset"


def test_overrides_apply_last():
    p = load_params(ROOT / "params.yaml", [TINY], {"supernet": {"kd_weight": 0.25}})
    assert p.supernet.kd_weight == 0.25
    assert p.data.image_size == 16  # from the overlay


def test_deep_merge_does_not_alias_or_mutate():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    ov = {"a": {"b": 2}, "e": {"f": 3}}
    base_copy, ov_copy = copy.deepcopy(base), copy.deepcopy(ov)
    out = deep_merge(base, ov)
    assert out == {"a": {"b": 2, "c": [1, 2]}, "d": 1, "e": {"f": 3}}
    assert base == base_copy and ov == ov_copy
    out["a"]["c"].append(3)
    assert base["a"]["c"] == [1, 2]


def test_unknown_key_names_dotted_field():
    raw = raw_params()
    raw["supernet"]["optim"]["learning_rate"] = 0.1
    msg = error_of(raw)
    assert "supernet.optim.learning_rate" in msg
    assert "params.yaml" in msg


def test_unknown_top_level_key():
    raw = raw_params()
    raw["sead"] = 1
    assert "sead" in error_of(raw)


def test_missing_key_names_dotted_field():
    raw = raw_params()
    del raw["data"]["synthetic"]["noise"]
    msg = error_of(raw)
    assert "data.synthetic.noise" in msg
    assert "required" in msg.lower()


@pytest.mark.parametrize("path, value", [
    (("data", "val_fraction"), 0.7),
    (("data", "source"), "imagenet"),
    (("space", "stem_stride"), 3),
    (("space", "kernels"), [3, 4]),
    (("teacher", "epochs"), 0),
    (("supernet", "superclass_dropout"), 1.5),
    (("runtime", "device"), "tpu"),
])
def test_bad_value_names_dotted_field(path, value):
    raw = raw_params()
    node = raw
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    msg = error_of(raw)
    assert ".".join(path) in msg


def test_bad_value_in_a_list_names_its_index():
    raw = raw_params()
    raw["supernet"]["phases"][1]["epochs"] = -1
    assert "supernet.phases.1.epochs" in error_of(raw)


@pytest.mark.parametrize("change, needle", [
    (lambda r: r["space"].update(strides=[2, 1]), "space.strides"),
    (lambda r: r["space"].update(depths=[4, 2, 3]), "space.depths"),
    (lambda r: r["supernet"]["phases"][0].update(kernels=[9]), "supernet.phases[kernel].kernels"),
    (lambda r: r["data"].update(source="imagefolder", path=None), "data.path"),
])
def test_cross_field_checks_name_the_field(change, needle):
    raw = raw_params()
    change(raw)
    assert needle in error_of(raw)


def test_params_are_immutable():
    p = tiny_params()
    with pytest.raises(Exception):
        p.seed = 3


@pytest.mark.parametrize("content, needle", [
    (None, "no such file"),
    ("a: [1, 2", "not valid YAML"),
    ("- 1\n- 2\n", "mapping"),
])
def test_unreadable_files_name_the_file(tmp_path: Path, content, needle):
    f = tmp_path / "p.yaml"
    if content is not None:
        f.write_text(content)
    with pytest.raises(ParamsError) as e:
        load_params(f)
    assert str(f) in str(e.value) and needle in str(e.value)
    with pytest.raises(ParamsError) as e:
        load_params(ROOT / "params.yaml", [f])
    assert str(f) in str(e.value)


def test_search_does_not_import_the_stage_bodies():
    """search/ takes what it needs from tailor.context; importing it must not load tailor.stages (the
    import circle issue 11 names)."""
    import subprocess
    import sys

    code = "import sys, tailor.search; print('tailor.stages' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert r.stdout.strip() == "False"

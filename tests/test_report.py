"""The report stage renders what the stages wrote and says what did not run."""
import json

import pytest

from tailor.report import build_report


def _subnets(accs):
    names = ["min", "mid", "max"]
    return {"epochs": 2, "train_seconds": 1.0, "device": "cpu", "subnets": {
        n: {"arch": n, "madds_m": 1.0 + i, "val_sc_top1_mean": a, "test_sc_top1_mean": a, "val_top1": a,
            "test_top1": a, "test_images_per_s": 10.0, "test_sc_top1": {}} for i, (n, a) in enumerate(zip(names, accs))}}


def test_report_checks_size_accuracy_order_and_lists_missing_stages(tmp_path):
    (tmp_path / "supernet.json").write_text(json.dumps(_subnets([0.5, 0.6, 0.7])))
    text, summary = build_report(tmp_path, tmp_path / "absent.md")
    assert summary["supernet"]["larger_is_more_accurate"] is True
    assert "50.0% < 60.0% < 70.0%" in text
    assert "teacher" in summary["missing"] and "serve-check" in summary["missing"]

    (tmp_path / "supernet.json").write_text(json.dumps(_subnets([0.5, 0.8, 0.7])))
    text, summary = build_report(tmp_path, None)
    assert summary["supernet"]["larger_is_more_accurate"] is False
    assert "NOT more accurate" in text


def _lut(tmp_path, target: str, ms: float):
    from conftest import tiny_params

    from tailor.latency import new_lut, table_keys
    from tailor.space import SearchSpace
    from tailor.utils import atomic_write_json

    p = tiny_params()
    space = SearchSpace(p.space, p.data.image_size)
    lut = new_lut(target, p.latency.targets[target], p.latency.protocol, space, 6, 0,
                  {k: {"ms": ms} for k in table_keys(space, 6)})
    atomic_write_json(tmp_path / "latency" / f"{target}.json", lut)
    return space


def _model(arch: str, deployed_ms: float | None, budget: float = 1.0, unit: str = "MAdds") -> dict:
    return {"arch": arch, "budget": budget, "budget_unit": unit, "parity_max_abs": 0.0, "test_top1": 0.5,
            "onnx_test_top1": 0.5, "onnx_bytes": 1, "ort_cpu_latency_ms": {"batch_1": 9.0},
            "target_latency": {} if deployed_ms is None else {"cpu-ort": {"ms": deployed_ms, "median_ms": 9.0}}}


def _export(**models) -> dict:
    return {"opset": 17, "onnxruntime": "x", "repository": "triton", "max_parity_error": 0.0, "intra_op_threads": 0,
            "models": models}


def test_report_sets_predicted_beside_deployed_latency_of_the_chosen_networks(tmp_path):
    space = _lut(tmp_path, "cpu-ort", 0.1)       # onnxruntime on cpu: the export stage timed the files
    _lut(tmp_path, "cpu-torch", 0.2)             # torch: predicted only
    arch = str(space.min_arch)                   # 5 units x 2 blocks + stem + head: 12 entries
    predicted = 0.1 * 12
    (tmp_path / "export.json").write_text(json.dumps(_export(
        sc0__madds_1=_model(arch, predicted / 1.25),                       # 25% slower than predicted
        sc1__ms_1p2=_model(arch, predicted / 1.04, budget=1.2, unit="ms"),  # within 5%, under its budget
        sc2__ms_1=_model(arch, predicted / 1.02, budget=1.0, unit="ms"),    # within 5%, but over budget + 5%
        sc3__madds_1=_model(arch, None))))                                  # not timed on this target
    text, summary = build_report(tmp_path, None, tmp_path / "latency")
    assert "## Chosen networks: LUT-predicted vs deployed latency" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if "| cpu-ort |" in line}
    assert "| 1.2000 | 0.9600 | +25.0% | - |" in rows["sc0__madds_1"]  # the target's own statistic ("ms")
    assert "| 1.2000 | - | - | - |" in rows["sc3__madds_1"]
    torch_row = next(line for line in text.splitlines() if "| cpu-torch |" in line)
    assert "| 2.4000 | - | - |" in torch_row
    s = summary["chosen_latency"]["cpu-ort"]
    assert (s["models"], s["within_5pct"], s["over_budget_plus_5pct"]) == (3, 2, ["sc2__ms_1"])
    assert s["max_abs_rel_err"] == 0.25
    assert "cpu-torch" not in summary["chosen_latency"]
    assert "2 of 3 deployed nets within +-5%" in text and "over their latency budget + 5%: sc2__ms_1" in text

    _, summary = build_report(tmp_path, None, tmp_path / "absent")  # no tables (a partial DAG): no section
    assert "chosen_latency" not in summary


def test_report_refuses_a_lut_of_another_space(tmp_path):
    _lut(tmp_path, "cpu-ort", 0.1)
    depth1 = _model("k3e3_k3e3_k3e3_k3e3_k3e3", 1.0)
    (tmp_path / "export.json").write_text(json.dumps(_export(sc0__madds_1=depth1)))
    with pytest.raises(ValueError, match=r"cpu-ort\.json: does not describe exported model sc0__madds_1"):
        build_report(tmp_path, None, tmp_path / "latency")

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


def _export(arch: str, median_ms: float, min_ms: float) -> dict:
    return {"opset": 17, "onnxruntime": "x", "repository": "triton", "max_parity_error": 0.0, "intra_op_threads": 0,
            "models": {"sc0__madds_1": {"arch": arch, "parity_max_abs": 0.0, "test_top1": 0.5, "onnx_test_top1": 0.5,
                                        "onnx_bytes": 1, "ort_cpu_latency_ms": {"batch_1": median_ms},
                                        "ort_cpu_latency_detail": {"batch_1": {"ms": median_ms, "min_ms": min_ms}}}}}


def test_report_shows_predicted_and_measured_latency_of_the_chosen_networks(tmp_path):
    space = _lut(tmp_path, "cpu-ort", 0.1)       # onnxruntime on cpu, batch 1: the export measured it
    _lut(tmp_path, "cpu-torch", 0.2)             # torch: predicted only
    arch = space.min_arch                        # 5 units x 2 blocks + stem + head: 12 entries
    predicted = 0.1 * 12
    (tmp_path / "export.json").write_text(json.dumps(_export(str(arch), 9.0, predicted / 1.25)))
    text, summary = build_report(tmp_path, None, tmp_path / "latency")
    assert "## Chosen networks: LUT-predicted vs measured latency" in text
    ort_row = next(line for line in text.splitlines() if "| cpu-ort |" in line)
    assert "| 1.2000 | 0.9600 | +25.0% |" in ort_row  # the LUT's statistic is min: min_ms, not the median
    torch_row = next(line for line in text.splitlines() if "| cpu-torch |" in line)
    assert "| 2.4000 | - | - |" in torch_row
    assert summary["chosen_latency"] == {"cpu-ort": {"median_abs_rel_err": 0.25, "models": 1}}

    _, summary = build_report(tmp_path, None, tmp_path / "absent")  # no tables (a partial DAG): no section
    assert "chosen_latency" not in summary


def test_report_refuses_a_lut_of_another_space(tmp_path):
    _lut(tmp_path, "cpu-ort", 0.1)
    (tmp_path / "export.json").write_text(json.dumps(_export("k3e3_k3e3_k3e3_k3e3_k3e3", 1.0, 1.0)))  # depth 1
    with pytest.raises(ValueError, match=r"cpu-ort\.json: does not describe exported model sc0__madds_1"):
        build_report(tmp_path, None, tmp_path / "latency")

"""The report stage renders what the stages wrote and says what did not run."""
import json

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

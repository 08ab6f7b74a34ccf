"""The bench reports' shared table and ratio helpers, and the one place the two reports differ on purpose: a zero
numerator is a ratio of 0.0 in the measurement ratios (a real zero) but no speedup in the --tune tables."""

from __future__ import annotations

from compressor.runtime.report import BenchReport
from compressor.runtime.settings_report import best_settings
from compressor.runtime.tables import markdown_table, number, ratio, text_table


def test_ratio_is_none_only_when_a_side_is_unknown_or_the_denominator_zero():
    assert ratio(0, 4) == 0.0 and ratio(3, 4) == 0.75
    assert ratio(None, 4) is None and ratio(3, None) is None and ratio(3, 0) is None


def test_text_table_pads_columns_and_right_justifies_the_asked_ones():
    rows = [["model", "p50 ms"], ["a", "1.5"], ["longer", "12.25"]]
    assert text_table(rows) == ["model   p50 ms", "------  ------", "a       1.5", "longer  12.25"]
    assert text_table(rows, right={1}) == ["model   p50 ms", "------  ------", "a          1.5", "longer   12.25"]


def test_markdown_table_and_numbers():
    assert markdown_table([["a", "b"], ["1", "-"]]) == ["| a | b |", "|---|---|", "| 1 | - |"]
    assert number(None, 3) == "-" and number(2.0, 2, "x") == "2.00x" and number(0.12345, 3) == "0.123"


def _candidate(index: int, setting: str, p50_ms: float | None, chosen: bool) -> dict:
    return {"model": f"m{index}", "model_index": index, "precision": "fp32", "target": "cpu:1", "batch": 1,
            "setting": setting, "session_target": "cpu:1", "cuda_graph": False, "p50_ms": p50_ms, "passed": True,
            "chosen": chosen, "failure": None, "check": None}


def test_tune_speedups_need_a_measured_first_model():
    measured = BenchReport(models=[], measurements=[], tuning=[_candidate(0, "default", 2.0, True),
                                                               _candidate(1, "default", 1.0, True)])
    second = best_settings(measured)[1]
    assert second["speedup_vs_first_default"] == 2.0 and second["speedup_vs_first_best"] == 2.0
    unmeasured = BenchReport(models=[], measurements=[], tuning=[_candidate(0, "default", 0.0, True),
                                                                 _candidate(1, "default", 1.0, True)])
    second = best_settings(unmeasured)[1]
    assert second["speedup_vs_first_default"] is None and second["speedup_vs_first_best"] is None

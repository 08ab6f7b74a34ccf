"""The `--tune` part of a bench report: every candidate session setting, and per model the chosen one beside its
default, with speedups against the first model's default setting and against the first model's own best setting."""

from __future__ import annotations

from typing import Any

from compressor.runtime.tables import markdown_table, number, ratio, text_table

SINGLE_NOTE = ("{target}: one candidate only (the CPU execution provider has no provider option, and the threads are "
               "the target itself): the default is kept, with nothing to compare it with.")


def best_settings(report: Any) -> list[dict[str, Any]]:
    """Per target, batch and model: the default p50, the chosen setting and its p50, and the speedups
    first-model-default p50 / chosen p50 (`speedup_vs_first_default`), first-model-chosen p50 / chosen p50
    (`speedup_vs_first_best`, like with like) and first-model-default p50 / this model's default p50."""
    rows = []
    cells = list(dict.fromkeys((r["target"], r["batch"]) for r in report.tuning))
    for target, batch in cells:
        group = [r for r in report.tuning if r["target"] == target and r["batch"] == batch]
        models = list(dict.fromkeys((r["model_index"], r["model"]) for r in group))
        summary = {}
        for index, name in models:
            mine = [r for r in group if r["model_index"] == index]
            default = next((r for r in mine if r["setting"] == "default"), None)
            chosen = next((r for r in mine if r["chosen"]), None)
            summary[index] = (name, default, chosen)
        first = summary.get(0, (None, None, None))
        for index, (name, default, chosen) in summary.items():
            rows.append({
                "model": name, "model_index": index, "target": target, "batch": batch,
                "default_p50_ms": default and default["p50_ms"],
                "chosen_setting": chosen and chosen["setting"], "chosen_session_target": chosen and chosen["session_target"],
                "chosen_cuda_graph": chosen and chosen["cuda_graph"], "chosen_p50_ms": chosen and chosen["p50_ms"],
                "speedup_default_vs_first_default": _speedup(first[1], default),
                "speedup_vs_first_default": _speedup(first[1], chosen),
                "speedup_vs_first_best": _speedup(first[2], chosen),
            })
    return rows


def _speedup(first: dict[str, Any] | None, this: dict[str, Any] | None) -> float | None:
    # a p50 of 0 ms (or none) is no measurement: no speedup, where report.py's ratios keep 0.0 for a real zero (memory)
    return ratio(first and first["p50_ms"] or None, this and this["p50_ms"])


def settings_lines(report: Any, markdown: bool) -> list[str]:
    """The candidates table, the chosen-setting table and notes, as Markdown or fixed-width text."""
    candidates = [["model", "target", "batch", "setting", "p50 ms", "check: rel. error / tolerance", "passed", "chosen"]]
    for r in report.tuning:
        check = r["check"]
        shown = (f"{check['relative_error']:.3g} / {check['tolerance']:.3g}" if check else
                 (f"could not run: {r['failure']}" if r["failure"] else "only candidate"))
        candidates.append([r["model"], r["target"], str(r["batch"]), r["setting"], number(r["p50_ms"], 3), shown,
                           "yes" if r["passed"] else "no", "yes" if r["chosen"] else ""])
    best = [["model", "target", "batch", "default p50 ms", "chosen setting", "chosen p50 ms",
             "speedup vs first (default)", "speedup vs first (its best)"]]
    for r in best_settings(report):
        best.append([r["model"], r["target"], str(r["batch"]), number(r["default_p50_ms"], 3),
                     r["chosen_setting"] or "none passed", number(r["chosen_p50_ms"], 3),
                     number(r["speedup_vs_first_default"], 2, "x"), number(r["speedup_vs_first_best"], 2, "x")])
    singles = sorted({r["target"] for r in report.tuning if r["check"] is None and not r["failure"]})
    notes = [SINGLE_NOTE.format(target=t) for t in singles]
    notes.append("A setting passes when its outputs match the model's reference (fp32: the model on ONNX Runtime CPU "
                 "with optimizations off, tolerance max(1e-4, 10 x the larger of the CPU's float32 noise and the "
                 "default setting's own error); fp16/int8: the model's default-setting outputs within the precision's "
                 "limit); the fastest passing setting is chosen. Speedups are p50 ratios.")
    table = markdown_table if markdown else text_table
    return table(candidates) + [""] + table(best) + [""] + notes

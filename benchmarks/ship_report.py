"""The results of benchmarks/ship_resnet50.py: ship_resnet50.md and ship_resnet50.json (rows, aims, the aligned-baseline
comparison, every session-setting candidate, the full bench reports). Every speedup is a ratio of two p50s listed."""

from __future__ import annotations

import json
import time

from compressor.runtime.settings_report import best_settings, settings_lines

NAME = "ship_resnet50"
# (target cell, model, aim): compressed + reduced precision, its best setting, against the original fp32 at default
AIMS = [("cuda@32", "aware.fp16.b32", 3.5), ("cuda@1", "aware.fp16.b1", 2.5), ("cpu:1", "aware.int8.cpu1", 6.0),
        ("cpu:4", "aware.int8.cpu4", 6.0)]


def rows_of(run) -> list[dict]:
    """One row per target cell and model: default and chosen p50, MACs, and the speedups against orig.fp32."""
    rows = []
    for key, report in run.benches.items():
        if key == "pretune":
            continue
        macs = {m.name: m.macs for m in report.models}
        precision = {m.name: m.precision for m in report.models}
        for r in best_settings(report):
            rows.append({"cell": key, "model": r["model"], "precision": precision.get(r["model"]),
                         "macs": macs.get(r["model"]), "default_p50_ms": r["default_p50_ms"],
                         "chosen_setting": r["chosen_setting"], "chosen_session_target": r["chosen_session_target"],
                         "chosen_cuda_graph": r["chosen_cuda_graph"], "chosen_p50_ms": r["chosen_p50_ms"],
                         "speedup_default_vs_orig_default": r["speedup_default_vs_first_default"],
                         "speedup_best_vs_orig_default": r["speedup_vs_first_default"],
                         "speedup_best_vs_orig_best": r["speedup_vs_first_best"]})
    return rows


def aim_lines(rows: list[dict], cells: list[str]) -> tuple[list[str], list[dict]]:
    """One line per aim of the requested target cells: the best setting's speedup against the original fp32 at its
    default setting (and, for reading like with like, against the original's own best setting)."""
    lines, data = [], []
    for cell, model, aim in [a for a in AIMS if a[0] in cells]:
        row = next((r for r in rows if r["cell"] == cell and r["model"] == model), None)
        if row is None or row["speedup_best_vs_orig_default"] is None:
            lines.append(f"- {model} on {cell}: not measured (see the stages), aim >= {aim}x: not met")
            data.append({"cell": cell, "model": model, "aim": aim, "speedup": None, "met": False})
            continue
        speedup = row["speedup_best_vs_orig_default"]
        met = speedup >= aim
        lines.append(f"- {model} on {cell}: {speedup:.2f}x ({row['chosen_p50_ms']:.3f} ms with `{row['chosen_setting']}` "
                     f"vs the original fp32 at its default setting; against the original's own best setting "
                     f"{row['speedup_best_vs_orig_best']:.2f}x), aim >= {aim}x: **{'met' if met else 'not met'}**")
        data.append({"cell": cell, "model": model, "aim": aim, "speedup": speedup, "met": met})
    return lines, data


def baseline_lines(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """Latency-aware vs the aligned MAC baseline at equal MACs, per target cell and precision (each at its best
    setting; the default-setting comparison beside it)."""
    lines = ["| target | precision | latency-aware MACs | baseline MACs | aware p50 ms (best) | baseline p50 ms (best) "
             "| aware / baseline | at default settings | met |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    data = []
    for aware in [r for r in rows if r["model"].startswith("aware.")]:
        base = next((r for r in rows if r["cell"] == aware["cell"] and r["model"] == "macs." + aware["model"][6:]), None)
        if base is None or not aware["chosen_p50_ms"] or not base["chosen_p50_ms"]:
            continue
        ratio = aware["chosen_p50_ms"] / base["chosen_p50_ms"]
        at_default = aware["default_p50_ms"] / base["default_p50_ms"]
        met = ratio <= 1.0
        lines.append(f"| {aware['cell']} | {aware['precision']} | {_g(aware['macs'])} | {_g(base['macs'])} | "
                     f"{aware['chosen_p50_ms']:.3f} | {base['chosen_p50_ms']:.3f} | {ratio:.3f} | {at_default:.3f} | "
                     f"{'met' if met else 'not met'} |")
        data.append({"cell": aware["cell"], "aware": aware["model"], "baseline": base["model"], "aware_macs": aware["macs"],
                     "baseline_macs": base["macs"], "aware_p50_ms": aware["chosen_p50_ms"],
                     "baseline_p50_ms": base["chosen_p50_ms"], "ratio": ratio, "ratio_at_default": at_default, "met": met})
    return lines, data


def write_results(run) -> None:
    """ship_resnet50.md and .json in run.args.out (called after every stage)."""
    rows = rows_of(run)
    aims, aim_data = aim_lines(rows, [t.strip() for t in run.args.targets.split(",")])
    baseline, baseline_data = baseline_lines(rows)
    environment = {k: v for report in run.benches.values() for k, v in report.environment.items()}
    machine = ", ".join(f"{k}: {environment[k]}" for k in ("gpus", "cpu_model", "physical_cores", "onnxruntime",
                                                           "platform") if k in environment)
    elapsed = time.monotonic() - run.started
    lines = [f"# {run.args.arch} at {run.args.size}: latency-aware compression + fp16 (CUDA) / int8 (CPU) vs the fp32 "
             "original, each at its best session setting (issue 14)", "",
             f"Command: `{run.command}`  ", f"Machine: {machine or 'not recorded (no bench finished)'}  ",
             f"Elapsed: {elapsed:.0f} s (time limit {run.args.time_limit:.0f} s); CPU affinity: {run.args.cpu_cores or 'all'}", "",
             "Speedups are ratios of the p50s in the tables below. 'best' = the fastest session setting of that model "
             "whose outputs pass the check (`run_benchmark(..., tune=True)`), 'default' = ORT's defaults (TF32 on).", "",
             "## Aims", "", *aims, "",
             "## Latency-aware vs the aligned MAC baseline at equal MACs (issue 14)", "", *baseline, "",
             "## p50 per target", "",
             "| target | model | precision | MACs | default p50 ms | best setting | best p50 ms | default vs orig default "
             "| best vs orig default | best vs orig best |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['model']} | {r['precision']} | {_g(r['macs'])} | {_ms(r['default_p50_ms'])} | "
                     f"{r['chosen_setting'] or 'none passed'} | {_ms(r['chosen_p50_ms'])} | "
                     f"{_x(r['speedup_default_vs_orig_default'])} | {_x(r['speedup_best_vs_orig_default'])} | "
                     f"{_x(r['speedup_best_vs_orig_best'])} |")
    lines += ["", "## Compressions", "", "| tag | latency device | batch | precision | int8 tables | aware MACs x | "
              "alignment | measured fraction | baseline MACs x (round-to) | seconds |", "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for tag, c in run.compressions.items():
        if "aware" not in c:
            continue
        a, b = c["aware"], c.get("macs_baseline", {})
        lines.append(f"| {tag} | `{c['device']}` | {c['batch']} | {c['precision']} | {c.get('int8_tables') or '-'} | "
                     f"{a['macs_fraction']:.3f} | {a['alignment']} | {_f(a['latency'].get('measured_fraction'))} | "
                     f"{_f(b.get('macs_fraction'))} ({b.get('round_to')}) | {a['seconds'] and round(a['seconds'])} |")
    if run.latency_devices:
        lines += ["", "Latency devices (the original's fastest passing provider setting, short tune): " +
                  ", ".join(f"{k}: `{v}`" for k, v in run.latency_devices.items())]
    lines += ["", "## Stages", "", *[f"- {json.dumps(s)}" for s in run.stages], *[f"- note: {n}" for n in run.notes], ""]
    for key, report in run.benches.items():
        lines += [f"## Session-setting candidates: {key}", "", *settings_lines(report, markdown=True), ""]
    lines.append(f"Every sample, session option and the environment: {NAME}.json.")
    (run.args.out / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    data = {"command": run.command, "machine": environment, "elapsed_s": elapsed, "stages": run.stages,
            "latency_devices": run.latency_devices, "compressions": run.compressions, "rows": rows, "aims": aim_data,
            "aligned_baseline": baseline_data, "bench": {k: r.to_dict() for k, r in run.benches.items()}}
    (run.args.out / f"{NAME}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")


def _g(macs) -> str:
    return "-" if macs is None else f"{macs / 1e9:.3f}G"


def _f(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"

"""The rows of benchmarks/accuracy_at_speed.py (issue 12): each row one `compress train` command from the same
baseline checkpoint, with the same fine-tune budget; their summaries, the Markdown table and the Pareto plot.

Rows are listed in priority order: when the GPU time runs short, the rows at the end are left for a later call.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

BASELINE = "baseline"
RATIO = 0.6  # fraction of MACs removed by every MAC-targeted row
LATENCY_RATIO = 0.5  # fraction of measured latency removed by the latency-aware rows


@dataclass(frozen=True)
class Row:
    """One compressed (or re-trained) row: its options after the common fine-tune options."""

    name: str
    label: str
    options: tuple[str, ...]
    kd: bool
    extra_epochs: int = 0  # sparse-phase epochs (AMSC trials, GSM), for the time estimate
    plans_latency: bool = False  # its --prune plan measures latency on the GPU: run it before the others start
    epochs: int | None = None  # its own fine-tune epochs (the budget-curve rows); None: the common budget
    recipe: tuple[str, ...] = ()  # fine-tune options that replace the common ones (e.g. OneCycle)

    def finetune_epochs(self, common: int) -> int:
        """Its fine-tune epochs: its own budget, else the common one."""
        return self.epochs or common


def _amsc(dims: str = "both", weights: str = "adaptive", *more: str) -> tuple[str, ...]:
    return ("--method", "amsc", "--amsc", dims, "--amsc-weights", weights, "--search", "--ratio", str(RATIO),
            "--max-drop", "2.0", "--grid-points", "3", "--refine", "2", "--sparse-epochs", "2", "--sparse-lr", "0.02",
            *more)


GSM = ("--method", "gsm", "--gsm", "structured", "--ratio", str(RATIO), "--sparse-epochs", "6", "--sparse-lr", "0.01")


def _mask(method: str, *more: str) -> tuple[str, ...]:
    return ("--prune", method, "--ratio", str(RATIO), *more)


def _latency(batch: int, ratio: float = LATENCY_RATIO) -> tuple[str, ...]:
    return ("--prune", "l1", "--ratio", str(ratio), "--target", "latency", "--latency-device", "{latency_device}",
            "--latency-batch", str(batch), "--round-to", "8", "--profile-budget", "30")


CALIB = ("--calib-count", "512")  # the plan measured on 512 training images (calibrated planning, issue 15)
ONECYCLE = ("--schedule", "onecycle", "--lr", "0.1")
RAMP = ("--mask-ramp-epochs", "15")  # the fine-tune starts unpruned; the mask's structures shrink to zero over 15 epochs
VAL_SIZE = 5000  # train images every command holds out (the AMSC searches judge on them: the baseline must not train on them)
AMSC_ONE, AMSC_TWO = 24, 45  # epochs of a one-stage / two-stage lambda search (trials x (2 sparse + 1 recovery))
ROWS: tuple[Row, ...] = (
    Row("baseline-ft", "baseline + the rows' fine-tune", (), False),
    Row("gsm-kd", "GSM structured + KD", GSM, True, 6),
    Row("calib-l1-kd", "L1 mask, calibrated plan + KD", _mask("l1", *CALIB), True),
    Row("latency-b128-calib-kd", "latency-aware l1, calibrated plan (cuda b128, 50%) + KD", _latency(128) + CALIB, True,
        0, True),
    Row("amsc-depth-kd", "AMSC depth-only (λ0 alone) + KD", _amsc("depth-only"), True, AMSC_ONE),
    Row("l1-kd", "L1 mask + KD", _mask("l1"), True),
    Row("baseline-ft-kd", "baseline + the rows' fine-tune + KD (self-distillation)", (), True),
    Row("gsm-kd-onecycle", "GSM structured + KD, OneCycle lr 0.1 fine-tune", GSM, True, 6, recipe=ONECYCLE),
    Row("gsm", "GSM structured", GSM, False, 6),
    Row("amsc-depth", "AMSC depth-only", _amsc("depth-only"), False, AMSC_ONE),
    Row("l1", "L1 mask", _mask("l1"), False),
    Row("amsc-kd", "AMSC depth + width + KD", _amsc(), True, AMSC_TWO),
    Row("graph-rw-kd", "graph-rw mask (spec) + KD", _mask("graph-rw"), True),
    Row("graph-rw-norm-kd", "graph-rw scale-invariant + KD", _mask("graph-rw", "--method-option", "rw_normalize=true"), True),
    Row("graph-rw-data-kd", "graph-rw over calibration feature maps + KD",
        _mask("graph-rw", *CALIB, "--method-option", "rw_features=calib"), True),
    Row("latency-b128-kd", "latency-aware l1 (cuda b128, 50%) + KD", _latency(128), True, 0, True),
    Row("amsc-width-kd", "AMSC width-only (λ1 alone) + KD", _amsc("width-only"), True, AMSC_ONE),
    Row("amsc-uniform-kd", "AMSC, uniform weights λ(l)=λ(l,j)=1 + KD", _amsc("both", "uniform"), True, AMSC_TWO),
    Row("amsc-reverse-kd", "AMSC, reverse weights + KD", _amsc("both", "reverse"), True, AMSC_TWO),
    Row("gsm-kd-e120", "GSM structured + KD, 120 epochs (budget curve)", GSM, True, 6, epochs=120),
    Row("baseline-ft-e120", "baseline + 120 epochs (budget curve)", (), False, epochs=120),
    Row("latency-b1-kd", "latency-aware l1 (cuda b1, 50%) + KD", _latency(1), True, 0, True),
    Row("amsc-share50-kd", "AMSC depth+width, depth ≤ half the MAC target + KD",
        _amsc("both", "adaptive", "--depth-share", "0.5"), True, AMSC_TWO),
    Row("amsc-recover3-kd", "AMSC depth+width, 3 recovery epochs per trial + KD",
        _amsc("both", "adaptive", "--recover-epochs", "3"), True, 2 * AMSC_TWO),
    Row("amsc-grid6-kd", "AMSC depth+width, 6-point λ grids + KD",
        _amsc("both", "adaptive", "--grid-points", "6"), True, AMSC_TWO + 18),
    Row("graph-rw", "graph-rw mask (spec)", _mask("graph-rw"), False),
    Row("graph-rw-norm", "graph-rw scale-invariant", _mask("graph-rw", "--method-option", "rw_normalize=true"), False),
    Row("latency-b128", "latency-aware l1 (cuda b128, 50%)", _latency(128), False, 0, True),
    Row("amsc-depth-onecycle", "AMSC depth-only, OneCycle lr 0.1 fine-tune", _amsc("depth-only"), False, AMSC_ONE,
        recipe=ONECYCLE),
    Row("amsc-depth-kd-e120", "AMSC depth-only + KD, 120 epochs (budget curve of the 2x candidate)",
        _amsc("depth-only"), True, AMSC_ONE, epochs=120),
    Row("latency-b128-calib-kd-ramp", "latency-aware l1, calibrated plan (cuda b128, 50%) + KD, mask ramped over 15 epochs",
        _latency(128) + CALIB + RAMP, True, 0, True),
    Row("l1-kd-ramp", "L1 mask + KD, mask ramped over 15 epochs", _mask("l1", *RAMP), True),
    Row("latency-b128-calib-kd-e120", "latency-aware l1, calibrated plan (cuda b128, 50%) + KD, 120 epochs (budget curve)",
        _latency(128) + CALIB, True, 0, True, epochs=120),
    Row("latency55-b128-calib-kd", "latency-aware l1, calibrated plan (cuda b128, 55%) + KD", _latency(128, 0.55) + CALIB,
        True, 0, True),
    Row("latency-b128-calib-kd-onecycle", "latency-aware l1, calibrated plan (cuda b128, 50%) + KD, OneCycle",
        _latency(128) + CALIB, True, 0, True, recipe=ONECYCLE),
)
ROW_NAMES = tuple(r.name for r in ROWS)


SEED_SUFFIX = re.compile(r"^(.+)-seed(\d+)$")


def seeded(row: Row, seed: int) -> Row:
    """`row` trained with `compress train --seed seed` (batch order, augmentation, calibration images; the held-out
    validation images stay the same), named NAME-seedN."""
    return replace(row, name=f"{row.name}-seed{seed}", label=f"{row.label} (seed {seed})",
                   options=row.options + ("--seed", str(seed)))


def row_by_name(name: str) -> Row:
    """The row called `name`, or NAME-seedN for a seed replicate of NAME (SystemExit naming the choices otherwise)."""
    for row in ROWS:
        if row.name == name:
            return row
    match = SEED_SUFFIX.match(name)
    if match:
        return seeded(row_by_name(match[1]), int(match[2]))
    raise SystemExit(f"unknown row '{name}' (choose from: {', '.join(ROW_NAMES)}; NAME@N or NAME-seedN: seed N)")


def select_rows(text: str | None) -> list[Row]:
    """Rows from a comma-separated list, in the order given (its priority); 'all' or empty: every row. NAME@N is
    NAME's replicate with seed N."""
    if not text or text == "all":
        return list(ROWS)
    names = list(dict.fromkeys(n.strip().replace("@", "-seed") for n in text.split(",") if n.strip()))
    return [row_by_name(n) for n in names]


def latency_target(row: Row) -> tuple[str, ...]:
    """The (device, batch) a latency-aware row plans for: rows with the same target share one latency table."""
    options = list(row.options)
    return tuple(options[options.index(key) + 1] for key in ("--latency-device", "--latency-batch") if key in options)


def common_options(data: str, device: str, limit: int | None, val_size: int = VAL_SIZE) -> list[str]:
    """Options every command shares (val_size: train images held out for validation, the same seeded split in every
    command, so that no row's search judges on images the baseline trained on)."""
    return (["--model", "resnet56", "--data", data, "--device", device, "--val-size", str(val_size)]
            + (["--limit", str(limit)] if limit else []))


def baseline_argv(init: str, out: str, epochs: int, data: str, device: str, limit: int | None,
                  schedule: str = "onecycle", val_size: int = VAL_SIZE) -> list[str]:
    """The strong baseline recipe: the published checkpoint fine-tuned on the JPEG train set less the `val_size` images
    held out (every row holds out the same VAL_SIZE; 0 trains on every train image), with SGD nesterov 0.9, OneCycle to
    lr 0.1 (`schedule`: ours, or onecycle-torch, torch's OneCycleLR with its momentum cycling), weight decay 5e-4,
    batch 256, crop + flip, bf16."""
    return common_options(data, device, limit, val_size) + [
        "--init", init, "--epochs", str(epochs), "--batch-size", "256", "--lr", "0.1", "--schedule", schedule,
        "--weight-decay", "5e-4", "-o", out]


RECIPES = {"cosine": (), "onecycle": ONECYCLE}  # the rows' common fine-tune schedule (cosine: lr 0.05, no warm-up)


def row_argv(row: Row, baseline: str, out: str, epochs: int, data: str, device: str, limit: int | None,
             latency_device: str = "cuda", recipe: str = "cosine") -> list[str]:
    """A row's `compress train` arguments: fine-tune `epochs` (or the row's own budget) from the baseline (batch 512,
    weight decay 5e-4; the row's own recipe, else the common one: cosine from lr 0.05, or OneCycle to lr 0.1) on the
    train images less the VAL_SIZE held out, with the baseline as the teacher when the row distills."""
    chosen = row.recipe or RECIPES[recipe]
    schedule = dict(zip(chosen[::2], chosen[1::2]))
    argv = common_options(data, device, limit)
    argv += ["--init", baseline, "--epochs", str(row.finetune_epochs(epochs)), "--batch-size", "512",
             "--lr", schedule.get("--lr", "0.05"), "--schedule", schedule.get("--schedule", "cosine"),
             "--weight-decay", "5e-4"]
    argv += [o.format(latency_device=latency_device) for o in row.options]
    if row.kd:
        argv += ["--distill", baseline]
    return argv + ["-o", out]


def row_summary(name: str, metrics: dict, finetune_epochs: int) -> dict:
    """The issue's row keys (latency filled in later) plus what the reading needs."""
    row = None if name == BASELINE else row_by_name(name)
    summary = {"name": name, "label": "baseline (strong recipe)" if row is None else row.label,
               "test_top1": round(metrics["test_top1"], 2), "macs_reduction": round(metrics["macs_reduction"], 4),
               "latency_ms": {"cuda_b1": None, "cuda_b128": None, "cpu1": None}, "baseline": row is None,
               "epochs": len(metrics.get("history", [])) if row is None else row.finetune_epochs(finetune_epochs),
               "command": metrics.get("command"), "kd": bool(row and row.kd), "val_top1": _finite(metrics["val_top1"]),
               "init_test_top1": metrics.get("init_test_top1"), "macs_after": metrics["macs_after"],
               "params_after": metrics["params_after"], "blocks_removed": metrics["blocks_removed"],
               "filters_removed": metrics["filters_removed"], "seconds": metrics.get("seconds"),
               "slim_check": metrics["export"]["slim_check"], "slim_onnx": Path(metrics["export"]["slim_onnx"]).name,
               "history_val_top1": [_finite(h.get("val_top1")) for h in metrics.get("history", [])]}
    if "gsm" in metrics:
        summary["gsm_before_finetune"] = {"val_top1": metrics.get("gsm_val_top1"), "test_top1": metrics.get("gsm_test_top1")}
    if "amsc" in metrics:
        a = metrics["amsc"]
        summary["amsc"] = {k: a.get(k) for k in ("lambda_depth", "lambda_width", "notes", "weighting", "chosen")}
        summary["amsc"]["trials"] = [{k: t.get(k) for k in ("stage", "lambda_depth", "lambda_width", "val_top1",
                                                             "val_sparse", "macs_removed", "blocks_zero", "filters_zero")}
                                     for t in a.get("trials", [])]
    if "plan" in metrics:
        plan = metrics["plan"]
        summary["plan"] = {k: plan.get(k) for k in ("method", "target", "macs_reduction", "plan_export")}
        if isinstance(plan.get("latency"), dict):
            summary["plan"]["latency"] = {k: v for k, v in plan["latency"].items() if isinstance(v, (int, float, str))}
    return summary


def _finite(value) -> float | None:
    """A float rounded to 2 places, None for NaN (no validation split) or a missing value: the JSON stays standard."""
    return None if value is None or not math.isfinite(value) else round(value, 2)


def _fmt(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(rows: list[dict], header: list[str]) -> str:
    """The Markdown table (Δ against the baseline and against the baseline given the rows' extra epochs)."""
    base = next((r for r in rows if r["baseline"]), None)
    extra = next((r for r in rows if r["name"] == "baseline-ft"), None)
    b128 = base["latency_ms"].get("cuda_b128") if base else None
    lines = [*header, "", "| row | test top-1 % | Δ baseline | Δ baseline+ft | MACs removed | blocks | filters | "
             "cuda b1 ms | cuda b128 ms | cpu:1 ms | b128 speedup | KD | epochs |", "|" + "---|" * 13]
    for r in sorted(rows, key=lambda r: (not r["baseline"], -r["test_top1"])):
        lat = r["latency_ms"]
        speed = (b128 / lat["cuda_b128"]) if b128 and lat.get("cuda_b128") else None
        cells = [r["label"], f"{r['test_top1']:.2f}", _fmt(base and r["test_top1"] - base["test_top1"], "+.2f"),
                 _fmt(extra and r["test_top1"] - extra["test_top1"], "+.2f"), f"{100 * r['macs_reduction']:.1f}%",
                 str(r["blocks_removed"]), str(r["filters_removed"]), _fmt(lat.get("cuda_b1"), ".3f"),
                 _fmt(lat.get("cuda_b128"), ".3f"), _fmt(lat.get("cpu1"), ".3f"), _fmt(speed, ".2f"),
                 "yes" if r["kd"] else "", str(r["epochs"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += seed_summary(rows)
    gsm = [r for r in rows if "gsm_before_finetune" in r]
    if gsm:
        lines += ["", "GSM right after its phase (exact zeros, no fine-tune) vs after the fine-tune (test top-1 %):", ""]
        lines += [f"- {r['label']}: {_fmt(r['gsm_before_finetune']['test_top1'], '.2f')} → {r['test_top1']:.2f}"
                  for r in gsm]
    amsc = [r for r in rows if "amsc" in r]
    if amsc:
        lines += ["", "AMSC searches (chosen λ0, λ1; judged validation top-1 of the chosen trial; notes):", ""]
        for r in amsc:
            a = r["amsc"]
            lines.append(f"- {r['label']}: λ0 {_fmt(a['lambda_depth'], '.4g')}, λ1 {_fmt(a['lambda_width'], '.4g')}, "
                         f"{len(a['trials'])} trials, {r['blocks_removed']} blocks + {r['filters_removed']} filters; "
                         + " ".join(a.get("notes") or []))
    lines += ["", "## Commands", ""] + [f"- {r['name']}: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def seed_summary(rows: list[dict]) -> list[str]:
    """Markdown lines: mean and sample standard deviation of the test top-1 of every row run with several seeds (the
    row itself counts as seed 0); none when no row has a replicate."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        match = SEED_SUFFIX.match(r["name"])
        groups.setdefault(match[1] if match else r["name"], []).append(r["test_top1"])
    repeated = {name: values for name, values in groups.items() if len(values) > 1}
    if not repeated:
        return []
    lines = ["", "Rows run with several seeds (test top-1 %: mean ± sample standard deviation, the values):", ""]
    for name, values in repeated.items():
        lines.append(f"- {name}: {statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} "
                     f"({', '.join(f'{v:.2f}' for v in values)})")
    return lines


def pareto_plot(rows: list[dict], path: Path, key: str | None = None) -> bool:
    """Top-1 against measured latency (one point per row, Pareto front drawn): cuda b128 when timed, else cpu:1;
    False when nothing was timed."""
    if key is None:
        key = "cuda_b128" if any(r["latency_ms"].get("cuda_b128") for r in rows) else "cpu1"
    points = [(r["latency_ms"].get(key), r["test_top1"], r) for r in rows if r["latency_ms"].get(key)]
    if not points:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 6))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for latency, top1, r in points:
        marker = "*" if r["baseline"] else ("o" if r["kd"] else "s")
        axes.scatter([latency], [top1], marker=marker, s=120 if r["baseline"] else 40)
        axes.annotate(r["name"], (latency, top1), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front, best = [], -1.0
    for latency, top1, _ in sorted(points, key=lambda p: (p[0], -p[1])):
        if top1 > best:
            front.append((latency, top1))
            best = top1
    axes.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", linewidth=1)
    axes.set_xlabel(f"ONNX Runtime p50 latency, {key.replace('_', ' ')} (ms)")
    axes.set_ylabel("CIFAR-10 (JPEG) test top-1 %")
    axes.set_title("ResNet-56: accuracy vs measured latency (o: KD, s: no KD, *: baseline)")
    axes.grid(True, alpha=0.3)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return True


def load_rows(path: Path) -> dict[str, dict]:
    """Rows by name from a packed rows JSON ({"rows": [...]})."""
    return {r["name"]: r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}

"""CIFAR-10 (JPEG) ResNet-56 with training: the baseline fine-tune, AMSC at ~58% fewer MACs and its ablations, and
other methods' rows with the same fine-tune budget, each exported, slimmed by `zeros`, checked against PyTorch and
timed with ONNX Runtime.

Every row is one `compress train` command (run in this process, so the JPEG data is decoded once); the table quotes
the commands. Rows (--rows, in this order):
  baseline          the published checkpoint fine-tuned on the JPEG train set (--baseline-epochs)
  amsc              AMSC both dimensions, depth first, lambda search for --ratio of MACs removed
  amsc-depth        AMSC depth-only          amsc-width   AMSC width-only
  amsc-uniform      AMSC both, uniform group weights      amsc-reverse  AMSC both, reverse weights
  graph-rw, l1      engine plan on the baseline's export -> frozen mask -> fine-tune
  gsm-structured    GSM on filter groups at --ratio        gsm-unstructured  GSM at 10% non-zero weights
Pruned rows start from the baseline checkpoint (this run's, or --baseline PATH from an earlier run, which the
baseline row then only evaluates, exports and times) and all get --finetune-epochs of fine-tuning after their
sparse phase. Results go to --out as cifar10_resnet56.{json,md} and
log.txt (and baseline.pt, for a later call with --baseline); the work files stay in --work.

GPU machine, one call (the lead's five part calls first; see ../shared/device/README.md):
    source .device/base/setup.sh && python3 benchmarks/cifar10_resnet56.py --data .device/base/data \\
        --models .device/base/models --out $OUT
Only the AMSC rows, from the committed baseline checkpoint (carry runs/r56-baseline.pt; about 8 minutes on an H200:
each AMSC trial is 2 sparse epochs + BN re-estimation + 1 recovery epoch + an export, about 10 s):
    source .device/base/setup.sh && python3 benchmarks/cifar10_resnet56.py --data .device/base/data \\
        --models .device/base/models --out $OUT --baseline runs/r56-baseline.pt \\
        --rows baseline,amsc,amsc-depth,amsc-width --time-limit 500
CPU smoke run:
    python3 benchmarks/cifar10_resnet56.py --data ../shared/data/cifar10 --models ../shared/models --out /tmp/r56 \\
        --limit 600 --baseline-epochs 1 --finetune-epochs 1 --sparse-epochs 1 --grid-points 2 --refine 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAME = "cifar10_resnet56"
AMSC_RECOVER_EPOCHS = 1  # AmscOptions.recover_epochs: the fine-tune epoch after each trial's sparse phase
CHECKPOINT_GLOB = "resnet56-*.th"
ALL_ROWS = ("baseline", "amsc", "amsc-depth", "amsc-width", "amsc-uniform", "amsc-reverse", "graph-rw", "l1",
            "gsm-structured", "gsm-unstructured")
DEFAULT_ROWS = "baseline,amsc,amsc-depth,amsc-width"
LABELS = {
    "baseline": "baseline (checkpoint fine-tuned)", "amsc": "AMSC (depth + width, adaptive)",
    "amsc-depth": "AMSC depth-only", "amsc-width": "AMSC width-only", "amsc-uniform": "AMSC, uniform weights",
    "amsc-reverse": "AMSC, reverse weights", "graph-rw": "graph-rw mask + fine-tune", "l1": "L1 mask + fine-tune",
    "gsm-structured": "GSM structured", "gsm-unstructured": "GSM unstructured (10% non-zero)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with cifar10-{train,test}.tar.xz")
    p.add_argument("--models", required=True, help="folder holding resnet56-*.th (searched recursively)")
    p.add_argument("--out", required=True, help="where the JSON, Markdown, log and baseline.pt go")
    p.add_argument("--work", default=None, help="work folder for checkpoints and ONNX files [a temp dir]")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, from: {','.join(ALL_ROWS)}")
    p.add_argument("--baseline", default=None, help="baseline .pt from an earlier run (skips the baseline row)")
    p.add_argument("--ratio", type=float, default=0.58, help="fraction of MACs to remove")
    p.add_argument("--baseline-epochs", type=int, default=15)
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--sparse-epochs", type=int, default=2, help="epochs per AMSC trial")
    p.add_argument("--gsm-epochs", type=int, default=6, help="epochs of GSM before its fine-tune")
    p.add_argument("--grid-points", type=int, default=3)
    p.add_argument("--refine", type=int, default=2)
    p.add_argument("--max-drop", type=float, default=2.0, help="AMSC depth stage: validation points it may lose")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.05, help="peak lr of the baseline and of every fine-tune")
    p.add_argument("--sparse-lr", type=float, default=0.02, help="constant lr of AMSC trials")
    p.add_argument("--gsm-lr", type=float, default=0.01, help="constant lr of GSM (momentum 0.98)")
    p.add_argument("--limit", type=int, default=None, help="train/test images (smoke runs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--time-limit", type=float, default=530.0, help="seconds; rows that would not fit are skipped")
    p.add_argument("--latency-runs", type=int, default=50)
    p.add_argument("--no-latency", action="store_true")
    return p.parse_args(argv)


# --- rows as `compress train` commands -----------------------------------------------------------------------------


def row_argv(row: str, args: argparse.Namespace, init: str, work: Path) -> list[str]:
    """The `compress train` arguments of one row."""
    common = ["--model", "resnet56", "--init", init, "--data", args.data, "--batch-size", str(args.batch_size),
              "--lr", str(args.lr), "--device", args.device, "-o", str(work / row)]
    if args.limit:
        common += ["--limit", str(args.limit)]
    if row == "baseline":  # with --baseline: 0 epochs, i.e. evaluate, export and time the given checkpoint
        return common + ["--epochs", "0" if args.baseline else str(args.baseline_epochs)]
    tune = common + ["--epochs", str(args.finetune_epochs)]
    if row.startswith("amsc"):
        dims = {"amsc-depth": "depth-only", "amsc-width": "width-only"}.get(row, "both")
        weights = {"amsc-uniform": "uniform", "amsc-reverse": "reverse"}.get(row, "adaptive")
        return tune + ["--method", "amsc", "--amsc", dims, "--amsc-weights", weights, "--search", "--ratio",
                       str(args.ratio), "--max-drop", str(args.max_drop), "--grid-points", str(args.grid_points),
                       "--refine", str(args.refine), "--sparse-epochs", str(args.sparse_epochs), "--sparse-lr",
                       str(args.sparse_lr)]
    if row in ("graph-rw", "l1"):
        return tune + ["--prune", row, "--ratio", str(args.ratio)]
    if row.startswith("gsm"):
        mode, ratio = ("structured", args.ratio) if row == "gsm-structured" else ("unstructured", 0.9)
        return tune + ["--method", "gsm", "--gsm", mode, "--ratio", str(ratio), "--sparse-epochs",
                       str(args.gsm_epochs), "--sparse-lr", str(args.gsm_lr)]
    raise SystemExit(f"unknown row '{row}' (choose from: {', '.join(ALL_ROWS)})")


def row_seconds(row: str, args: argparse.Namespace, epoch_seconds: float) -> float:
    """Expected seconds of a row (AMSC: a typical search, 3 s of export + engine per trial), for the time guard."""
    fixed = 15.0  # evaluation, export, slimming, checks
    if row == "baseline":
        return (0 if args.baseline else args.baseline_epochs) * epoch_seconds + fixed
    if row.startswith("amsc"):
        stages = 2 if row in ("amsc", "amsc-uniform", "amsc-reverse") else 1
        trials = stages * (args.grid_points + args.refine + 1) + (stages - 1)
        trial_epochs = args.sparse_epochs + AMSC_RECOVER_EPOCHS
        return (trials * trial_epochs + args.finetune_epochs) * epoch_seconds + 3.0 * trials + fixed
    if row.startswith("gsm"):
        return (args.gsm_epochs + args.finetune_epochs) * epoch_seconds + fixed
    return args.finetune_epochs * epoch_seconds + fixed + 5.0


def run_row(argv: list[str]) -> None:
    """Run `compress train ARGV` in this process; raise on failure."""
    from cli.main import main

    try:
        main(["train", *argv])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"compress train exited with {exc.code}") from None


# --- latency -------------------------------------------------------------------------------------------------------


def measure_latency(models: dict[str, str], runs: int, log) -> dict[str, dict[str, float]]:
    """Median ms per row for cuda batch 1 and 128 (if ONNX Runtime has CUDA) and cpu:1 batch 1."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    cells = [("cpu:1", 1)]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        cells = [("cuda", 1), ("cuda", 128)] + cells
    names, paths = list(models), list(models.values())
    result: dict[str, dict[str, float]] = {name: {} for name in names}
    for target, batch in cells:
        key = f"{target} b{batch}"
        try:
            from compressor.runtime.bench import run_benchmark

            report = run_benchmark(paths, [target], [batch], warmup=10, runs=runs, rounds=5, names=names,
                                   environment=False)
            for m in report.measurements:
                if target.startswith("cuda") and m.provider != "CUDAExecutionProvider":
                    raise RuntimeError(f"{m.model} ran on {m.provider}")
                result[m.model][key] = round(m.percentile_ms(50), 4)
            source = "compressor.runtime.bench"
        except Exception as exc:  # noqa: BLE001 - fall back to a plain timer rather than lose the row
            log(f"compressor.runtime.bench failed for {key} ({type(exc).__name__}: {exc}); using a simple timer")
            for name, path in models.items():
                result[name][key] = simple_latency(path, target, batch, runs)
            source = "simple timer"
        log(f"latency {key} ({source}): " + ", ".join(f"{n} {result[n][key]:.3f} ms" for n in names))
    return result


def simple_latency(path: str, target: str, batch: int, runs: int) -> float:
    """Median ms of `runs` inferences (after 10 warm-up runs) with random input; CUDA via IOBinding."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    if target == "cpu:1":
        options.intra_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
    else:
        providers = [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"})]
    session = ort.InferenceSession(path, options, providers=providers)
    if target != "cpu:1" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError("CUDAExecutionProvider did not take the session")
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    name = session.get_inputs()[0].name
    if target == "cpu:1":
        call = lambda: session.run(None, {name: x})  # noqa: E731
    else:
        binding = session.io_binding()
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        binding.bind_output(session.get_outputs()[0].name, "cuda")
        call = lambda: (session.run_with_iobinding(binding), binding.synchronize_outputs())  # noqa: E731
    for _ in range(10):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return round(float(np.median(times)), 4)


# --- report --------------------------------------------------------------------------------------------------------


def machine() -> dict:
    """Hardware and library versions of this run."""
    import onnxruntime
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "cpu": platform.processor() or platform.machine(), "host": platform.node()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import onnxscript

        info["onnxscript"] = onnxscript.__version__
    except ImportError:
        info["onnxscript"] = None
    return info


def summarize(row: str, metrics: dict, baseline_top1: float | None, args: argparse.Namespace) -> dict:
    """The table's numbers for one row."""
    summary = {
        "row": row, "label": LABELS[row], "command": metrics.get("command"), "test_top1": metrics["test_top1"],
        "val_top1": metrics["val_top1"], "delta_top1": (metrics["test_top1"] - baseline_top1) if baseline_top1 else None,
        "macs_before": metrics["macs_before"], "macs": metrics["macs_after"], "macs_reduction": metrics["macs_reduction"],
        "params_before": metrics["params_before"], "params": metrics["params_after"],
        "blocks_removed": metrics["blocks_removed"], "filters_removed": metrics["filters_removed"],
        "seconds": metrics.get("seconds"), "slim_check": metrics["export"]["slim_check"],
        "exporter": metrics["export"]["exporter"], "epochs_trained": len(metrics.get("history", [])),
        "slim_onnx": metrics["export"]["slim_onnx"],
    }
    if "amsc" in metrics:
        amsc = metrics["amsc"]
        summary["amsc"] = {k: amsc[k] for k in ("lambda_depth", "lambda_width", "chosen", "trials", "notes", "weighting")}
        summary["epochs_trained"] += len(amsc["trials"]) * (args.sparse_epochs + AMSC_RECOVER_EPOCHS)
    if "gsm" in metrics:
        summary["epochs_trained"] += args.gsm_epochs
        summary["gsm"] = {k: v for k, v in (metrics["gsm"] or {}).items() if k != "layer_sparsity"}
    if "plan" in metrics:
        summary["plan"] = {k: metrics["plan"].get(k) for k in ("method", "macs_reduction", "plan_export")}
    return summary


def _fmt(value, spec: str, empty: str = "–") -> str:
    return empty if value is None else format(value, spec)


def markdown(result: dict) -> str:
    """The Markdown report."""
    rows = result["rows"]
    lat_keys = sorted({k for r in rows for k in r.get("latency_ms", {})}, key=lambda k: (k.startswith("cpu"), len(k), k))
    head = ["method", "test top-1 %", "Δ vs baseline", "MACs (M)", "MACs removed", "params (K)", "blocks removed",
            "filters removed"] + [f"{k} ms" for k in lat_keys] + ["epochs"]
    lines = [f"# CIFAR-10 (JPEG) ResNet-56: baseline, AMSC and other methods with fine-tuning", "",
             f"Machine: {result['machine']}", "", f"Script: `{result['script_command']}`", "",
             f"Total {result['seconds']:.0f} s. Every slim model's ONNX Runtime output equals PyTorch's on "
             f"{rows[0]['slim_check']['images'] if rows else 0} real test images (max |diff| in the JSON). "
             "Epochs: all training of the row after the baseline (AMSC: every search trial plus the fine-tune).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], f"{r['test_top1']:.2f}", _fmt(r["delta_top1"], "+.2f"), f"{r['macs'] / 1e6:.1f}",
                 f"{100 * r['macs_reduction']:.1f}%", f"{r['params'] / 1e3:.0f}", str(r["blocks_removed"]),
                 str(r["filters_removed"])] + [_fmt(r.get("latency_ms", {}).get(k), ".3f") for k in lat_keys] \
            + [str(r["epochs_trained"])]
        lines.append("| " + " | ".join(cells) + " |")
    for name, reason in result.get("skipped", {}).items():
        lines.append(f"\nSkipped {name}: {reason}")
    lines += ["", "## Commands", ""]
    for r in rows:
        lines.append(f"- {r['label']}: `{r['command']}`")
    for r in rows:
        if "amsc" in r:
            a = r["amsc"]
            lines += ["", f"## {r['label']}: lambda search (validation split, {a['weighting']} weights)", "",
                      f"Chosen lambda0 = {a['lambda_depth']:.4g}, lambda1 = {a['lambda_width']:.4g}. "
                      + " ".join(a["notes"]), "", "Judged val top-1: zero groups frozen, filters renormalized, BN "
                      "re-estimated, 1 recovery epoch; raw: right after the sparse phase.", "",
                      "| stage | lambda0 | lambda1 | judged val top-1 % | raw val top-1 % | MACs removed | "
                      "zero blocks | zero filters |", "|---|---|---|---|---|---|---|---|"]
            for t in a["trials"]:
                raw = _fmt(t.get("val_sparse"), ".2f")
                lines.append(f"| {t['stage']} | {t['lambda_depth']:.4g} | {t['lambda_width']:.4g} | {t['val_top1']:.2f} | "
                             f"{raw} | {100 * t['macs_removed']:.1f}% | {t['blocks_zero']} | {t['filters_zero']} |")
    if any("gsm" in r for r in rows):
        lines += ["", "GSM unstructured zeros single weights: ONNX Runtime runs dense kernels, so that model is not "
                  "faster or smaller; its sparsity is in the JSON."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("COMPRESSOR_DEBUG", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="r56-work-"))
    work.mkdir(parents=True, exist_ok=True)
    log_file = (out / "log.txt").open("a")

    def log(text: str) -> None:
        line = f"[{time.perf_counter() - started:6.0f}s] {text}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ALL_ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown} (choose from: {', '.join(ALL_ROWS)})")
    checkpoints = sorted(Path(args.models).rglob(CHECKPOINT_GLOB))
    if not checkpoints and not args.baseline:
        raise SystemExit(f"no {CHECKPOINT_GLOB} under {args.models}")
    if args.baseline and not Path(args.baseline).is_file():
        raise SystemExit(f"baseline checkpoint not found: {args.baseline}")
    try:
        import PIL  # noqa: F401
    except ImportError:
        log("Pillow is missing: JPEG decoding falls back to torchvision.io (fails loudly if that is missing too)")
    result = {"machine": machine(), "script_command": shlex.join(["python3", *sys.argv]) if argv is None
              else shlex.join(["python3", "benchmarks/cifar10_resnet56.py", *argv]),
              "settings": vars(args), "rows": [], "skipped": {}}
    log(f"machine: {result['machine']}; rows: {rows}; work: {work}")
    baseline_pt = args.baseline
    baseline_top1 = None
    epoch_seconds = 3.0  # until measured; ResNet-56 on an H100/H200 at batch 512, bf16, resident data: ~2.2-3 s
    reserve = 0.0 if args.no_latency else 30.0
    for row in rows:
        if row != "baseline" and not baseline_pt:
            result["skipped"][row] = "no baseline checkpoint (run the baseline row or pass --baseline)"
            continue
        elapsed = time.perf_counter() - started
        need = row_seconds(row, args, epoch_seconds)
        if elapsed + need + reserve > args.time_limit:
            result["skipped"][row] = f"time: ~{need:.0f} s needed, {args.time_limit - elapsed - reserve:.0f} s left"
            log(f"skip {row}: {result['skipped'][row]}")
            continue
        init = (args.baseline or checkpoints[0].as_posix()) if row == "baseline" else baseline_pt
        argv_row = row_argv(row, args, init, work)
        log(f"row {row}: compress train {shlex.join(argv_row)}")
        try:
            run_row(argv_row)
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
            result["skipped"][row] = f"failed: {type(exc).__name__}: {exc}"
            log(f"row {row} FAILED:\n{traceback.format_exc()}")
            continue
        metrics = json.loads((work / f"{row}.json").read_text())
        if row == "baseline" and not args.baseline:
            baseline_pt = str(work / "baseline.pt")
            shutil.copy(baseline_pt, out / "baseline.pt")
            epochs = [h["seconds"] for h in metrics["history"]]
            epoch_seconds = sorted(epochs)[len(epochs) // 2] if epochs else epoch_seconds
        if baseline_top1 is None and row == "baseline":
            baseline_top1 = metrics["test_top1"]
        summary = summarize(row, metrics, baseline_top1, args)
        result["rows"].append(summary)
        log(f"row {row}: test {summary['test_top1']:.2f}%  MACs -{100 * summary['macs_reduction']:.1f}%  "
            f"blocks {summary['blocks_removed']}  filters {summary['filters_removed']}  ({metrics.get('seconds', 0):.0f} s)")
        write(out, result, started)
    if not args.no_latency and result["rows"]:
        models = {r["row"]: r["slim_onnx"] for r in result["rows"]}
        try:
            latency = measure_latency(models, args.latency_runs, log)
            for r in result["rows"]:
                r["latency_ms"] = latency.get(r["row"], {})
        except Exception:  # noqa: BLE001 - keep the accuracy table even if timing fails
            log(f"latency FAILED:\n{traceback.format_exc()}")
    write(out, result, started)
    log(f"done in {time.perf_counter() - started:.0f} s; wrote {out / (NAME + '.md')}")
    return 0


def write(out: Path, result: dict, started: float) -> None:
    """Write the JSON and Markdown reports (called after every row, so a cut-off run keeps what it has)."""
    result["seconds"] = time.perf_counter() - started
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{NAME}.md").write_text(markdown(result))


if __name__ == "__main__":
    sys.exit(main())

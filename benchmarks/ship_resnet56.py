"""CIFAR-10 ResNet-56: top-1 of the same model in fp32, fp16 and int8, before and after compression (issue 14).

Exports the published ResNet-56 checkpoint to ONNX (torch, dynamo=False, dynamic batch), compresses it with
`l1 --ratio R` (no fine-tuning), converts the original and the compressed model to fp16 (ONNX Runtime's
float16 converter, fp32 I/O) and int8 (QDQ, per channel, U8S8, calibrated on --calib-count images of the train
split) through `compressor.compress(..., precision=...)`, evaluates every model on the full JPEG test set with ONNX
Runtime (CPU) and times fp32 vs int8 on cpu:1 with the project's bench (models interleaved). Writes
ship_resnet56.{md,json} to --out.

    python3 benchmarks/ship_resnet56.py                                  # full run: ../shared, benchmarks/results
    python3 benchmarks/ship_resnet56.py --limit 500 --out /tmp/s56       # quick look

About 10 minutes on the 2-core dev machine (the fp16 models run on the CPU through ONNX Runtime's inserted casts).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cifar_resnet56_nofinetune import export_resnet56, top1  # noqa: E402
from compressor import compress  # noqa: E402
from compressor.runtime.bench import run_benchmark  # noqa: E402
from compressor.datasets import load_cifar10, normalize_nchw  # noqa: E402

NAME = "ship_resnet56"
CHECKPOINT = "cifar10-resnet/resnet56-4bfd9763.th"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--models", type=Path, default=ROOT.parent / "shared" / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=None, help="Keep the ONNX models here (default: a temp dir).")
    parser.add_argument("--ratio", type=float, default=0.2, help="Fraction of MACs removed (l1).")
    parser.add_argument("--round-to", type=int, default=1, help="Channel multiple (8 halves CIFAR's 16-wide stage).")
    parser.add_argument("--calib-count", type=int, default=1024, help="Train images for int8 calibration.")
    parser.add_argument("--limit", type=int, default=None, help="Evaluate on this many test images (default all).")
    parser.add_argument("--bench-runs", type=int, default=30, help="Timed runs per model on cpu:1 (0: no timing).")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python3 benchmarks/ship_resnet56.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    work = args.work or Path(tempfile.mkdtemp(prefix="ship56-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    source = work / "resnet56.onnx"
    export_resnet56(args.models / CHECKPOINT, source)
    train_x, _ = load_cifar10(args.data, "train", limit=args.calib_count)
    test_x, test_y = load_cifar10(args.data, "test", limit=args.limit)
    calib = work / "calib.npy"
    np.save(calib, normalize_nchw(train_x))
    test_x = normalize_nchw(test_x)
    print(f"data: {len(train_x)} calibration images, {len(test_y)} test images", file=sys.stderr)

    rows, reports = [], {}
    rounding = f" round-to {args.round_to}" if args.round_to > 1 else ""
    for label, ratio in (("original", None), (f"l1 r{args.ratio}{rounding}", args.ratio)):
        for precision in ("fp32", "fp16", "int8"):
            stem = f"resnet56.{'orig' if ratio is None else f'l1r{ratio}'}.{precision}"
            path = work / f"{stem}.onnx"
            method = "zeros" if ratio is None else "l1"
            result = compress(source, method=method, ratio=ratio, round_to=args.round_to, precision=precision,
                              precision_calib=calib if precision == "int8" else None)
            result.save(path)
            accuracy = top1(path.read_bytes(), test_x, test_y, 250)
            agreement = result.report.get("precision", {})
            flags = ["--method", method] + ([] if ratio is None else ["--ratio", str(ratio)])
            flags += ["--round-to", str(args.round_to)] if args.round_to > 1 and ratio is not None else []
            flags += [] if precision == "fp32" else ["--precision", precision]
            flags += ["--precision-calib", "calib.npy"] if precision == "int8" else []
            rows.append({"model": label, "precision": precision, "path": path.name, "top1": round(accuracy, 2),
                         "macs": result.report["macs_after"], "bytes": result.report["bytes_after"],
                         "rel_error_vs_fp32": agreement.get("worst_relative_error"),
                         "top1_agreement_vs_fp32": agreement.get("worst_top1_agreement"),
                         "command": "compress resnet56.onnx " + " ".join(flags) + f" -o {path.name}"})
            reports[stem] = result.report
            print(f"{label} {precision}: top-1 {accuracy:.2f}%", file=sys.stderr)
    bench = None
    if args.bench_runs:
        paths = [work / row["path"] for row in rows if row["precision"] in ("fp32", "int8")]
        bench = run_benchmark(paths, ["cpu:1"], [1, 32], warmup=3, runs=args.bench_runs, rounds=3)
    write_outputs(args, command, rows, reports, bench, time.perf_counter() - started)


def write_outputs(args, command: str, rows: list[dict], reports: dict, bench, seconds: float) -> None:
    """ship_resnet56.md (tables) and ship_resnet56.json (rows, compression reports, bench) in --out."""
    import onnxruntime as ort

    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, ORT {ort.__version__} CPU, numpy {np.__version__}"
    lines = [f"# CIFAR-10 ResNet-56: fp32, fp16 and int8 of the same model (issue 14)", "",
             f"Command: `{command}`  ", f"Machine: 2-core CPU dev machine ({machine}); {seconds / 60:.1f} min  ",
             f"Model: `../shared/models/{CHECKPOINT}` exported to ONNX (torch, dynamo=False, dynamic batch), no "
             f"fine-tuning. int8: QDQ, per-channel weights, U8S8, MinMax ranges from {args.calib_count} train images; "
             "fp16: ONNX Runtime's float16 converter, fp32 inputs/outputs. Top-1 with ONNX Runtime CPU on "
             f"{'all 10000' if args.limit is None else args.limit} images of the JPEG test set; agreement and "
             "relative logit error vs the fp32 model of the same row group, on 64 calibration images (the "
             "command's own check).", "",
             "| model | precision | top-1 (%) | Δ vs fp32 (points) | MACs (M) | bytes | rel. logit error | top-1 agreement |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    base = {}
    for row in rows:
        base.setdefault(row["model"], row["top1"])
        err = "" if row["rel_error_vs_fp32"] is None else f"{row['rel_error_vs_fp32']:.4f}"
        agree = "" if row["top1_agreement_vs_fp32"] is None else f"{row['top1_agreement_vs_fp32']:.3f}"
        lines.append(f"| {row['model']} | {row['precision']} | {row['top1']:.2f} | {row['top1'] - base[row['model']]:+.2f} | "
                     f"{row['macs'] / 1e6:.2f} | {row['bytes']:,} | {err} | {agree} |")
    lines += ["", "Commands (from the folder holding resnet56.onnx and calib.npy):", ""]
    lines += [f"- `{row['command']}`" for row in rows]
    if bench is not None:
        lines += ["", "## fp32 vs int8 on cpu:1 (models interleaved, `compressor.runtime.bench.run_benchmark`)", "",
                  bench.to_markdown().split("## Results", 1)[1].split("## Ratios", 1)[0].strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    data = {"command": command, "rows": rows, "reports": reports, "bench": bench.to_dict() if bench else None}
    (args.out / f"{NAME}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(f"wrote {args.out / NAME}.md and .json", file=sys.stderr)


if __name__ == "__main__":
    main()

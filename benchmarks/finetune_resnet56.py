"""`compress finetune` on CIFAR-10 ResNet-56 (issue 13): the published checkpoint as ONNX, compressed with plain l1 at
50% and 30% fewer MACs, fine-tuned with distillation from the original on the JPEG train set; the unpruned ONNX model
fine-tuned by the same command for the same epochs is the bar (aim: within 0.5 points of it).

Rows (--rows, in this order): unpruned (ORIGINAL fine-tuned, teacher itself), l1-50, l1-30 (--ratios). Each row is
one `compress ORIGINAL --method l1 --ratio R` (a subprocess; with --calib-count N it also passes --calib with N
preprocessed train images when the installed compressor has --calib) and one `compress finetune` run in this process
(the JPEG data is decoded once). Top-1 on the CIFAR-10 test set before and after, measured in PyTorch on the module
that is written back into the ONNX graph (checked equal to ONNX Runtime on real test images by the command).
Results: --out/finetune_resnet56.{md,json} (rewritten after every row), the models in --work.

GPU machine (onnx2torch carried as a wheel), 30 epochs per row in two calls of at most 10 minutes (the second
joins the first's rows with --previous; carry the first call's finetune_resnet56.json as runs/ft56-call1.json):
    source .device/base/setup.sh && pip install --no-deps onnx2torch-1.5.15-py3-none-any.whl && \\
        python3 benchmarks/finetune_resnet56.py \\
        --data .device/base/data --models .device/base/models --out $OUT --rows unpruned,l1 --ratios 0.5 --time-limit 560
    source .device/base/setup.sh && pip install --no-deps onnx2torch-1.5.15-py3-none-any.whl && \\
        python3 benchmarks/finetune_resnet56.py \\
        --data .device/base/data --models .device/base/models --out $OUT --rows l1 --ratios 0.3 \\
        --previous runs/ft56-call1.json --time-limit 560
CPU smoke run (about 7 minutes on the shared 2-core dev machine):
    python3 benchmarks/finetune_resnet56.py --data ../shared/data/cifar10 --models ../shared/models/cifar10-resnet \\
        --out /tmp/ft56 --epochs 1 --limit 512 --device cpu
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cifar10_resnet56 import machine  # noqa: E402
from cifar_resnet56_nofinetune import export_resnet56  # noqa: E402

NAME = "finetune_resnet56"
CHECKPOINT_GLOB = "resnet56-*.th"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with cifar10-{train,test}.tar.xz")
    parser.add_argument("--models", type=Path, required=True, help="folder holding resnet56-*.th (searched recursively)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None, help="where the ONNX models go [a temp folder]")
    parser.add_argument("--rows", default="unpruned,l1", help="unpruned and/or l1 (one l1 row per --ratios entry)")
    parser.add_argument("--ratios", default="0.5,0.3")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, default=None, help="train/test images (smoke runs)")
    parser.add_argument("--calib-count", type=int, default=0,
                        help="pass --calib with this many train images to compress (when it has --calib)")
    parser.add_argument("--previous", type=Path, default=None,
                        help="finetune_resnet56.json of an earlier call: its rows join this table (not re-run)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds: skip a row whose predicted time (from the first row's) would pass this")
    return parser.parse_args(argv)


def compress_supports_calib() -> bool:
    """Whether the installed `compress` has the --calib option of the recovery issue."""
    help_text = subprocess.run([sys.executable, "-m", "cli.main", "--help"], cwd=ROOT, capture_output=True,
                               text=True).stdout
    return "--calib" in help_text


def calibration_file(args: argparse.Namespace, work: Path) -> Path:
    """--calib-count preprocessed train images as one float32 NCHW .npy (the seeded class-balanced subset)."""
    import numpy as np

    from compressor.datasets import load_cifar10, normalize_nchw

    images, _ = load_cifar10(args.data, "train", args.calib_count)
    path = work / f"calib{args.calib_count}.npy"
    np.save(path, normalize_nchw(images))
    return path


def compress_command(original: Path, ratio: float, slim: Path, calib: Path | None, count: int) -> list[str]:
    """`compress ORIGINAL --method l1 --ratio R -o SLIM [--calib F --calib-count N]`."""
    argv = ["compress", str(original), "--method", "l1", "--ratio", str(ratio), "-o", str(slim), "--quiet"]
    return argv + (["--calib", str(calib), "--calib-count", str(count)] if calib else [])


def finetune_command(student: Path, teacher: Path, out: Path, report: Path, args: argparse.Namespace) -> list[str]:
    """The `compress finetune` command of a row."""
    argv = ["compress", "finetune", str(student), "--teacher", str(teacher), "--data", str(args.data), "-o", str(out),
            "--report", str(report), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--temperature", str(args.temperature), "--alpha", str(args.alpha),
            "--device", args.device]
    return argv + (["--limit", str(args.limit)] if args.limit else [])


def run_compress(argv: list[str]) -> None:
    """Run a `compress` command in a subprocess (the ONNX path; no torch); raise on failure."""
    done = subprocess.run([sys.executable, "-m", "cli.main", *argv[1:]], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed: {done.stderr.strip()[-500:]}")


def run_finetune(argv: list[str]) -> None:
    """Run `compress finetune` in this process; raise on failure."""
    from cli.main import main

    try:
        main(argv[1:])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"{shlex.join(argv)} exited with {exc.code}") from None


def markdown(result: dict) -> str:
    """The committed table."""
    rows = result["rows"]
    bar = next((r["top1_after"] for r in rows if r["row"] == "unpruned" and "top1_after" in r), None)
    lines = [f"# `compress finetune` on CIFAR-10 ResNet-56 (issue 13)", "",
             f"Command: `{result['command']}`  ", f"Machine: {json.dumps(result['machine'])}  ",
             f"Total {result['seconds']:.0f} s. Top-1 on the {rows[0].get('test_images', '?') if rows else '?'} "
             "CIFAR-10 test images; before = the ONNX model as given (the pruned ones without training), after = "
             "`compress finetune` with distillation from the original ONNX model; gap = after - unpruned after.", "",
             "| row | MACs | MACs removed | top-1 before | top-1 after | gap to unpruned | epochs | s/epoch | commands |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['row']} | | | | | | | | {r.get('error') or r.get('skipped')} |")
            continue
        gap = f"{r['top1_after'] - bar:+.2f}" if bar is not None else "–"
        lines.append(f"| {r['row']} | {r['macs']:,} | {100 * r['macs_removed']:.1f}% | {r['top1_before']:.2f}% | "
                     f"{r['top1_after']:.2f}% | {gap} | {r['epochs']} | {r['seconds_per_epoch']:.1f} | "
                     + " ; ".join(f"`{c}`" for c in r["commands"]) + " |")
    lines += ["", f"Compress step: {result['compress_step']}.", ""]
    return "\n".join(lines)


def write(out: Path, result: dict) -> None:
    """Rewrite the json and md results."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{NAME}.md").write_text(markdown(result))


def main(argv: list[str] | None = None) -> int:
    """Run the rows; return 0 when every row ran."""
    args = parse_args(argv)
    started = time.perf_counter()
    checkpoints = sorted(args.models.rglob(CHECKPOINT_GLOB))
    if not checkpoints:
        raise SystemExit(f"no {CHECKPOINT_GLOB} under {args.models}")
    work = args.work or Path(tempfile.mkdtemp(prefix="finetune-r56-"))
    work.mkdir(parents=True, exist_ok=True)
    original = work / "resnet56.onnx"
    export_resnet56(checkpoints[0], original)
    calib = None
    step = "plain l1 (no --calib-count)"
    if args.calib_count:
        if compress_supports_calib():
            calib, step = calibration_file(args, work), f"l1 with --calib ({args.calib_count} train images)"
        else:
            step = f"plain l1 (--calib-count {args.calib_count} given, but this compressor has no --calib)"
    plan = []
    for row in args.rows.split(","):
        if row == "unpruned":
            plan.append(("unpruned", None))
        elif row == "l1":
            plan += [(f"l1-{round(100 * float(r))}", float(r)) for r in args.ratios.split(",")]
        else:
            raise SystemExit(f"unknown row {row} (unpruned, l1)")
    result = {"command": shlex.join(["python3", "benchmarks/finetune_resnet56.py", *(argv or sys.argv[1:])]),
              "machine": machine(), "checkpoint": checkpoints[0].name, "compress_step": step, "rows": [],
              "seconds": 0.0}
    if args.previous:
        earlier = json.loads(args.previous.read_text())
        names = {name for name, _ in plan}
        result["rows"] = [dict(r, call="previous") for r in earlier["rows"] if r["row"] not in names and "top1_after" in r]
        result["previous_command"] = earlier["command"]
    row_seconds: list[float] = []
    for name, ratio in plan:
        elapsed = time.perf_counter() - started
        if args.time_limit and row_seconds and elapsed + max(row_seconds) > args.time_limit:
            result["rows"].append({"row": name, "skipped": f"time limit ({elapsed:.0f} s spent)"})
            continue
        row_start = time.perf_counter()
        commands = []
        try:
            student = original
            if ratio is not None:
                student = work / f"resnet56.{name}.onnx"
                commands.append(compress_command(original, ratio, student, calib, args.calib_count))
                run_compress(commands[-1])
            out, report = work / f"resnet56.{name}.finetuned.onnx", work / f"resnet56.{name}.finetuned.json"
            commands.append(finetune_command(student, original, out, report, args))
            run_finetune(commands[-1])
            metrics = json.loads(report.read_text())
            from compressor.engine.cost import model_cost

            macs_original = model_cost(str(original)).macs
            result["rows"].append({
                "row": name, "ratio": ratio, "macs": metrics["macs"], "macs_removed": 1 - metrics["macs"] / macs_original,
                "top1_before": metrics["top1_before"], "top1_after": metrics["top1_after"],
                "teacher_top1": metrics["teacher_top1"], "epochs": args.epochs,
                "seconds_per_epoch": metrics["train_seconds"] / max(args.epochs, 1),
                "test_images": metrics["images"]["test"], "check": metrics["check"], "history": metrics["history"],
                "commands": [shlex.join(c) for c in commands], "seconds": time.perf_counter() - row_start})
        except Exception as exc:  # noqa: BLE001 - a failed row is reported, the others still run
            result["rows"].append({"row": name, "error": f"{type(exc).__name__}: {exc}"[:400],
                                   "commands": [shlex.join(c) for c in commands]})
        row_seconds.append(time.perf_counter() - row_start)
        result["seconds"] = time.perf_counter() - started
        write(args.out, result)
        print(f"[{NAME}] {json.dumps({k: v for k, v in result['rows'][-1].items() if k != 'history'})}",
              file=sys.stderr, flush=True)
    return 0 if all("top1_after" in r for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""What `--calib` costs: torchvision ResNet-50 at 224×224 (seeded random weights), `compress --method l1 --ratio 0.5`
with and without `--calib` on a folder of JPEG images, each run in a fresh process: wall seconds, seconds per stage
and peak resident memory (the process's ru_maxrss), plus the machine's load average for context.

    python3 benchmarks/calib_cost_resnet50.py                         # 1024 images, writes benchmarks/results/
    python3 benchmarks/calib_cost_resnet50.py --count 64 --out /tmp/cc # quick look

The images are seeded noise JPEGs of 256×256 (the loader resizes and center-crops them to 224): the cost does not
depend on what they show. The model is exported with torch (`export_resnet50` of cifar_resnet56_nofinetune.py);
`compress` itself never imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

NAME = "calib_cost_resnet50"
METHOD_PLAN = {"calib_importance": "off", "calib_allocation": "method"}  # l1's own plan: only reconstruction uses data
RUNS = {  # run name → compress keywords for the image folder
    "without": lambda images: {},
    "reconstruction": lambda images: {"calib": str(images), "method_options": METHOD_PLAN},
    "with": lambda images: {"calib": str(images)},
}


def write_images(folder: Path, count: int, size: int = 256) -> None:
    """`count` seeded noise JPEGs of size×size."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        pixels = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))  # blocky noise: JPEG-like content, small files
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


RUNNER = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import compressor
start = time.perf_counter()
kwargs = json.loads(sys.argv[3])
result = compressor.compress(sys.argv[2], method="l1", ratio=0.5, **kwargs)
seconds = time.perf_counter() - start
calibration = result.report.get("calibration", {})
print(json.dumps({"seconds": seconds, "stages": result.report["stage_seconds"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "verified": result.report["verified"], "macs_reduction": result.report["macs_reduction"],
                  "layers": len(calibration.get("layers", [])), "refitted": calibration.get("layers_refitted"),
                  "held_out": calibration.get("held_out"), "modules": sorted(m for m in ("torch", "torchvision")
                                                                              if m in sys.modules)}))
"""


def run_compress(model: Path, kwargs: dict) -> dict:
    """One compression in a fresh process; its JSON summary."""
    load = os.getloadavg()
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(ROOT), str(model), json.dumps(kwargs)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"compress failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["load_before"] = [round(v, 2) for v in load]
    return row


def markdown(rows: dict, count: int, command: str) -> str:
    """The result table."""
    def stages(row: dict) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in row["stages"].items())

    labels = {
        "without": "without `--calib`",
        "reconstruction": f"`--calib` {count} images, reconstruction alone (`-O calib_importance=off -O "
                          "calib_allocation=method`)",
        "with": f"`--calib` {count} images: calibrated plan + reconstruction",
    }

    lines = [
        "# `--calib` cost: torchvision ResNet-50, 224×224, l1 at 50% fewer MACs",
        "",
        "Commands: " + ", ".join(f"`{c}`" for c in dict.fromkeys(row.get("command", command) for row in rows.values())),
        f"Machine: {platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}; other jobs share the machine (load average before each run below).",
        "",
        "| run | seconds | peak memory (MB) | layers refitted | verified | load average before |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        refitted = f"{row['refitted']}/{row['layers']}" if row.get("refitted") is not None else "-"
        lines.append(f"| {labels[key]} | {row['seconds']:.1f} | {row['peak_rss_mb']:.0f} | {refitted} | "
                     f"{row['verified']} | {row['load_before']} |")
    lines.append("")
    for key, row in rows.items():
        lines += [f"Stages, {labels[key]}: {stages(row)}.", ""]
    imported = sorted({m for row in rows.values() for m in row["modules"]})
    lines += [f"torch imported by `compress`: {imported or 'no'}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1024, help="calibration images")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--runs", nargs="+", choices=tuple(RUNS), default=list(RUNS),
                        help="without --calib; reconstruction alone; full --calib (calibrated plan + reconstruction)")
    parser.add_argument("--work", type=Path, default=None, help="keep the model and images here (default: a temp dir)")
    args = parser.parse_args()
    command = shlex.join(["python3", "benchmarks/calib_cost_resnet50.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = work / "resnet50.onnx"
        if not model.exists():
            from cifar_resnet56_nofinetune import export_resnet50

            export_resnet50(model)
        images = work / f"images{args.count}"
        if not images.exists():
            write_images(images, args.count)
        rows = previous_rows(args.out, args.count)
        for key in args.runs:
            print(f"{key}...", file=sys.stderr, flush=True)
            rows[key] = run_compress(model, RUNS[key](images))
            rows[key].pop("held_out", None)
            rows[key]["command"] = command
            write_results(args.out, command, args.count, rows)
    print(markdown(rows, args.count, command))


def previous_rows(out: Path, count: int) -> dict:
    """The runs an earlier invocation with the same image count wrote to `out` (a run given again replaces its row)."""
    path = out / f"{NAME}.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data.get("count") != count:
        return {}
    return {key: data[key] for key in RUNS if key in data}


def write_results(out: Path, command: str, count: int, rows: dict) -> None:
    """The JSON and Markdown results so far (written after every run)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps({"command": command, "count": count, **rows}, indent=2) + "\n")
    rows = {key: rows[key] for key in RUNS if key in rows}
    (out / f"{NAME}.md").write_text(markdown(rows, count, command))


if __name__ == "__main__":
    main()

"""Time each stage of `compress` on torchvision ResNet-50 (224x224) with `l1 --ratio 0.5`, verification included.

    python benchmarks/compress_stages.py --out benchmarks/results [--model resnet50.onnx] [--repeat 3]

Exports ResNet-50 (weights=None, seeded, torch.onnx.export dynamo=False, opset 17) unless --model is given, then
runs compressor.compress several times and records the per-stage wall time (analyze, plan, surgery, verify,
report) and the total of each run. Writes compress_stages.md and compress_stages.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def export_resnet50(path: Path) -> Path:
    """Export a seeded torchvision ResNet-50 at 1x3x224x224 with a dynamic batch axis."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    return path


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    """Run the stage timing and write the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="ONNX model (default: export torchvision ResNet-50)")
    parser.add_argument("--method", default="l1")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    import onnxruntime

    import compressor

    work = Path(tempfile.mkdtemp(prefix="stages-"))
    model = args.model or export_resnet50(work / "resnet50.onnx")
    runs = []
    for i in range(args.repeat):
        start = time.perf_counter()
        result = compressor.compress(model, method=args.method, ratio=args.ratio)
        total = time.perf_counter() - start
        result.save(work / "slim.onnx")
        runs.append({"total": round(total, 3), **result.timings})
        print(f"run {i + 1}: {total:.2f} s  {result.timings}", flush=True)
    stages = list(runs[0])
    median = {k: round(statistics.median(r[k] for r in runs), 3) for k in stages}
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    info = {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "model": "torchvision resnet50 224x224" if args.model is None else str(args.model),
        "method": args.method,
        "ratio": args.ratio,
        "macs_before": result.report["macs_before"],
        "macs_after": result.report["macs_after"],
        "verified": result.report["verified"],
        "runs": runs,
        "median": median,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compress_stages.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = [
        "# Time per stage of `compress` (ResNet-50, 224x224, l1 --ratio 0.5, verification on)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {info['machine']}; Python {info['python']}, ONNX Runtime {info['onnxruntime']} (CPU); {info['date']}  ",
        f"MACs {info['macs_before'] / 1e9:.3f} G -> {info['macs_after'] / 1e9:.3f} G, verified: {info['verified']}",
        "",
        "| stage | median s | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |",
        "|---|---:|" + "---:|" * len(runs),
    ]
    for stage in stages:
        lines.append(f"| {stage} | {median[stage]:.3f} | " + " | ".join(f"{r[stage]:.3f}" for r in runs) + " |")
    (args.out / "compress_stages.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

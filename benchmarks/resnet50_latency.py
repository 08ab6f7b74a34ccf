"""ResNet-50 (torchvision, 224x224, random seeded weights) compressed by every method at 30% and 50% fewer MACs, with
channel counts rounded to 1 and 8, then benchmarked with ONNX Runtime: cuda at batch 1 and 32, cpu:1 and cpu:4 at
batch 1. Writes resnet50_latency.{json,md,png} to --out.

    python3 benchmarks/resnet50_latency.py --out $OUT                         # GPU machine, everything
    python3 benchmarks/resnet50_latency.py --out /tmp/r50 --targets cpu:1 --quick   # CPU smoke run

The export (torch, torchvision when installed) runs in a child process, so the measuring process never imports
torch; with --model PATH no torch is needed at all. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NAME = "resnet50_latency"


def export_resnet50(path: str, seed: int = 0) -> None:
    """Export ResNet-50 with seeded random weights to ONNX (opset 17, input 1x3x224x224, dynamic batch axis)."""
    import torch

    torch.manual_seed(seed)
    try:
        from torchvision.models import resnet50

        model = resnet50(weights=None)
    except ImportError:
        model = resnet50_without_torchvision()
    model.eval()
    example = torch.randn(1, 3, 224, 224)
    torch.onnx.export(model, example, path, dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def resnet50_without_torchvision():
    """torchvision's ResNet-50 v1.5 architecture (stride on the 3x3 conv), for machines with torch but no torchvision."""
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, inplanes: int, planes: int, stride: int):
            super().__init__()
            width, out = planes, planes * 4
            self.conv1, self.bn1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
            self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or inplanes != out:
                self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            return self.relu(self.bn3(self.conv3(y)) + identity)

    layers, inplanes = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                        nn.MaxPool2d(3, 2, 1)], 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for index in range(blocks):
            layers.append(Bottleneck(inplanes, planes, stride if index == 0 else 1))
            inplanes = planes * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers)


def _csv(text: str, kind=str) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for resnet50_latency.{json,md,png}")
    parser.add_argument("--model", help="an ONNX ResNet-50 to use instead of exporting one (no torch needed)")
    parser.add_argument("--work", help="folder for the exported and compressed models (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="keep models already in --work instead of rebuilding them")
    parser.add_argument("--targets", default="cuda,cpu:1,cpu:4", help="comma-separated bench targets")
    parser.add_argument("--gpu-batches", default="1,32", help="batch sizes on cuda/tensorrt targets")
    parser.add_argument("--cpu-batches", default="1", help="batch sizes on cpu targets")
    parser.add_argument("--methods", help="comma-separated methods (default: every registered method except zeros)")
    parser.add_argument("--ratios", default="0.3,0.5", help="fractions of MACs to remove")
    parser.add_argument("--round-to", default="1,8", help="channel multiples")
    parser.add_argument("--warmup", type=int, help="warm-up runs per session (default: 20 GPU, 3 CPU)")
    parser.add_argument("--runs", type=int, help="timed runs per model and cell (default: 200 GPU, 20 CPU)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds the runs are spread over")
    parser.add_argument("--cuda-graph", action="store_true", help="replay CUDA graphs on GPU targets")
    parser.add_argument("--pin", action="store_true", help="pin CPU sessions to cores")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)),
                        help="compressions run in parallel (default: a quarter of the cores, at most 4)")
    parser.add_argument("--name", default=NAME, help="base name of the output files (to keep split runs apart)")
    parser.add_argument("--quick", action="store_true", help="smoke run: ratio 0.5 only, warmup 1, 5 runs")
    parser.add_argument("--export-to", help=argparse.SUPPRESS)  # internal: the export child process
    args = parser.parse_args(argv)
    if args.quick:
        args.ratios = "0.5"
        args.warmup = 1 if args.warmup is None else args.warmup
        args.runs = 5 if args.runs is None else args.runs
    return args


def original_model(args: argparse.Namespace, work: Path) -> str:
    """The ONNX ResNet-50 to compress: --model, or an export made by a child process (torch stays out of this one)."""
    if args.model:
        return args.model
    path = work / "resnet50.onnx"
    if args.reuse and path.is_file():
        return str(path)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--out", str(work), "--export-to", str(path)])
    if done.returncode != 0 or not path.is_file():
        sys.exit("error: exporting ResNet-50 failed (it needs torch; or pass --model PATH)")
    print(f"exported {path} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return str(path)


def compress_one(original: str, method: str, ratio: float, round_to: int, path: str) -> dict:
    """Compress, save to `path`, and return the report fields the tables use (or {"error": ...})."""
    import compressor
    from compressor.errors import CompressorError

    try:
        result = compressor.compress(original, method=method, ratio=ratio, round_to=round_to, seed=0)
    except CompressorError as exc:
        return {"error": str(exc)}
    result.save(path)
    return {k: result.report.get(k) for k in ("macs_before", "macs_after", "params_before", "params_after",
                                              "bytes_after", "verified", "relative_error_vs_reference", "blocks_removed",
                                              "seconds")}


def compress_all(original: str, args: argparse.Namespace, work: Path) -> tuple[list[str], list[str], list[dict]]:
    """Every method x ratio x round_to, --jobs at a time; returns model paths, names and one record per compression."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from compressor.methods import available

    methods = _csv(args.methods) if args.methods else [m for m in available() if m != "zeros"]
    records = [{"name": f"{method}-{ratio:g}-r{round_to}", "method": method, "ratio": ratio, "round_to": round_to}
               for method in methods for ratio in _csv(args.ratios, float) for round_to in _csv(args.round_to, int)]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        pending = {}
        for record in records:
            path, sidecar = work / f"resnet50_{record['name']}.onnx", work / f"resnet50_{record['name']}.json"
            record["path"] = str(path)
            if args.reuse and path.is_file() and sidecar.is_file():
                record.update(json.loads(sidecar.read_text()))
                continue
            pending[record["name"]] = pool.submit(compress_one, original, record["method"], record["ratio"],
                                                  record["round_to"], str(path))
        for record in records:
            if record["name"] in pending:
                record.update(pending[record["name"]].result())
                if "error" in record:
                    print(f"skipped {record['name']}: {record['error']}", file=sys.stderr)
                    continue
                Path(record["path"]).with_suffix(".json").write_text(json.dumps(record))
                print(f"compressed {record['name']}: MACs x{record['macs_after'] / record['macs_before']:.3f} in "
                      f"{record['seconds']:.1f} s ({time.perf_counter() - started:.0f} s so far)", file=sys.stderr)
    kept = [r for r in records if "error" not in r]
    return [r["path"] for r in kept], [r["name"] for r in kept], records


def benchmark(models: list[str], names: list[str], args: argparse.Namespace):
    """GPU targets at --gpu-batches and CPU targets at --cpu-batches, merged into one report."""
    from compressor.runtime.bench import run_benchmark
    from compressor.runtime.targets import parse_target
    from compressor.runtime.report import merge_reports, progress_bar

    targets = [parse_target(t) for t in _csv(args.targets)]
    reports = []
    for on_gpu, batches, warmup, runs in ((True, args.gpu_batches, 20, 200), (False, args.cpu_batches, 3, 20)):
        chosen = [t for t in targets if t.on_gpu == on_gpu]
        if not chosen:
            continue
        with progress_bar() as progress:
            reports.append(run_benchmark(models, chosen, _csv(batches, int), warmup=_pick(args.warmup, warmup),
                                         runs=_pick(args.runs, runs), rounds=args.rounds, names=names,
                                         cuda_graph=args.cuda_graph, pin=args.pin, progress=progress))
    return merge_reports(reports)


def _pick(value, default):
    return default if value is None else value


def compression_table(records: list[dict]) -> str:
    lines = ["## Compressed models", "", "| model | MACs x | params x | verified | relative error | blocks removed | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['macs_after'] / r['macs_before']:.3f} | {r['params_after'] / r['params_before']:.3f} "
                     f"| {r['verified']} | {r['relative_error_vs_reference']:.2e} | {len(r['blocks_removed'] or [])} "
                     f"| {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.export_to:
        export_resnet50(args.export_to)
        return
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="resnet50_latency_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"models in {work}", file=sys.stderr)
    original = original_model(args, work)
    paths, names, records = compress_all(original, args, work)
    report = benchmark([original, *paths], ["original", *names], args)
    arguments = sys.argv[1:] if argv is None else argv
    command = "python3 " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *arguments])
    report.settings["command"] = command
    report.settings["total_seconds"] = round(time.perf_counter() - started, 1)
    data = report.to_dict()
    data["compression"] = records
    (out / f"{args.name}.json").write_text(json.dumps(data, indent=2) + "\n")
    markdown = report.to_markdown().replace("# Benchmark", "# ResNet-50 latency: compressed vs original", 1)
    header, _, rest = markdown.partition("\n\n")
    (out / f"{args.name}.md").write_text(f"{header}\n\nCommand: `{command}`\n\n{compression_table(records)}\n{rest}")
    try:
        from compressor.runtime.report import plot_report

        plot_report(report, out / f"{args.name}.png")
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - the tables matter more than the figure
        print(f"no plot: {exc}", file=sys.stderr)
    print(report.to_text())
    print(f"wrote {out}/{args.name}.json, .md{', .png' if (out / f'{args.name}.png').exists() else ''} "
          f"in {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

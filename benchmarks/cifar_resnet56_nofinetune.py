"""CIFAR-10 ResNet-56 without fine-tuning: graph-rw vs l1 vs random, plus the graph-rw ablations.

Exports the published ResNet-56 checkpoint to ONNX (torch, dynamo=False, dynamic batch), compresses it with every
configuration at 20%, 35% and 50% fewer MACs, evaluates top-1 of each ONNX model on the full JPEG test set with
ONNX Runtime (CPU), and times graph-rw's scoring of torchvision ResNet-50 (seeded random weights). Writes
cifar10_resnet56_nofinetune.md to --out.

    python3 benchmarks/cifar_resnet56_nofinetune.py                     # full run, ../shared, benchmarks/results
    python3 benchmarks/cifar_resnet56_nofinetune.py --limit 1000 --out /tmp/r56   # quick look
    python3 benchmarks/cifar_resnet56_nofinetune.py --timing-only        # re-time ResNet-50 scoring on a quiet machine

Takes about 10 minutes on the 2-core dev machine when it is otherwise idle (twice that under load).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor import compress  # noqa: E402
from compressor.engine.analysis import analyze  # noqa: E402
from compressor.datasets import load_cifar10, normalize_nchw  # noqa: E402

NAME = "cifar10_resnet56_nofinetune"
CHECKPOINT = "cifar10-resnet/resnet56-4bfd9763.th"
RATIOS = (0.2, 0.35, 0.5)
# (method, method options, CLI flags for those options)
CONFIGS = (
    ("graph-rw", {}, []),
    ("l1", {}, []),
    ("random", {}, ["--seed", "0"]),
    ("graph-rw", {"layer_rates": "uniform"}, ["--layer-rates", "uniform"]),
    ("graph-rw", {"layer_rates": "global"}, ["--layer-rates", "global"]),
    ("graph-rw", {"rw_edges": "pairwise"}, ["--rw-edges", "pairwise"]),
    ("graph-rw", {"lis": "max"}, ["--lis", "max"]),
)


def export_resnet56(checkpoint: Path, path: Path) -> None:
    """The checkpoint as ONNX: input 'input' [batch, 3, 32, 32] (dynamic batch), output 'logits'."""
    import torch

    from compressor.training.models import cifar_resnet, load_cifar_resnet_checkpoint

    model = cifar_resnet("resnet56")
    load_cifar_resnet_checkpoint(model, checkpoint)
    model.eval()
    torch.onnx.export(model, torch.zeros(1, 3, 32, 32), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def export_resnet50(path: Path) -> None:
    """torchvision ResNet-50 with seeded random weights (weights=None), input 1x3x224x224."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    torch.onnx.export(model, torch.zeros(1, 3, 224, 224), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"])


def top1(model_bytes: bytes, images: np.ndarray, labels: np.ndarray, batch: int) -> float:
    """Top-1 accuracy (%) of an ONNX model with ONNX Runtime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(labels), batch):
        logits = session.run(None, {name: images[start:start + batch]})[0]
        correct += int((logits.argmax(axis=1) == labels[start:start + batch]).sum())
    return 100.0 * correct / len(labels)


def time_resnet50_scoring(work: Path, repeats: int) -> dict:
    """Seconds graph-rw spends on torchvision ResNet-50: scoring every prunable group (π and LIS), and the whole
    plan (scoring plus the rate bisection), with the machine's load average for context."""
    from compressor.methods.graph_rw import filter_scores, parse_graph_rw_options, plan_graph_rw
    from compressor.engine.plan import PlanOptions, prunable_groups

    path = work / "resnet50.onnx"
    export_resnet50(path)
    analysis = analyze(path)
    options = PlanOptions(ratio=0.5)
    groups = prunable_groups(analysis, options)
    opts = parse_graph_rw_options({})
    sizes = sorted((analysis.groups[g].size for g in groups), reverse=True)
    largest = max(groups, key=lambda g: analysis.groups[g].size)
    scoring, extraction, largest_seconds = [], [], []
    load_before = os.getloadavg()
    for _ in range(repeats):
        start = time.perf_counter()
        filters = {g: analysis.group_filters(g) for g in groups}
        extraction.append(time.perf_counter() - start)
        start = time.perf_counter()
        for g in groups:
            group_start = time.perf_counter()
            filter_scores(filters[g], opts.edges, opts.damping, opts.rho, opts.tol, opts.lis)
            if g == largest:
                largest_seconds.append(time.perf_counter() - group_start)
        scoring.append(time.perf_counter() - start)
    start = time.perf_counter()
    plan_graph_rw(analysis, options)
    plan_seconds = time.perf_counter() - start
    return {
        "groups": len(groups), "largest": sizes[:3], "widest_d": max(f.shape[1] for f in filters.values()),
        "scoring": scoring, "extraction": extraction, "largest_seconds": largest_seconds, "plan": plan_seconds,
        "load_before": load_before, "load_after": os.getloadavg(),
    }


def row_command(method: str, ratio: float, flags: list[str]) -> str:
    """The `compress` command that produces one row's model from the exported resnet56.onnx."""
    out = f"resnet56.{method}{''.join('.' + f.lstrip('-') for f in flags if not f.startswith('--'))}.r{ratio}.onnx"
    return shlex.join(["compress", "resnet56.onnx", "--method", method, "--ratio", str(ratio), *flags, "-o", out])


TIMING_HEADING = "## graph-rw scoring time, torchvision ResNet-50 (weights=None, seed 0)"


def results_markdown(rows: list[dict], baseline: dict, command: str, machine: str, n_test: int) -> str:
    """The accuracy table as Markdown."""
    lines = [
        "# CIFAR-10 ResNet-56, no fine-tuning: graph-rw vs l1 vs random",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        f"Model: `../shared/models/{CHECKPOINT}` exported to ONNX (torch, dynamo=False, dynamic batch); "
        f"top-1 with ONNX Runtime CPU on {n_test} images of the JPEG test set (`../shared/data/cifar10`). "
        "MACs and params as counted by the engine at batch 1; ratio = requested fraction of MACs removed.",
        "",
        f"Baseline: {baseline['macs'] / 1e6:.2f} M MACs, {baseline['params'] / 1e3:.1f} K params, "
        f"top-1 {baseline['top1']:.2f}%.",
        "",
        "| method | options | ratio | MACs (M) | MACs removed | params (K) | top-1 (%) | command |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "defaults"
        lines.append(
            f"| {r['method']} | {options} | {r['ratio']:.2f} | {r['macs'] / 1e6:.2f} | {r['reduction']:.3f} | "
            f"{r['params'] / 1e3:.1f} | {r['top1']:.2f} | `{r['command']}` |"
        )
    lines += [
        "",
        "graph-rw defaults: rw_edges=regression, rw_damping=0.85, rw_rho=1e-3, lis=sum, layer_rates=rmt, "
        "rw_r_min=0, rw_r_max=0.9. random uses --seed 0.",
        "",
    ]
    return "\n".join(lines)


def timing_markdown(timing: dict, command: str, machine: str) -> str:
    """The ResNet-50 scoring time as a Markdown section (regenerated alone by --timing-only)."""
    scoring = timing["scoring"]
    return "\n".join([
        TIMING_HEADING,
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}",
        "",
        f"{timing['groups']} prunable groups (largest {timing['largest']} channels, widest filter row "
        f"{timing['widest_d']} weights). Scoring = ridge edges, random walk and LIS of every group, float64, on "
        f"the filters already extracted; {len(scoring)} runs.",
        "",
        f"- scoring: min {min(scoring):.2f} s, median {statistics.median(scoring):.2f} s; of which the "
        f"{timing['largest'][0]}-channel group alone: median {statistics.median(timing['largest_seconds']):.2f} s",
        f"- extracting the filter matrices (engine, `Analysis.group_filters`): median "
        f"{statistics.median(timing['extraction']):.2f} s",
        f"- whole plan (extraction + scoring + rate bisection): {timing['plan']:.2f} s",
        f"- load average before / after the runs: {', '.join(f'{x:.2f}' for x in timing['load_before'])} / "
        f"{', '.join(f'{x:.2f}' for x in timing['load_after'])}. The machine is shared: when other jobs hold the "
        "2 cores, OpenBLAS's two threads contend and these times grow several-fold.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10")
    parser.add_argument("--models", type=Path, default=ROOT.parent / "shared" / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=None, help="where the ONNX models go (default: a temp dir)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on this many test images only")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--timing-repeats", type=int, default=7)
    parser.add_argument("--machine", default="2-core CPU dev machine, ORT 1.31.1 CPU")
    parser.add_argument("--timing-only", action="store_true",
                        help="only re-measure the ResNet-50 scoring time and replace that section of the results file")
    args = parser.parse_args()

    command = shlex.join(["python3", "benchmarks/cifar_resnet56_nofinetune.py", *sys.argv[1:]])
    machine = f"{args.machine} ({platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__})"
    result_path = args.out / f"{NAME}.md"
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="r56-nofinetune-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.timing_only:
        if not result_path.is_file():
            sys.exit(f"--timing-only needs an existing {result_path}")
        table = result_path.read_text().split(TIMING_HEADING)[0]
    else:
        table = evaluate_all(args, work, command, machine)
    timing = time_resnet50_scoring(work, args.timing_repeats)
    print(f"ResNet-50 scoring: {[round(t, 3) for t in timing['scoring']]} s", flush=True)
    result_path.write_text(table + timing_markdown(timing, command, machine))
    print(f"wrote {result_path}")


def evaluate_all(args, work: Path, command: str, machine: str) -> str:
    """Export, compress every configuration, evaluate; the accuracy table as Markdown."""
    import onnx

    source = work / "resnet56.onnx"
    export_resnet56(args.models / CHECKPOINT, source)
    images, labels = load_cifar10(args.data, "test", limit=args.limit)
    images = normalize_nchw(images)
    analysis = analyze(source)
    baseline = {"macs": analysis.macs, "params": analysis.params_total,
                "top1": top1(onnx.load(str(source)).SerializeToString(), images, labels, args.batch)}
    print(f"baseline top-1 {baseline['top1']:.2f}%", flush=True)
    rows = []
    for ratio in RATIOS:
        for method, options, flags in CONFIGS:
            result = compress(source, method=method, ratio=ratio, seed=0, method_options=options)
            accuracy = top1(result.model.SerializeToString(), images, labels, args.batch)
            report = result.report
            rows.append({"method": method, "options": options, "ratio": ratio, "macs": report["macs_after"],
                         "reduction": report["macs_reduction"], "params": report["params_after"], "top1": accuracy,
                         "command": row_command(method, ratio, flags)})
            print(f"{method:8} {options!s:28} {ratio:.2f}  macs -{report['macs_reduction']:.3f}  top-1 {accuracy:.2f}%",
                  flush=True)
    return results_markdown(rows, baseline, command, machine, len(labels))


if __name__ == "__main__":
    main()

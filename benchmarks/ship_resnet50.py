"""ResNet-50 shipped: compression plus fp16 on CUDA and int8 on CPU against the fp32 original (issue 14).

torchvision ResNet-50 at 224x224 (seeded random weights, dynamic batch) is compressed to half its MACs with
`--method l1 --round-to 8 --ratio 0.5` (or, with `--compression latency`, to half its measured CUDA latency at batch
32), then converted with `compressor.deploy.convert_precision`: fp16 (ONNX Runtime's float16 converter, fp32 I/O)
and int8 (QDQ, per channel, U8S8 and S8S8; calibrated on seeded random inputs, since the weights are random too:
what is measured here is speed, not accuracy). One harness, the project's bench (`run_benchmark`), models
interleaved round by round:

- CUDA at batch 1 and 32: original fp32 (TF32, the CUDA EP's default settings), original fp16, compressed fp32,
  compressed fp16, on every `--gpu-target` (default `cuda` and `cuda,prefer_nhwc=1`), optionally with CUDA graphs.
- CPU (`--cpu-target`, default cpu:1 and cpu:4) at batch 1: original fp32, original int8, compressed fp32,
  compressed int8 (U8S8 and S8S8).

Speedups are p50 of the original fp32 on the default target (`cuda` / the same cpu:T) at the same batch over p50 of
the model. Writes ship_resnet50.{md,json} to --out.

    source .device/base/setup.sh && python3 benchmarks/ship_resnet50.py --out $OUT --work /tmp/ship50
    python3 benchmarks/ship_resnet50.py --tiny --out /tmp/ship50out --work /tmp/ship50     # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor import compress  # noqa: E402
from compressor.runtime.bench import run_benchmark  # noqa: E402
from compressor.deploy import PrecisionOptions, convert_precision  # noqa: E402

NAME = "ship_resnet50"
AIMS = {("slim.fp16", "cuda", 32): 3.5, ("slim.fp16", "cuda", 1): 2.5, ("slim.int8", "cpu", 1): 6.0}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ship50"))
    parser.add_argument("--compression", choices=("macs", "latency"), default="macs")
    parser.add_argument("--gpu-target", action="append", default=None, help="Repeatable (default cuda and cuda,prefer_nhwc=1).")
    parser.add_argument("--cpu-target", action="append", default=None, help="Repeatable (default cpu:1 and cpu:4).")
    parser.add_argument("--gpu-batches", default="1,32")
    parser.add_argument("--gpu-runs", type=int, default=200)
    parser.add_argument("--cpu-runs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cuda-graph", action="store_true", help="Also time every GPU cell with CUDA graphs.")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--compare-samples", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: cpu:1 only, a few runs and samples.")
    parser.add_argument("--export-to", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.gpu_target, args.cpu_target = args.gpu_target or [], args.cpu_target or ["cpu:1"]
        args.cpu_runs, args.rounds, args.calib_samples, args.compare_samples = 3, 1, 8, 4
    else:
        args.gpu_target = ["cuda", "cuda,prefer_nhwc=1"] if args.gpu_target is None else args.gpu_target
        args.cpu_target = ["cpu:1", "cpu:4"] if args.cpu_target is None else args.cpu_target
    return args


def export(path: Path) -> None:
    """ResNet-50 exported by resnet50_latency.py's exporter in a child process (torch stays out of this one)."""
    if path.is_file():
        return
    script = ROOT / "benchmarks" / "resnet50_latency.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(path.parent), "--export-to", str(path)])
    if done.returncode != 0 or not path.is_file():
        sys.exit("error: exporting ResNet-50 failed (it needs torch)")


def build_models(args, original: Path) -> tuple[dict[str, Path], dict]:
    """Compress once, convert the original and the compressed model; returns {name: path} and the reports."""
    started = time.perf_counter()
    if args.compression == "latency":
        result = compress(original, method="l1", ratio=0.5, target="latency", device="cuda", batch=32)
    else:
        result = compress(original, method="l1", ratio=0.5, round_to=8)
    slim = args.work / "slim.fp32.onnx"
    result.save(slim)
    reports = {"compression": {k: v for k, v in result.report.items() if k != "layers"}}
    print(f"compressed in {time.perf_counter() - started:.1f} s: MACs x{result.report['macs_after'] / result.report['macs_before']:.3f}",
          file=sys.stderr)
    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal((8, 3, 224, 224)).astype(np.float32)}
             for _ in range(max(1, args.calib_samples // 8))]
    paths = {"orig.fp32": original, "slim.fp32": slim}
    conversions = [("orig.fp16", original, "fp16", {}), ("slim.fp16", slim, "fp16", {}),
                   ("orig.int8", original, "int8", {}), ("slim.int8", slim, "int8", {}),
                   ("slim.int8.s8s8", slim, "int8", {"activation_type": "int8"})]
    for name, source, precision, extra in conversions:
        if precision == "fp16" and not args.gpu_target:
            continue
        if precision == "int8" and not args.cpu_target:
            continue
        started = time.perf_counter()
        # Random weights give near-tied logits over 1000 classes: top-1 agreement means nothing here, the relative
        # output error still guards the conversion.
        options = PrecisionOptions(compare_samples=args.compare_samples, min_top1_agreement=0.0, **extra)
        model, report = convert_precision(onnx.load(str(source)), precision, calib if precision == "int8" else None,
                                          options)
        paths[name] = args.work / f"{name}.onnx"
        onnx.save(model, str(paths[name]))
        reports[name] = report
        print(f"{name}: {time.perf_counter() - started:.1f} s, rel. error {report['worst_relative_error']:.3g}",
              file=sys.stderr)
    return paths, reports


def summary_rows(reports: list) -> list[dict]:
    """p50 per model, target and batch, with the speedup against the original fp32 on the default target."""
    rows, base = [], {}
    for report in reports:
        for m in report.measurements:
            kind = m.target.split(":")[0].split(",")[0]
            default_target = m.target.split(",")[0]
            if m.model == "orig.fp32" and m.target == default_target and not m.cuda_graph:
                base[(kind if kind == "cuda" else m.target, m.batch)] = m.p50_ms
    for report in reports:
        for m in report.measurements:
            kind = m.target.split(":")[0].split(",")[0]
            reference = base.get((kind if kind == "cuda" else m.target.split(",")[0], m.batch))
            rows.append({"model": m.model, "precision": m.precision, "target": m.target, "cuda_graph": m.cuda_graph,
                         "batch": m.batch, "p50_ms": round(m.p50_ms, 4), "macs": m.macs,
                         "speedup_vs_original_fp32": round(reference / m.p50_ms, 3) if reference else None})
    return rows


def aims(rows: list[dict]) -> list[str]:
    """One line per aim: the best speedup reached over the settings tried."""
    lines = []
    for (model, kind, batch), aim in AIMS.items():
        cells = [r for r in rows if r["model"] == model and r["batch"] == batch and r["target"].startswith(kind)
                 and r["speedup_vs_original_fp32"]]
        per_target = {}
        for r in cells:
            key = r["target"].split(",")[0] if kind == "cpu" else "cuda"
            per_target.setdefault(key, []).append(r)
        for key, group in sorted(per_target.items()):
            best = max(group, key=lambda r: r["speedup_vs_original_fp32"])
            verdict = "met" if best["speedup_vs_original_fp32"] >= aim else "not met"
            lines.append(f"- {model} on {key} batch {batch}: {best['speedup_vs_original_fp32']:.2f}x (best setting "
                         f"`{best['target']}`{' + CUDA graph' if best['cuda_graph'] else ''}), aim >= {aim}x: {verdict}")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.export_to:
        sys.exit("use resnet50_latency.py --export-to")
    command = "python3 benchmarks/ship_resnet50.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    args.work.mkdir(parents=True, exist_ok=True)
    original = args.work / "resnet50.onnx"
    export(original)
    paths, conversions = build_models(args, original)
    reports, failures = [], []
    gpu_models = [name for name in ("orig.fp32", "orig.fp16", "slim.fp32", "slim.fp16") if name in paths]
    batches = [int(b) for b in args.gpu_batches.split(",")]
    for cuda_graph in ([False, True] if args.cuda_graph else [False]):
        if args.gpu_target:
            try:
                reports.append(run_benchmark([paths[n] for n in gpu_models], args.gpu_target, batches, warmup=20,
                                             runs=args.gpu_runs, rounds=args.rounds, names=gpu_models,
                                             cuda_graph=cuda_graph))
            except Exception as exc:  # noqa: BLE001 - one failed pass (e.g. a graph capture) keeps the others
                failures.append(f"GPU pass (cuda_graph={cuda_graph}): {type(exc).__name__}: {exc}")
    cpu_models = [name for name in ("orig.fp32", "orig.int8", "slim.fp32", "slim.int8", "slim.int8.s8s8")
                  if name in paths]
    if args.cpu_target:
        reports.append(run_benchmark([paths[n] for n in cpu_models], args.cpu_target, [1], warmup=3,
                                     runs=args.cpu_runs, rounds=args.rounds, names=cpu_models))
    rows = summary_rows(reports)
    write(args, command, rows, reports, conversions, failures)


def write(args, command: str, rows: list[dict], reports: list, conversions: dict, failures: list[str]) -> None:
    """ship_resnet50.md and ship_resnet50.json in --out."""
    environment = {k: v for report in reports for k, v in report.environment.items()}
    machine = ", ".join(f"{k}: {environment[k]}" for k in ("gpus", "cpu_model", "physical_cores", "onnxruntime",
                                                           "platform") if k in environment)
    lines = ["# ResNet-50 shipped: compression + fp16 (CUDA) and int8 (CPU) vs the fp32 original (issue 14)", "",
             f"Command: `{command}`  ", f"Machine: {machine}", "",
             f"Compression: {conversions['compression']['method']} ratio {conversions['compression']['ratio']} target "
             f"{conversions['compression']['target']} round-to {conversions['compression']['round_to']}: MACs "
             f"{conversions['compression']['macs_before'] / 1e9:.2f}G -> {conversions['compression']['macs_after'] / 1e9:.2f}G", "",
             "## Aims", "", *aims(rows), *[f"- failed: {f}" for f in failures], "",
             "## p50 latency and speedup against the original fp32 (default settings, same batch)", "",
             "| model | precision | target | CUDA graph | batch | p50 ms | speedup |", "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        speedup = "" if r["speedup_vs_original_fp32"] is None else f"{r['speedup_vs_original_fp32']:.2f}x"
        lines.append(f"| {r['model']} | {r['precision']} | `{r['target']}` | {'yes' if r['cuda_graph'] else 'no'} | "
                     f"{r['batch']} | {r['p50_ms']:.3f} | {speedup} |")
    lines += ["", "## Conversions (each compared with its fp32 model on seeded random inputs)", "",
              "| model | rel. output error | top-1 agreement | settings |", "|---|---:|---:|---|"]
    for name, report in conversions.items():
        if name != "compression":
            settings = {k: report[k] for k in ("activation_type", "weight_type", "per_channel", "keep_io_types")
                        if k in report}
            lines.append(f"| {name} | {report['worst_relative_error']:.4g} | {report['worst_top1_agreement']} | "
                         f"{settings} |")
    lines += ["", "Full bench reports (every sample, session options, environment) are in ship_resnet50.json.", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.md").write_text("\n".join(lines))
    data = {"command": command, "rows": rows, "conversions": conversions, "failures": failures,
            "bench": [r.to_dict() for r in reports]}
    (args.out / f"{NAME}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(f"wrote {args.out / NAME}.md and .json", file=sys.stderr)


if __name__ == "__main__":
    main()

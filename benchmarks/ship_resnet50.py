"""ResNet-50 shipped (issue 14): latency-aware compression + fp16 on CUDA and int8 on CPU, against the fp32 original,
every model timed at its default session setting and at the fastest one that keeps its outputs (`bench --tune`).

torchvision ResNet-50 at 224x224 (seeded random weights, dynamic batch; exported in a child process). Per target:
- cuda batch 1 and 32: `l1 --target latency --ratio 0.5` compressed in fp32 and in fp16 (`--precision fp16`, the
  latency device carrying the original's fastest provider setting, found by a short tune of the original: e.g.
  `cuda:0,prefer_nhwc=1`), and the aligned MAC baseline of each (`l1 --round-to <probed alignment>` at the MACs the
  latency-aware model reached, same precision);
- cpu:T (default cpu:1 and cpu:4): `--target latency --precision int8 --device cpu:T` (when this compressor refuses
  int8 latency tables, fp32 tables + int8 conversion, recorded), and its aligned MAC baseline in int8.
All models of one target and batch (original fp32, original fp16/int8, the compressed ones) run in one harness,
interleaved round by round, each under every candidate session setting (`run_benchmark(..., tune=True)`).
int8 ranges and comparisons use seeded random inputs (random weights: speed, not accuracy).

    source .device/base/setup.sh && CUDA_VISIBLE_DEVICES=1 taskset -c 16-31 python3 benchmarks/ship_resnet50.py \\
        --out $OUT --work /tmp/ship50 --cpu-cores 16-31 --time-limit 540
    python benchmarks/ship_resnet50.py --quick --out /tmp/ship_quick --work /tmp/ship_quick   # CPU smoke run

Writes ship_resnet50.{md,json} to --out after every stage (so a --time-limit stop keeps what finished).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from compressor import compress  # noqa: E402
from compressor.deploy import PrecisionOptions, convert_precision  # noqa: E402
from compressor.errors import CompressorError  # noqa: E402
from compressor.runtime.bench import run_benchmark  # noqa: E402
from compressor.runtime.settings import candidate_settings  # noqa: E402
from ship_report import write_results  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ship50"))
    parser.add_argument("--targets", default=None, help="Comma list of cuda@B and cpu:T (default "
                        "cuda@1,cuda@32,cpu:1,cpu:4; --quick: cpu:1).")
    parser.add_argument("--cpu-cores", default=None, help="Run on these CPUs only, e.g. 16-31 (Linux affinity).")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.5, help="Latency fraction to remove.")
    parser.add_argument("--gpu-profile-budget", type=float, default=12.0)
    parser.add_argument("--cpu-profile-budget", type=float, default=30.0,
                        help="Seconds of latency profiling per CPU compression (15 s left the closed loop one int8 cpu:1 candidate).")
    parser.add_argument("--gpu-runs", type=int, default=60)
    parser.add_argument("--cpu-runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=540.0, help="Seconds; later stages are skipped past it.")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: resnet18 at 64x64 on cpu:1, small budgets.")
    parser.add_argument("--export-to", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.size, args.targets = "resnet18", 64, args.targets or "cpu:1"
        args.gpu_profile_budget, args.cpu_profile_budget, args.gpu_runs, args.cpu_runs = 8.0, 8.0, 10, 6
        args.rounds, args.calib_samples = 2, 8
    args.targets = args.targets or "cuda@1,cuda@32,cpu:1,cpu:4"
    return args


def export(args, path: Path) -> None:
    """torchvision `args.arch` with seeded random weights, exported in a child process (torch stays out of this one)."""
    if path.is_file():
        return
    done = subprocess.run([sys.executable, __file__, "--out", "-", "--arch", args.arch, "--size", str(args.size),
                           "--export-to", str(path)])
    if done.returncode != 0 or not path.is_file():
        sys.exit(f"error: exporting {args.arch} failed (it needs torch and torchvision)")


def export_child(args) -> None:
    """The child side of export(): opset 17, input 1x3xSxS, dynamic batch axis."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)(weights=None).eval()
    example = torch.randn(1, 3, args.size, args.size)
    torch.onnx.export(model, example, args.export_to, dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def log(message: str) -> None:
    print(f"ship: {message}", file=sys.stderr, flush=True)


class Run:
    """Paths, reports and the clock of one driver run; `stage` skips work past the time limit."""

    def __init__(self, args, command: str):
        self.args, self.command, self.started = args, command, time.monotonic()
        self.paths: dict[str, Path] = {}
        self.compressions: dict[str, dict] = {}
        self.benches: dict[str, object] = {}
        self.latency_devices: dict[str, str] = {}
        self.notes: list[str] = []
        self.stages: list[dict] = []

    def remaining(self) -> float:
        return self.args.time_limit - (time.monotonic() - self.started)

    def stage(self, name: str, needs_s: float, work) -> bool:
        """Run `work()` unless less than `needs_s` seconds are left; record its time or its failure; write results."""
        if self.remaining() < needs_s:
            self.stages.append({"stage": name, "skipped": f"time limit ({self.remaining():.0f} s left, needs ~{needs_s:.0f})"})
            log(f"{name}: skipped (time limit)")
            return False
        begun = time.monotonic()
        log(f"{name} ...")
        try:
            work()
            ok = True
        except CompressorError as exc:
            self.stages.append({"stage": name, "error": str(exc)})
            log(f"{name}: failed: {exc}")
            ok = False
        else:
            self.stages.append({"stage": name, "seconds": round(time.monotonic() - begun, 1)})
            log(f"{name}: {time.monotonic() - begun:.0f} s")
        write_results(self)
        return ok


def calibration(args) -> list[dict]:
    rng = np.random.default_rng(0)
    per = min(8, args.calib_samples)
    return [{"input": rng.standard_normal((per, 3, args.size, args.size)).astype(np.float32)}
            for _ in range(max(1, args.calib_samples // per))]


def precision_options(args) -> PrecisionOptions:
    # Random weights give near-tied logits: top-1 agreement means nothing here; the relative error still guards.
    return PrecisionOptions(compare_samples=8, min_top1_agreement=0.0, input_shapes={"input": [1, 3, args.size, args.size]})


def convert(run: Run, name: str, source: Path, precision: str, calib) -> None:
    model, report = convert_precision(onnx.load(str(source)), precision, calib if precision == "int8" else None,
                                      precision_options(run.args))
    run.paths[name] = run.args.work / f"{name}.onnx"
    onnx.save(model, str(run.paths[name]))
    run.compressions[name] = {"conversion": {k: v for k, v in report.items() if k != "fp32_nodes"}}


def no_graph_candidates(target, strict_fp32):
    """The provider-option candidates a latency device string can carry (CUDA graphs are a bench setting only)."""
    return [c for c in candidate_settings(target, strict_fp32) if not c.cuda_graph]


def pick_latency_devices(run: Run, batches: list[int]) -> None:
    """A short tune of the original fp32 and fp16 on cuda: the fastest passing provider setting per precision and
    batch becomes the latency device of that compression."""
    names = [n for n in ("orig.fp32", "orig.fp16") if n in run.paths]
    report = run_benchmark([str(run.paths[n]) for n in names], ["cuda"], batches, warmup=10, runs=40, rounds=2,
                           names=names, tune=True, candidates=no_graph_candidates, memory=False, with_cost=False)
    run.benches["pretune"] = report
    for row in report.tuning:
        if row["chosen"]:
            run.latency_devices[f"{row['model'].split('.')[1]}@{row['batch']}"] = row["session_target"]


def compress_pair(run: Run, tag: str, device: str, batch: int, precision: str, budget: float, calib) -> None:
    """The latency-aware model and its aligned MAC baseline (same MACs, round-to = the probed alignment)."""
    args, original = run.args, str(run.paths["orig.fp32"])
    common = {"precision_options": precision_options(args)}
    record: dict = {"device": device, "batch": batch, "precision": precision}
    try:
        aware = compress(original, "l1", args.ratio, target="latency", device=device, batch=batch,
                         profile_budget=budget, precision=precision, precision_calib=calib, **common)
        record["int8_tables"] = "used" if precision == "int8" else None
    except CompressorError as exc:
        if precision != "int8" or "int8" not in str(exc):
            raise
        record["int8_tables"] = "refused: fp32 tables + int8 conversion"
        run.notes.append(f"{tag}: int8 latency tables refused ({exc}); fp32 tables + int8 conversion used")
        log(f"{tag}: int8 latency tables refused: fp32 tables + int8 conversion")
        aware = compress(original, "l1", args.ratio, target="latency", device=device, batch=batch,
                         profile_budget=budget)
        aware.model, aware.report["precision"] = convert_precision(aware.model, "int8", calib, precision_options(args))
    run.paths[f"aware.{tag}"] = args.work / f"aware.{tag}.onnx"
    aware.save(run.paths[f"aware.{tag}"])
    latency = aware.report.get("latency") or {}
    alignment = int(latency.get("table", {}).get("alignment") or 8)
    macs_fraction = aware.report["macs_after"] / aware.report["macs_before"]
    record["aware"] = summary(aware.report)
    log(f"{tag}: latency-aware MACs x{macs_fraction:.3f}, alignment {alignment}, "
        f"measured fraction {latency.get('measured_fraction')}")
    run.compressions[tag] = record
    try:
        same = compress(original, "l1", 1.0 - macs_fraction, round_to=alignment, precision=precision,
                        precision_calib=calib if precision == "int8" else None, **common)
    except CompressorError as exc:
        record["macs_baseline"] = {"error": str(exc), "round_to": alignment}
        raise
    run.paths[f"macs.{tag}"] = args.work / f"macs.{tag}.onnx"
    same.save(run.paths[f"macs.{tag}"])
    record["macs_baseline"] = summary(same.report) | {"round_to": alignment}


def summary(report: dict) -> dict:
    latency = report.get("latency") or {}
    keep = ("measured_fraction", "measured_speedup", "predicted_ms", "budget_ms", "measured_original_ms",
            "aligned_baseline", "closed_loop")
    return {"macs_before": report["macs_before"], "macs_after": report["macs_after"],
            "macs_fraction": report["macs_after"] / report["macs_before"], "seconds": report.get("seconds"),
            "alignment": (latency.get("table") or {}).get("alignment"),
            "latency": {k: latency.get(k) for k in keep if k in latency},
            "precision": (report.get("precision") or {}).get("precision", "fp32"),
            "precision_error": (report.get("precision") or {}).get("worst_relative_error"), "notes": report.get("notes")}


def bench_cell(run: Run, key: str, names: list[str], target: str, batch: int) -> None:
    names = [n for n in names if n in run.paths]
    gpu = target.startswith("cuda")
    run.benches[key] = run_benchmark(
        [str(run.paths[n]) for n in names], [target], [batch], warmup=10 if gpu else 3,
        runs=run.args.gpu_runs if gpu else run.args.cpu_runs, rounds=run.args.rounds, names=names, tune=True,
        pin=not gpu, memory=False)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.export_to:
        export_child(args)
        return
    if args.cpu_cores:
        cores = {c for part in args.cpu_cores.split(",") for c in
                 (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))}
        os.sched_setaffinity(0, cores)
    command = "python3 benchmarks/ship_resnet50.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args, command)
    run.paths["orig.fp32"] = args.work / f"{args.arch}_{args.size}.onnx"
    export(args, run.paths["orig.fp32"])
    calib = calibration(args)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    cuda_batches = [int(t.split("@")[1]) for t in targets if t.startswith("cuda@")]
    cpu_targets = [t for t in targets if t.startswith("cpu:")]
    if cuda_batches:
        run.stage("convert the original to fp16", 10, lambda: convert(run, "orig.fp16", run.paths["orig.fp32"], "fp16", calib))
        run.stage("tune the originals' provider settings", 30, lambda: pick_latency_devices(run, cuda_batches))
        for batch in cuda_batches:
            for precision in ("fp32", "fp16"):
                device = run.latency_devices.get(f"{precision}@{batch}", "cuda:0")
                tag = f"{precision}.b{batch}"
                run.stage(f"compress {tag} on {device}", args.gpu_profile_budget + 20,
                          lambda: compress_pair(run, tag, device, batch, precision, args.gpu_profile_budget, calib))
            names = ["orig.fp32", "orig.fp16", f"aware.fp32.b{batch}", f"aware.fp16.b{batch}", f"macs.fp32.b{batch}",
                     f"macs.fp16.b{batch}"]
            run.stage(f"bench cuda batch {batch}", 45, lambda: bench_cell(run, f"cuda@{batch}", names, "cuda", batch))
    if cpu_targets:
        run.stage("convert the original to int8", 15, lambda: convert(run, "orig.int8", run.paths["orig.fp32"], "int8", calib))
        for target in cpu_targets:
            tag = f"int8.{target.replace(':', '')}"
            run.stage(f"compress {tag}", args.cpu_profile_budget + 25,
                      lambda: compress_pair(run, tag, target, 1, "int8", args.cpu_profile_budget, calib))
            names = ["orig.fp32", "orig.int8", f"aware.{tag}", f"macs.{tag}"]
            run.stage(f"bench {target}", 20, lambda: bench_cell(run, target, names, target, 1))
    write_results(run)
    log(f"done in {time.monotonic() - run.started:.0f} s; wrote {args.out}/ship_resnet50.md and .json")


if __name__ == "__main__":
    main()

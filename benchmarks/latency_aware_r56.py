"""Issue 7, third proof item: CIFAR-10 ResNet-56, latency-aware vs MAC-targeted at the same measured GPU latency,
both fine-tuned the same way, test top-1 side by side.

  1. export the fine-tuned baseline (--baseline, default runs/r56-baseline.pt) to ONNX, as `compress train --prune`
     does (dynamo when onnxscript is installed, else TorchScript with BN kept: the PyTorch names survive);
  2. latency-aware plan: `--method l1 --target latency --device DEVICE --batch 1 --ratio 0.5` on that export;
  3. MAC-targeted plan (l1, round_to 8) whose measured latency on DEVICE batch 1 matches the latency-aware model's:
     bisection on the MAC ratio, each candidate timed side by side with the latency-aware model (interleaved);
  4. each plan mapped to PyTorch masks (compressor.training.masks.masks_from_result), fine-tuned with the recipe of
     benchmarks/cifar10_resnet56.py rows (--epochs 10, batch 512, lr 0.05, cosine, bf16; masks re-applied after
     every step), exported, slimmed by `zeros` and checked against PyTorch (compressor.training.pipeline.run_job);
  5. baseline and both slim models timed with compressor.runtime.bench on DEVICE at batch 1 and 128 (interleaved rounds).

Writes latency_aware_r56.json and .md (with commands) to --out.

GPU machine (one call, ~4-5 min on an H200; carry runs/ for the checkpoint):
    python3 benchmarks/latency_aware_r56.py --data .device/base/data --models .device/base/models --out $OUT
CPU smoke run (here; a few minutes):
    python3 benchmarks/latency_aware_r56.py --data ../shared/data/cifar10 --out /tmp/r56la --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAME = "latency_aware_r56"
STARTED = time.perf_counter()
MATCH_TOLERANCE = 0.03  # the MAC-targeted model's latency within 3% of the latency-aware one's


def log(message: str) -> None:
    """A timestamped progress line on stdout."""
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with cifar10-{train,test}.tar.xz")
    p.add_argument("--models", default=None, help="unused (accepted for the common GPU command line)")
    p.add_argument("--out", required=True, help="folder for the JSON and Markdown reports")
    p.add_argument("--work", default=None, help="folder for checkpoints and ONNX files [a temp dir]")
    p.add_argument("--baseline", default=str(ROOT / "runs" / "r56-baseline.pt"), help="fine-tuned ResNet-56 .pt")
    p.add_argument("--device", default="cuda", help="latency target of the plans: cuda[:N] or cpu:T")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of the measured latency to remove")
    p.add_argument("--method", default="l1", help="importance of both plans")
    p.add_argument("--round-to", type=int, default=8, help="channel rounding of the MAC-targeted plan")
    p.add_argument("--profile-budget", type=float, default=60.0, help="seconds of latency profiling")
    p.add_argument("--bisect-steps", type=int, default=6, help="MAC-targeted compressions tried at most")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--train-device", default="auto", help="torch device of the fine-tunes")
    p.add_argument("--batches", default="1,128", help="batch sizes of the final latency table")
    p.add_argument("--runs", type=int, default=None, help="timed runs per model (default: 200 GPU, 20 CPU)")
    p.add_argument("--limit", type=int, default=None, help="train/test images (smoke runs)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: cpu:1, --limit 512, 1 epoch, short timings")
    args = p.parse_args(argv)
    if args.quick:
        given = argv if argv is not None else sys.argv
        if "--device" not in given:
            args.device = "cpu:1"
        args.limit = args.limit or 512
        args.epochs = 1 if "--epochs" not in given else args.epochs
        args.profile_budget = min(args.profile_budget, 15.0)
        args.bisect_steps = min(args.bisect_steps, 3)
        args.batches = "1,8" if "--batches" not in given else args.batches
        args.runs = args.runs or 10
    return args


def runs_for(target, args) -> tuple[int, int]:
    """(warm-up, timed runs) per model on the target."""
    return (20, args.runs or 200) if target.on_gpu else (3, args.runs or 20)


def bench(paths: dict[str, str], target: str, batch: int, args) -> dict[str, float]:
    """p50 ms of each model, timed side by side (interleaved rounds, compress bench's session options)."""
    from compressor.runtime.bench import run_benchmark
    from compressor.runtime.targets import parse_target

    warmup, runs = runs_for(parse_target(target), args)
    report = run_benchmark(list(paths.values()), [target], [batch], warmup=warmup, runs=runs, rounds=5,
                           names=list(paths), isolate=False, memory=False, environment=False, with_cost=False)
    return {m.model: m.p50_ms for m in report.measurements}


def match_macs_plan(export: str, aware_path: str, args, work: Path) -> tuple[object, list[dict]]:
    """The MAC-targeted compression whose latency on the target at batch 1 matches the latency-aware model's.

    Bisection on the MAC ratio (latency falls as it grows), each candidate timed against the latency-aware model in
    the same benchmark; stops within MATCH_TOLERANCE or after --bisect-steps compressions, keeping the closest."""
    import compressor

    lo, hi, ratio = 0.05, 0.95, 0.6
    tried, best = [], None
    for step in range(args.bisect_steps):
        result = compressor.compress(export, args.method, ratio, target="macs", round_to=args.round_to, verify=False)
        path = work / f"macs_{ratio:.4f}.onnx"
        result.save(path)
        p50 = bench({"latency-aware": aware_path, "macs": str(path)}, args.device, 1, args)
        relative = p50["macs"] / p50["latency-aware"]
        tried.append({"ratio": ratio, "macs_fraction": result.report["macs_after"] / result.report["macs_before"],
                      "p50_ms": p50["macs"], "aware_p50_ms": p50["latency-aware"], "relative": relative})
        log(f"MAC-targeted ratio {ratio:.3f}: MACs x{tried[-1]['macs_fraction']:.3f}, latency x{relative:.3f} of the "
            f"latency-aware model's")
        if best is None or abs(relative - 1) < abs(best[1] - 1):
            best = (result, relative, str(path))
        if abs(relative - 1) <= MATCH_TOLERANCE:
            break
        lo, hi = (ratio, hi) if relative > 1 else (lo, ratio)
        ratio = (lo + hi) / 2
    return best, tried


def finetune(name: str, masks, plan_report: dict, args, data, work: Path) -> dict:
    """Fine-tune the baseline under the masks (the cifar10_resnet56.py row recipe); returns run_job's metrics."""
    from compressor.training.loop import TrainConfig
    from compressor.training.pipeline import TrainJob, run_job

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    job = TrainJob(model="resnet56", data=args.data, out=str(work / name), init=args.baseline, limit=args.limit,
                   device=args.train_device, config=config, masks=masks, plan_report=plan_report,
                   command=f"benchmarks/latency_aware_r56.py row {name}")
    return run_job(job, data=data, log=lambda text: log(f"{name}: {text}"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    import compressor
    from compressor.runtime.probes import capture_environment
    from compressor.runtime.targets import parse_target
    from compressor.training.data import load_cifar10_data
    from compressor.training.export import export_onnx, onnxscript_available
    from compressor.training.loop import evaluate
    from compressor.training.masks import masks_from_result
    from compressor.training.models import build_model, load_checkpoint

    try:
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
    except ImportError:
        sys.exit("error: onnxruntime is not installed")
    out, work = Path(args.out), Path(args.work or tempfile.mkdtemp(prefix="r56-latency-"))
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if not Path(args.baseline).is_file():
        sys.exit(f"error: baseline checkpoint not found: {args.baseline} (carry runs/ to the GPU machine)")
    command = shlex.join(["python3", os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)])
    record: dict = {"command": command, "settings": vars(args), "environment": capture_environment(
        [parse_target(args.device)]), "python": platform.python_version(), "torch": torch.__version__}
    try:
        import PIL  # noqa: F401
    except ImportError:
        log("Pillow is missing: JPEG decoding falls back to torchvision.io (fails loudly if that is missing too)")

    model = build_model("resnet56")
    load_checkpoint(model, args.baseline)
    export = str(work / "baseline.onnx")
    keep_bn = not onnxscript_available()
    exporter = export_onnx(model, export, keep_bn=keep_bn)
    if exporter == "torchscript":
        exporter = export_onnx(model, export, keep_bn=True)
    record["plan_export"] = exporter
    log(f"baseline exported ({exporter}); latency-aware plan on {args.device} batch 1, ratio {args.ratio}")

    aware = compressor.compress(export, args.method, args.ratio, target="latency", device=args.device, batch=1,
                                profile_budget=args.profile_budget)
    aware_path = str(work / "aware_plan.onnx")
    aware.save(aware_path)
    latency = aware.report["latency"]
    log(f"latency-aware: MACs x{aware.report['macs_after'] / aware.report['macs_before']:.3f}, "
        f"{len(aware.report['blocks_removed'])} blocks dropped, measured x{latency['measured_speedup']:.2f} "
        f"(predicted {latency['predicted_ms']:.4g} ms, measured {latency['measured_after_ms']:.4g} ms)")
    (best, relative, macs_path), tried = match_macs_plan(export, aware_path, args, work)
    record["plans"] = {
        "latency-aware": {k: aware.report.get(k) for k in ("macs_before", "macs_after", "params_after",
                                                           "blocks_removed", "groups_pruned", "notes", "latency")},
        "macs": {"ratio": best.report["ratio"], "round_to": args.round_to, "macs_after": best.report["macs_after"],
                 "blocks_removed": best.report["blocks_removed"], "groups_pruned": best.report["groups_pruned"],
                 "latency_vs_aware": relative, "bisection": tried},
    }
    log(f"MAC-targeted match: ratio {best.report['ratio']:.3f}, latency x{relative:.3f} of the latency-aware model's")

    auto = "cuda" if torch.cuda.is_available() else "cpu"
    data = load_cifar10_data(args.data, auto if args.train_device == "auto" else args.train_device, limit=args.limit)
    log(f"data: {data.sizes()} (decoded by {data.decoder})")
    rows = {}
    for name, result in (("latency-aware", aware), ("macs", best)):
        masks, report = masks_from_result(model, result)
        masked = copy.deepcopy(model).to(data.test_images.device)
        masks.apply(masked)
        masked_top1 = evaluate(masked, data, "test")
        metrics = finetune(name, masks, report, args, data, work)
        rows[name] = {k: metrics.get(k) for k in ("init_test_top1", "val_top1", "test_top1", "macs_before", "macs_after",
                                                  "macs_reduction", "params_after", "blocks_removed", "filters_removed",
                                                  "train_seconds", "seconds")}
        rows[name]["masked_test_top1"] = masked_top1
        rows[name]["slim_onnx"] = metrics["export"]["slim_onnx"]
        rows[name]["slim_check"] = metrics["export"]["slim_check"]
        log(f"{name}: test top-1 {metrics['test_top1']:.2f}% (pruned, before fine-tune {masked_top1:.2f}%)")
    record["baseline_checkpoint_test_top1"] = torch.load(args.baseline, map_location="cpu", weights_only=False).get("test_top1")
    record["rows"] = rows
    paths = {"baseline": export, **{name: rows[name]["slim_onnx"] for name in rows}}
    record["latency_ms"] = {}
    for batch in [int(b) for b in args.batches.split(",") if b.strip()]:
        p50 = bench(paths, args.device, batch, args)
        record["latency_ms"][str(batch)] = p50
        log(f"{args.device} batch {batch}: " + ", ".join(f"{n} {ms:.4g} ms" for n, ms in p50.items()))
    record["seconds"] = round(time.perf_counter() - STARTED, 1)
    (out / f"{NAME}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    text = markdown(record, args)
    (out / f"{NAME}.md").write_text(text)
    print(text)
    return 0


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(record: dict, args) -> str:
    """The side-by-side table, how the plans were made, and the commands."""
    env = record["environment"]
    gpus = ", ".join(str(g.get("name")) for g in (env.get("gpus") or {}).values())
    batches = list(record["latency_ms"])
    lines = [
        "# CIFAR-10 ResNet-56: latency-aware vs MAC-targeted at the same measured latency, fine-tuned", "",
        f"Command: `{record['command']}`", "",
        f"Machine: {env.get('cpu_model')} ({env.get('cpu_count')} CPUs){', GPU ' + gpus if gpus else ''}; onnxruntime "
        f"{env.get('onnxruntime')}; torch {record['torch']}; {env.get('date_utc')}; total {record['seconds']:.0f} s.", "",
        f"Both plans from `{args.baseline}` ({record['plan_export']} export), method `{args.method}`. Latency-aware: "
        f"`compress baseline.onnx --method {args.method} --target latency --device {args.device} --batch 1 --ratio "
        f"{args.ratio} --profile-budget {args.profile_budget:g}`. MAC-targeted: `compress baseline.onnx --method "
        f"{args.method} --ratio R --round-to {args.round_to}`, R bisected until its {args.device} batch-1 latency "
        f"matches the latency-aware model's (timed side by side). Each plan → PyTorch masks → {args.epochs} epochs "
        f"(batch {args.batch_size}, lr {args.lr}, cosine, bf16, masks re-applied after every step) → export → "
        f"`zeros` slimming → compress bench p50 on {args.device}.", "",
        "| model | test top-1 % | pruned, before fine-tune % | MACs x | blocks dropped | "
        + " | ".join(f"b{b} ms | b{b} speedup" for b in batches) + " |",
        "|---|---|---|---|---|" + "---|---|" * len(batches),
    ]
    base = {b: record["latency_ms"][b]["baseline"] for b in batches}
    unpruned = next((r.get("init_test_top1") for r in record["rows"].values()), None)
    lines.append(f"| baseline (unpruned) | {_fmt(unpruned, '.2f')} | – | 1.000 | 0 | "
                 + " | ".join(f"{base[b]:.4g} | x1.00" for b in batches) + " |")
    for name, row in record["rows"].items():
        fraction = row["macs_after"] / row["macs_before"] if row.get("macs_before") else None
        cells = " | ".join(f"{record['latency_ms'][b][name]:.4g} | x{base[b] / record['latency_ms'][b][name]:.2f}"
                           for b in batches)
        lines.append(f"| {name} | {row['test_top1']:.2f} | {_fmt(row.get('masked_test_top1'), '.2f')} | "
                     f"{fraction:.3f} | {row['blocks_removed']} | {cells} |")
    plans = record["plans"]
    latency = plans["latency-aware"]["latency"]
    lines += ["", "## How the plans were matched", "",
              f"Latency-aware on {latency['device']} batch 1: budget {latency['budget_ms']:.4g} ms, predicted "
              f"{latency['predicted_ms']:.4g} ms, measured {latency['measured_before_ms']:.4g} → "
              f"{latency['measured_after_ms']:.4g} ms (predictor error {latency['predictor_error']:+.1%}"
              f"{', over 10%' if latency['flagged'] else ''}; the latency model alone "
              f"{latency['model_predictor_error']:+.1%}); closed loop: {len(latency.get('closed_loop') or [])} "
              f"candidate(s) measured, each side by side with the original (paired ratio, budget "
              f"{1 - args.ratio:.3f} of the original's latency).", ""]
    if latency.get("closed_loop"):
        lines += ["| allocation budget ms | predicted fraction | measured fraction (paired) | original ms | blocks "
                  "dropped | importance kept | chosen |", "|---|---|---|---|---|---|---|"]
        for c in latency["closed_loop"]:
            lines.append(f"| {c['allocation_budget_ms']:.4g} | {_fmt(c['predicted_fraction'], '.3f')} | "
                         f"{_fmt(c['measured_fraction'], '.3f')} | {_fmt(c['measured_before_ms'], '.4g')} | "
                         f"{c['blocks_dropped']} | {c['importance_kept']:.3f} | {'yes' if c['chosen'] else ''} |")
        lines.append("")
    lines += [f"Note: {n}" for n in plans["latency-aware"].get("notes") or [] if "closed loop" in n]
    lines += ["", "| MAC ratio tried | MACs x | latency vs latency-aware |", "|---|---|---|"]
    for t in plans["macs"]["bisection"]:
        lines.append(f"| {t['ratio']:.4f} | {t['macs_fraction']:.3f} | x{t['relative']:.3f} |")
    lines += ["", f"Chosen MAC ratio {plans['macs']['ratio']:.4f} (latency x{plans['macs']['latency_vs_aware']:.3f} "
              f"of the latency-aware model's; target within {MATCH_TOLERANCE:.0%}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

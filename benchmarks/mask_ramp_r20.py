"""`compress train --mask-ramp-epochs`: a small CPU comparison of a --prune fine-tune with the mask applied at once
vs shrunk to zero over the first epochs, with KD, under a schedule without warm-up (cosine) and with one (OneCycle).

CIFAR-10 ResNet-20 (published checkpoint, also the teacher), L1 plan removing 60% of the MACs, a class-balanced
subset of the JPEG data (--limit). A proxy for issue 12's GPU rows (ResNet-56, 45k images, 60 epochs): it shows the
first-epoch behaviour and the direction, not the GPU figures.

    python benchmarks/mask_ramp_r20.py --data ../shared/data/cifar10 --models ../shared/models/cifar10-resnet \\
        --out benchmarks/results --work /tmp/ramp_r20
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--models", required=True, help="folder holding resnet20-*.th")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--limit", type=int, default=12000, help="train (and test) images of the subset")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--ramp", type=float, default=2.0, help="--mask-ramp-epochs of the ramped rows")
    return p.parse_args(argv)


def row_argv(args, init: str, schedule: str, ramp: float, out: Path) -> list[str]:
    lr = "0.1" if schedule == "onecycle" else "0.05"
    return ["--model", "resnet20", "--init", init, "--data", args.data, "--device", "cpu", "--limit", str(args.limit),
            "--val-size", "1000", "--epochs", str(args.epochs), "--batch-size", "128", "--lr", lr, "--schedule",
            schedule, "--weight-decay", "5e-4", "--prune", "l1", "--ratio", "0.6", "--distill", init,
            "--mask-ramp-epochs", str(ramp), "--verify-images", "64", "-o", str(out)]


def main(argv=None) -> None:
    args = parse_args(argv)
    init = str(sorted(Path(args.models).glob("resnet20-*.th"))[0])
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for schedule in ("cosine", "onecycle"):
        for ramp in (0.0, args.ramp):
            name = f"{schedule}-ramp{ramp:g}"
            argv_row = row_argv(args, init, schedule, ramp, args.work / name / "r20")
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "cli.main", "train", *argv_row], cwd=ROOT,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
            metrics = json.loads((args.work / name / "r20.json").read_text())
            history = metrics["history"]
            rows.append({"name": name, "schedule": schedule, "mask_ramp_epochs": ramp,
                         "test_top1": round(metrics["test_top1"], 2), "init_test_top1": metrics["init_test_top1"],
                         "macs_reduction": round(metrics["macs_reduction"], 4),
                         "epoch1_train_top1": round(history[0]["train_top1"], 2),
                         "val_top1_per_epoch": [round(h["val_top1"], 2) for h in history],
                         "seconds": round(time.monotonic() - started, 1),
                         "command": "compress train " + " ".join(argv_row)})
            print(f"{name}: test {rows[-1]['test_top1']:.2f}%", flush=True)
    machine = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (args.out / "mask_ramp_r20.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    lines = ["# `--mask-ramp-epochs` on a CPU proxy (ResNet-20, L1 60% of MACs, KD)", "",
             f"Command: `python benchmarks/mask_ramp_r20.py --data DATA --models MODELS --out benchmarks/results "
             f"--limit {args.limit} --epochs {args.epochs} --ramp {args.ramp:g}`  ",
             f"Machine: {machine}; {args.epochs} epochs on a {args.limit}-image class-balanced subset (1,000 held out), "
             f"published ResNet-20 at {rows[0]['init_test_top1']:.2f}% on the subset's test images as start and teacher.",
             "", "| schedule | mask ramp (epochs) | test top-1 % | epoch-1 train top-1 % | val per epoch | s |",
             "|---|---:|---:|---:|---|---:|"]
    lines += [f"| {r['schedule']} | {r['mask_ramp_epochs']:g} | {r['test_top1']:.2f} | {r['epoch1_train_top1']:.2f} | "
              f"{', '.join(f'{v:.1f}' for v in r['val_top1_per_epoch'])} | {r['seconds']:.0f} |" for r in rows]
    lines += ["", "Commands:", ""] + [f"- {r['name']}: `{r['command']}`" for r in rows]
    (args.out / "mask_ramp_r20.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

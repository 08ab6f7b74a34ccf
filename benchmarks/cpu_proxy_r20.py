"""Small CPU proxies of issue 12's GPU rows on CIFAR-10 ResNet-20 (published checkpoint, also the KD teacher), 60% of
the MACs removed, a class-balanced subset of the JPEG data (--limit). They show directions, not the GPU figures
(ResNet-56, 45k images, 60 epochs), side by side under the same settings.

  mask-ramp     `compress train --prune l1 --mask-ramp-epochs`: the mask applied at once vs shrunk to zero over the
                first epochs, under a schedule without warm-up (cosine) and with one (OneCycle).
  amsc-weights  AMSC depth + width with its adaptive, uniform and reverse layer weights (the seed reviewers'
                ablation; the GPU run had no time for the reverse row), the GPU rows' search settings.

    python benchmarks/cpu_proxy_r20.py mask-ramp --data ../shared/data/cifar10 --models ../shared/models/cifar10-resnet \\
        --out benchmarks/results --work /tmp/ramp_r20
    python benchmarks/cpu_proxy_r20.py amsc-weights --limit 8000 --data ../shared/data/cifar10 \\
        --models ../shared/models/cifar10-resnet --out benchmarks/results --work /tmp/amsc_r20
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
EXPERIMENTS = {"mask-ramp": ("mask_ramp_r20", "`--mask-ramp-epochs`"),
               "amsc-weights": ("amsc_weights_r20", "AMSC layer weights (adaptive, uniform, reverse)")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=EXPERIMENTS)
    p.add_argument("--data", required=True)
    p.add_argument("--models", required=True, help="folder holding resnet20-*.th")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--limit", type=int, default=12000, help="train (and test) images of the subset")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--ramp", type=float, default=2.0, help="mask-ramp: --mask-ramp-epochs of the ramped rows")
    return p.parse_args(argv)


def common_argv(args, init: str, schedule: str, out: Path) -> list[str]:
    """The options every row shares: the subset, the fine-tune recipe, KD from the published model."""
    lr = "0.1" if schedule == "onecycle" else "0.05"
    return ["--model", "resnet20", "--init", init, "--data", args.data, "--device", "cpu", "--limit", str(args.limit),
            "--val-size", "1000", "--epochs", str(args.epochs), "--batch-size", "128", "--lr", lr, "--schedule",
            schedule, "--weight-decay", "5e-4", "--distill", init, "--verify-images", "64", "-o", str(out)]


def row_argv(args, init: str, schedule: str, ramp: float, out: Path) -> list[str]:
    """A mask-ramp row: L1 at 60% of the MACs, the mask ramped over `ramp` epochs (0: applied at once)."""
    return common_argv(args, init, schedule, out) + ["--prune", "l1", "--ratio", "0.6", "--mask-ramp-epochs", str(ramp)]


def amsc_argv(args, init: str, weights: str, out: Path) -> list[str]:
    """An amsc-weights row: AMSC depth + width with `weights`, searched as the GPU rows are, OneCycle fine-tune."""
    return common_argv(args, init, "onecycle", out) + [
        "--method", "amsc", "--amsc", "both", "--amsc-weights", weights, "--search", "--ratio", "0.6", "--max-drop",
        "2.0", "--grid-points", "3", "--refine", "2", "--sparse-epochs", "2", "--sparse-lr", "0.02"]


def experiment_rows(args, init: str) -> list[tuple[str, dict, list[str]]]:
    """(name, fields for the table, compress train arguments) of the chosen experiment."""
    if args.experiment == "mask-ramp":
        return [(f"{schedule}-ramp{ramp:g}", {"schedule": schedule, "mask_ramp_epochs": ramp},
                 row_argv(args, init, schedule, ramp, args.work / f"{schedule}-ramp{ramp:g}" / "r20"))
                for schedule in ("cosine", "onecycle") for ramp in (0.0, args.ramp)]
    return [(f"amsc-{weights}", {"weights": weights}, amsc_argv(args, init, weights, args.work / f"amsc-{weights}" / "r20"))
            for weights in ("adaptive", "uniform", "reverse")]


def main(argv=None) -> None:
    args = parse_args(argv)
    init = str(sorted(Path(args.models).glob("resnet20-*.th"))[0])
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, fields, argv_row in experiment_rows(args, init):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "cli.main", "train", *argv_row], cwd=ROOT, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
        metrics = json.loads(Path(argv_row[argv_row.index("-o") + 1] + ".json").read_text())
        history = metrics["history"]
        rows.append({"name": name, **fields, "test_top1": round(metrics["test_top1"], 2),
                     "init_test_top1": metrics["init_test_top1"], "macs_reduction": round(metrics["macs_reduction"], 4),
                     "blocks_removed": metrics.get("blocks_removed"), "filters_removed": metrics.get("filters_removed"),
                     "epoch1_train_top1": round(history[0]["train_top1"], 2),
                     "val_top1_per_epoch": [round(h["val_top1"], 2) for h in history],
                     "seconds": round(time.monotonic() - started, 1), "command": "compress train " + " ".join(argv_row)})
        print(f"{name}: test {rows[-1]['test_top1']:.2f}%", flush=True)
    machine = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    stem, title = EXPERIMENTS[args.experiment]
    (args.out / f"{stem}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    keys = [k for k in rows[0] if k in ("schedule", "mask_ramp_epochs", "weights")]
    lines = [f"# {title} on a CPU proxy (ResNet-20, 60% of MACs, KD)", "",
             f"Command: `python benchmarks/cpu_proxy_r20.py {args.experiment} --data ../shared/data/cifar10 --models "
             f"../shared/models/cifar10-resnet --out benchmarks/results --limit {args.limit} --epochs {args.epochs}"
             + (f" --ramp {args.ramp:g}" if args.experiment == "mask-ramp" else "") + "`  ",
             f"Machine: the 2-core development machine (no GPU), {machine}; {args.epochs} fine-tune epochs on a "
             f"{args.limit}-image class-balanced subset (1,000 held out), published ResNet-20 at "
             f"{rows[0]['init_test_top1']:.2f}% on the subset's test images as start and teacher.", "",
             "| " + " | ".join(keys) + " | test top-1 % | MACs removed | blocks | filters | epoch-1 train top-1 % | "
             "val per epoch | s |", "|" + "---|" * (len(keys) + 7)]
    lines += ["| " + " | ".join(f"{r[k]:g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
              + f" | {r['test_top1']:.2f} | {100 * r['macs_reduction']:.1f}% | {r['blocks_removed']} | "
              f"{r['filters_removed']} | {r['epoch1_train_top1']:.2f} | "
              f"{', '.join(f'{v:.1f}' for v in r['val_top1_per_epoch'])} | {r['seconds']:.0f} |" for r in rows]
    lines += ["", "Commands:", ""] + [f"- {r['name']}: `{r['command']}`" for r in rows]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()

"""Issue 15's aims table: CIFAR-10 ResNet-56 (ONNX) pruned with calibration data and no training.

Exports the published checkpoint to ONNX (torch, dynamo=False, dynamic batch), extracts a seeded subset of 1024 JPEG
train images into a folder (`--calib`), compresses at 30% and 50% fewer MACs with l1 and graph-rw, full (calibrated
importance + sensitivity allocation + reconstruction) and ablations, runs onnxsim 0.8.1's structured Wanda on the
same model and images (in its own venv, `--onnxsim-python`; its channel sparsity bisected to the same MACs), and
evaluates top-1 of every ONNX model with ONNX Runtime (CPU, all threads) on the JPEG test set. Writes
recovery_resnet56.md and .json to --out.

    python benchmarks/recovery_resnet56.py                                  # the table, all 10,000 test images
    python benchmarks/recovery_resnet56.py --suite importance --limit 2000  # the importance ablation (l1)
    python benchmarks/recovery_resnet56.py --limit 500 --rows l1:full --no-onnxsim --out /tmp/r56   # a quick look
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
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cifar_resnet56_nofinetune import top1  # noqa: E402

NAME = "recovery_resnet56"
CHECKPOINT = "cifar10-resnet/resnet56-4bfd9763.th"
RATIOS = (0.3, 0.5)
# config name → (uses --calib, reconstruct, method options)
CONFIGS = {
    "full": (True, True, {}),
    "importance": (True, False, {"calib_allocation": "method"}),
    "allocation": (True, False, {"calib_importance": "off"}),
    "reconstruction": (True, True, {"calib_importance": "off", "calib_allocation": "method"}),
    "allocation+reconstruction": (True, True, {"calib_importance": "off"}),
    "none": (False, False, {}),
}
EXTRA_CONFIGS = ("allocation+reconstruction",)  # run on request (--rows), merged into the table with --merge
IMPORTANCE_SUITE = [(f"{kind}{'+refit' if refit else ''}", True, refit,
                     {"calib_allocation": "method", "calib_importance": kind})
                    for refit in (False, True) for kind in ("off", "act", "energy", "obs")]
IMPORTANCE_SUITE += [("obs blend 0.5+refit", True, True, {"calib_allocation": "method", "calib_blend": "0.5"})]


def extract_calibration_images(data_dir: Path, folder: Path, count: int, seed: int = 0) -> None:
    """A seeded subset of `count` train JPEGs (sorted member names, rng(seed) permutation), bytes as stored."""
    from compressor.datasets import cifar10_members

    if folder.is_dir() and sum(1 for _ in folder.rglob("*.jpg")) == count:
        return
    members = cifar10_members(data_dir, "train")
    chosen = np.sort(np.random.default_rng(seed).permutation(len(members))[:count])
    for i in chosen.tolist():
        name, _, data = members[i]
        target = folder / Path(name).relative_to("train")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def row_command(method: str, ratio: float, calib: bool, reconstruct: bool, options: dict) -> str:
    """The `compress` command producing one row's model (from the work folder)."""
    args = ["compress", "resnet56.onnx", "--method", method, "--ratio", str(ratio)]
    if calib:
        args += ["--calib", "calib"] + ([] if reconstruct else ["--no-reconstruct"])
    for key, value in options.items():
        args += ["-O", f"{key}={value}"]
    return shlex.join(args + ["-o", "out.onnx"])


def run_compress(source: Path, calib: Path, method: str, ratio: float, use_calib: bool, reconstruct: bool,
                 options: dict, images, labels) -> dict:
    """Compress one configuration through the API (what the CLI command runs) and evaluate it."""
    from compressor import compress

    start = time.perf_counter()
    result = compress(source, method=method, ratio=ratio, method_options=dict(options),
                      calib=str(calib) if use_calib else None, reconstruct=reconstruct if use_calib else None)
    seconds = time.perf_counter() - start
    report = result.report
    held = (report.get("calibration") or {}).get("held_out") or {}
    return {"method": method, "ratio": ratio, "macs": report["macs_after"], "reduction": report["macs_reduction"],
            "params": report["params_after"], "blocks_removed": len(report["blocks_removed"]),
            "top1": top1(result.model.SerializeToString(), images, labels, 1000), "seconds": round(seconds, 1),
            "held_out": held, "command": row_command(method, ratio, use_calib, reconstruct, options)}


def onnxsim_rows(python: str, source: Path, calib: Path, work: Path, images, labels) -> list[dict]:
    """onnxsim 0.8.1 structured Wanda at each ratio, in its own venv; evaluated here."""
    rows = []
    for ratio in RATIOS:
        out = work / f"onnxsim_wanda_r{ratio}.onnx"
        cmd = [python, str(Path(__file__).resolve()), "--onnxsim-worker", str(source), str(calib), str(ratio), str(out)]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            rows.append({"method": "onnxsim structured Wanda", "ratio": ratio, "error": done.stderr.strip()[-300:]})
            continue
        info = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"method": "onnxsim structured Wanda", "ratio": ratio, **info,
                     "top1": top1(out.read_bytes(), images, labels, 1000), "seconds": round(time.perf_counter() - start, 1),
                     "command": shlex.join(["python", "benchmarks/recovery_resnet56.py", "--onnxsim-worker",
                                            "resnet56.onnx", "calib", str(ratio), "out.onnx"])})
    return rows


def onnxsim_worker(source: str, calib: str, ratio: float, out: str) -> None:
    """(Runs in the onnxsim venv.) Bisect onnxsim's structured-Wanda channel sparsity to remove `ratio` of the MACs
    (counted by the compressor), on the calibration images decoded as --calib decodes them; print a JSON line."""
    import onnx
    from onnxsim import pruning

    from compressor.calibration.data import load_calibration
    from compressor.engine.cost import model_cost

    model = onnx.load(source)
    calibration = load_calibration(calib, model, {"input": [1, 3, 32, 32]}, None)
    batches = list(calibration.batches(128))
    base = model_cost(model).macs
    lo, hi, best = 0.0, 0.95, None
    for _ in range(9):
        mid = 0.5 * (lo + hi)
        pruned = pruning.apply_structured_wanda_pruning(model, calibration_data=batches, num_samples=len(batches),
                                                        sparsity=mid)
        reduction = 1 - model_cost(pruned).macs / base
        if best is None or abs(reduction - ratio) < abs(best[1] - ratio):
            best = (pruned, reduction, mid)
        lo, hi = (mid, hi) if reduction < ratio else (lo, mid)
    onnx.save(best[0], out)
    cost = model_cost(best[0])
    print(json.dumps({"macs": cost.macs, "reduction": round(best[1], 6), "params": cost.params, "sparsity": best[2],
                      "calibration_samples": calibration.count}))


def markdown(rows: list[dict], baseline: dict, command: str, machine: str, n_test: int, suite: str) -> str:
    """The table as Markdown."""
    lines = [f"# CIFAR-10 ResNet-56 without training: calibrated pruning ({suite})", "",
             f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Model: `shared/models/{CHECKPOINT}` exported to ONNX; `--calib`: 1024 JPEG train images (seeded subset "
             f"of cifar10-train.tar.xz, extracted as stored); top-1 with ONNX Runtime CPU on {n_test} JPEG test "
             "images. Commands run in the work folder holding resnet56.onnx and calib/.", "",
             f"Unpruned: {baseline['macs'] / 1e6:.2f} M MACs, top-1 {baseline['top1']:.2f}%.", "",
             "| method | config | ratio | MACs removed | blocks dropped | top-1 (%) | held-out agreement | seconds | command |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r.get('config', '')} | {r['ratio']} | | | failed: {r['error'][:120]} | | | |")
            continue
        agree = (r.get("held_out") or {}).get("reconstructed" if "reconstructed" in (r.get("held_out") or {}) else "pruned")
        agree_text = f"{agree.get('top1_agreement', float('nan')):.3f}" if isinstance(agree, dict) else ""
        lines.append(f"| {r['method']} | {r.get('config', '')} | {r['ratio']:.2f} | {r['reduction']:.3f} | "
                     f"{r.get('blocks_removed', '')} | {r['top1']:.2f} | {agree_text} | {r.get('seconds', '')} | "
                     f"`{r['command']}` |")
    return "\n".join(lines) + "\n"


def merge_rows(table: Path, extra: Path) -> None:
    """Append the rows of results JSON `extra` to results JSON `table` (same test images) and rewrite its Markdown,
    with the extra run's command added to the header."""
    base, more = json.loads(table.read_text()), json.loads(extra.read_text())
    if base["test_images"] != more["test_images"]:
        sys.exit(f"cannot merge: {base['test_images']} vs {more['test_images']} test images")
    base["rows"] += more["rows"]
    base["command"] = f"{base['command']}` then `{more['command']}"
    table.write_text(json.dumps(base, indent=1, default=str))
    table.with_suffix(".md").write_text(markdown(base["rows"], base["baseline"], base["command"], base["machine"],
                                                 base["test_images"], "table"))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--onnxsim-worker":
        onnxsim_worker(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/cifar10"))
    parser.add_argument("--models", type=Path, default=Path("/work/shared/models"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=None, help="model, calibration folder and test arrays (reused)")
    parser.add_argument("--suite", choices=("table", "importance"), default="table")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on this many test images (seeded subset)")
    parser.add_argument("--rows", nargs="*", default=None, help="only these METHOD:CONFIG rows (e.g. l1:full)")
    parser.add_argument("--onnxsim-python", default="/work/venv-onnxsim/bin/python")
    parser.add_argument("--no-onnxsim", action="store_true")
    parser.add_argument("--merge", type=Path, default=None,
                        help="append the rows of this results JSON (same test set) to --out's table and rewrite it")
    parser.add_argument("--machine", default="2-core CPU dev machine shared with other jobs")
    args = parser.parse_args()
    if args.merge:
        merge_rows(args.out / f"{NAME}.json", args.merge)
        return
    from benchmarks.cifar_resnet56_nofinetune import export_resnet56
    from compressor.engine.analysis import analyze
    from compressor.datasets import load_cifar10, normalize_nchw

    import onnxruntime

    command = shlex.join(["python", "benchmarks/recovery_resnet56.py", *sys.argv[1:]])
    machine = (f"{args.machine} ({platform.machine()}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}, "
               f"numpy {np.__version__})")
    work = args.work or Path(tempfile.mkdtemp(prefix="recovery-r56-"))
    work.mkdir(parents=True, exist_ok=True)
    source, calib = work / "resnet56.onnx", work / "calib"
    if not source.is_file():
        export_resnet56(args.models / CHECKPOINT, source)
    extract_calibration_images(args.data, calib, 1024)
    cached = work / f"test_{args.limit or 'all'}.npz"
    if not cached.is_file():
        x, y = load_cifar10(args.data, "test", limit=args.limit)
        np.savez(cached, x=normalize_nchw(x), y=y)
    data = np.load(cached)
    images, labels = data["x"], data["y"]
    baseline = {"macs": analyze(source).macs, "top1": top1(source.read_bytes(), images, labels, 1000)}
    print(f"unpruned top-1 {baseline['top1']:.2f}%", flush=True)
    plan = ([(m, name, *CONFIGS[name]) for m in ("l1", "graph-rw") for name in CONFIGS] if args.suite == "table"
            else [("l1", *entry) for entry in IMPORTANCE_SUITE])
    rows = []
    for ratio in RATIOS:
        for method, name, use_calib, reconstruct, options in plan:
            if (args.rows and f"{method}:{name}" not in args.rows) or (not args.rows and name in EXTRA_CONFIGS):
                continue
            row = {"config": name, **run_compress(source, calib, method, ratio, use_calib, reconstruct, options,
                                                  images, labels)}
            rows.append(row)
            print(f"{method:8} {name:24} {ratio:.2f} macs -{row['reduction']:.3f} top-1 {row['top1']:.2f}% "
                  f"({row['seconds']} s)", flush=True)
    if args.suite == "table" and not args.no_onnxsim:
        for row in onnxsim_rows(args.onnxsim_python, source, calib, work, images, labels):
            rows.append(row)
            print(row, flush=True)
    suffix = "" if args.suite == "table" else "_importance"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}{suffix}.md").write_text(markdown(rows, baseline, command, machine, len(labels), args.suite))
    (args.out / f"{NAME}{suffix}.json").write_text(json.dumps(
        {"command": command, "machine": machine, "test_images": len(labels), "baseline": baseline, "rows": rows},
        indent=1, default=str))
    print(f"wrote {args.out / (NAME + suffix)}.md", flush=True)


if __name__ == "__main__":
    main()

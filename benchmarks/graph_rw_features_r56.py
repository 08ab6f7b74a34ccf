"""graph-rw on weights vs on calibration feature maps (issue 12, seed 000): CIFAR-10 ResNet-56 ONNX, no training,
no reconstruction (planning only).

Exports the published checkpoint to ONNX (TorchScript, dynamic batch), takes a seeded subset of train images as
calibration data (normalized as the model reads them, in memory), and evaluates top-1 with ONNX Runtime (CPU) on a
class-balanced subset of the JPEG test set for: l1, random, graph-rw (the spec), graph-rw rw_normalize=true and
graph-rw rw_features=calib, and, with the calibrated planner's measured allocation (reconstruction still off), the
spec's scores, the feature scores and the default calibrated l1 (obs importance). Writes graph_rw_features_r56.md and .json to --out.

    python benchmarks/graph_rw_features_r56.py --test-images 2000 --calib-images 512 --ratios 0.5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cifar_resnet56_nofinetune import top1  # noqa: E402

SHARED = Path(os.environ.get("COMPRESSOR_SHARED", ROOT.parent / "shared"))
# row name → (method, method options, uses the calibration images)
ROWS = {
    "l1": ("l1", {}, False),
    "random": ("random", {}, False),
    "graph-rw (spec)": ("graph-rw", {}, False),
    "graph-rw rw_normalize": ("graph-rw", {"rw_normalize": "true"}, False),
    "graph-rw rw_features=calib": ("graph-rw", {"rw_features": "calib"}, True),
    # the same scores with the measured allocation (calibration/planning.py), against l1's and obs's
    "graph-rw (spec) + measured allocation": ("graph-rw", {"calib_importance": "off"}, True),
    "graph-rw rw_features=calib + measured allocation": ("graph-rw", {"rw_features": "calib",
                                                                      "calib_allocation": "sensitivity"}, True),
    "l1 + obs importance + measured allocation": ("l1", {}, True),
}


def train_subset(data_dir: Path, count: int, seed: int = 0) -> np.ndarray:
    """`count` seeded train images (sorted member order), decoded and normalized: float32 NCHW."""
    from PIL import Image

    from compressor.datasets import cifar10_members, normalize_nchw

    members = cifar10_members(data_dir, "train")
    chosen = np.sort(np.random.default_rng(seed).permutation(len(members))[:count])
    images = []
    for i in chosen.tolist():
        with Image.open(io.BytesIO(members[i][2])) as img:
            images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
    return normalize_nchw(np.stack(images))


def export_resnet56(path: Path, checkpoint: Path) -> None:
    """The published checkpoint as ONNX (TorchScript export, dynamic batch)."""
    from compressor.training.export import export_onnx
    from compressor.training.models import build_model, load_checkpoint

    model = build_model("resnet56")
    load_checkpoint(model, checkpoint)
    export_onnx(model, path, dynamo=False)


def main() -> None:
    """Run the rows and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "cifar10")
    parser.add_argument("--checkpoint", type=Path, default=SHARED / "models" / "cifar10-resnet" / "resnet56-4bfd9763.th")
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--calib-images", type=int, default=512)
    parser.add_argument("--ratios", default="0.5")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    from compressor import compress
    from compressor.calibration.data import CalibrationSet
    from compressor.datasets import load_cifar10, normalize_nchw

    images, labels = load_cifar10(args.data, "test", args.test_images)
    x_test = normalize_nchw(images)
    calib = CalibrationSet.from_arrays({"input": train_subset(args.data, args.calib_images)})
    rows = []
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "resnet56.onnx"
        export_resnet56(source, args.checkpoint)
        rows.append({"row": "unpruned", "ratio": 0.0, "top1": top1(source.read_bytes(), x_test, labels, 500)})
        for ratio in (float(r) for r in args.ratios.split(",")):
            for name in args.rows.split(","):
                method, options, uses_calib = ROWS[name]
                start = time.perf_counter()
                result = compress(str(source), method=method, ratio=ratio, method_options=dict(options), verify=False,
                                  calib=calib if uses_calib else None, reconstruct=False if uses_calib else None)
                seconds = time.perf_counter() - start
                rows.append({"row": name, "ratio": ratio, "macs_reduction": round(result.report["macs_reduction"], 4),
                             "blocks_removed": len(result.report["blocks_removed"]), "seconds": round(seconds, 1),
                             "top1": top1(result.model.SerializeToString(), x_test, labels, 500),
                             "command": " ".join(["compress", "resnet56.onnx", "--method", method, "--ratio", str(ratio)]
                                                 + (["--calib", "calib.npy", "--no-reconstruct"] if uses_calib else [])
                                                 + [f"-O {k}={v}" for k, v in options.items()] + ["-o", "out.onnx"])})
                print(json.dumps(rows[-1]), file=sys.stderr)
    setup = (f"CIFAR-10 ResNet-56 (published checkpoint, ONNX), top-1 on {len(labels)} test images (class-balanced "
             f"subset), {calib.count} seeded train images as calibration data for the rw_features=calib rows "
             f"({calib.count - calib.count // 8} used by the plan, 1 in 8 held out for the report), no reconstruction, "
             f"no training. {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared).")
    lines = ["# graph-rw: weights vs calibration feature maps (ResNet-56, no training)", "", setup, "",
             "`python benchmarks/graph_rw_features_r56.py " + " ".join(sys.argv[1:]) + "`", "",
             "Rows with calibration data plan on the same images; `+ measured allocation` rows use the calibrated "
             "planner's per-group sensitivity allocation instead of the method's own rates.", "",
             "| row | MACs removed | blocks dropped | top-1 % | plan s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {100 * r.get('macs_reduction', 0):.1f}% | {r.get('blocks_removed', 0)} | "
                     f"{r['top1']:.2f} | {r.get('seconds', '–')} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "graph_rw_features_r56.md").write_text("\n".join(lines) + "\n")
    (args.out / "graph_rw_features_r56.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

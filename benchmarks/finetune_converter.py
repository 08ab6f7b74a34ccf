"""The ONNX -> PyTorch converter of `compress finetune` (onnx2torch 1.5.15 plus compressor.training.onnx_module's glue)
on the engine's outputs for the model matrix of tests/test_torchvision_models.py and the CIFAR ResNets.

For each torchvision model x exporter (TorchScript opset 17, dynamo opset 18; seeded random weights, the tests' input
sizes) and each CIFAR ResNet (published checkpoint when ../shared has it, else seeded weights), the script compresses
with `l1 --ratio 0.5`, converts the teacher (original) and the student (compressed), runs both in PyTorch against
ONNX Runtime on the same seeded inputs, and checks the write-back (the converted student's weights written into the
graph) reproduces the student. Writes finetune_converter.md and .json to --out.

    python3 benchmarks/finetune_converter.py                       # full matrix, ~15 min on the 2-core dev machine
    python3 benchmarks/finetune_converter.py --models resnet18 --out /tmp/conv   # one model
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TORCHVISION = {"resnet18": 64, "mobilenet_v2": 64, "efficientnet_b0": 64, "densenet121": 64, "squeezenet1_1": 64,
               "googlenet": 64, "regnet_x_400mf": 64, "vgg11_bn": 224, "shufflenet_v2_x0_5": 64,
               "resnext50_32x4d": 64, "resnet50": 64}
CIFAR = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}
BATCH = 4


def export(name: str, dynamo: bool, path: Path) -> int:
    """Export a torchvision model (weights=None, seed 0, BN statistics randomized like the tests) or a CIFAR ResNet;
    returns the input size."""
    import torch
    import torchvision

    from tests.conftest import CIFAR_MODELS, export_onnx
    from tests.test_torchvision_models import randomize_bn

    torch.manual_seed(0)
    if name in CIFAR:
        from compressor.training.models import cifar_resnet, load_cifar_resnet_checkpoint

        model, size = cifar_resnet(name), 32
        if (CIFAR_MODELS / CIFAR[name]).is_file():
            load_cifar_resnet_checkpoint(model, CIFAR_MODELS / CIFAR[name])
    else:
        kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        model, size = getattr(torchvision.models, name)(weights=None, **kwargs), TORCHVISION[name]
        randomize_bn(model.eval())
    export_onnx(model.eval(), torch.randn(1, 3, size, size), path, dynamo)
    return size


def relative_error(reference: np.ndarray, actual: np.ndarray) -> float:
    """max |actual - reference| / max |reference|."""
    return float(np.max(np.abs(actual.astype(np.float64) - reference)) / max(float(np.max(np.abs(reference))), 1e-30))


def check_one(name: str, dynamo: bool, work: Path) -> dict:
    """Compress, convert teacher and student, compare with ONNX Runtime; one table row."""
    import torch

    import compressor
    from compressor.errors import CompressorError
    from compressor.training.export import onnx_logits
    from compressor.training.onnx_module import convert_onnx, write_back

    row = {"model": name, "exporter": "dynamo" if dynamo else "torchscript"}
    path = work / f"{name}_{int(dynamo)}.onnx"
    started = time.perf_counter()
    size = export(name, dynamo, path)
    result = compressor.compress(str(path), method="l1", ratio=0.5)
    row["macs_reduction"] = result.report["macs_reduction"]
    images = np.random.default_rng(0).standard_normal((BATCH, 3, size, size)).astype(np.float32)
    for role, model in (("teacher", onnx_load(path)), ("student", result.model)):
        try:
            converted = convert_onnx(model)
        except CompressorError as exc:
            row[role] = "refused"
            row[f"{role}_reason"] = str(exc).splitlines()[0][:160]
            continue
        with torch.no_grad():
            torch_out = np.concatenate([converted.module.eval()(torch.from_numpy(image[None])).numpy()
                                        for image in images])
        row[role] = "converted"
        row[f"{role}_rel_err"] = relative_error(onnx_logits(model, images, batch_size=1), torch_out)
        if role == "student":
            row["trainable_params"] = converted.trainable_elements()
            row["float_params"] = float_initializer_elements(converted.proto)
            row["frozen_tensors"] = len(converted.frozen)
            perturb_trainable(converted.module)
            with torch.no_grad():
                trained = np.concatenate([converted.module(torch.from_numpy(image[None])).numpy() for image in images])
            row["write_back_rel_err"] = relative_error(trained, onnx_logits(write_back(converted), images, batch_size=1))
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def float_initializer_elements(proto) -> int:
    """Elements of the floating-point initializers of a graph (what could be trained)."""
    from onnx import numpy_helper

    arrays = (numpy_helper.to_array(init) for init in proto.graph.initializer)
    return int(sum(a.size for a in arrays if np.issubdtype(a.dtype, np.floating)))


def perturb_trainable(module) -> None:
    """Scale every trainable tensor by (1 + 0.1 * seeded noise): stands in for training, so the write-back check
    sees changed values."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=generator))


def onnx_load(path: Path):
    """The exported file as a ModelProto."""
    import onnx

    return onnx.load(str(path))


def markdown(rows: list[dict], command: str, seconds: float) -> str:
    """The committed table."""
    from importlib.metadata import version

    import torch

    def cell(row: dict, role: str) -> str:
        if row.get(role) == "converted":
            return f"converted, {row[f'{role}_rel_err']:.1e}"
        return f"refused: {row.get(f'{role}_reason', row.get('error', '?'))}"

    lines = ["# ONNX -> PyTorch converter on the engine's outputs (`compress finetune`)", "",
             f"Command: `{command}`  ", f"Machine: {platform.node()} ({platform.processor() or platform.machine()}), "
             f"CPU; torch {torch.__version__}, onnx2torch {version('onnx2torch')}; {seconds:.0f} s", "",
             "Student = `compress ORIGINAL --method l1 --ratio 0.5`; teacher = the original export. Relative error = "
             f"max |torch - ORT| / max |ORT| on {BATCH} seeded normal inputs (batch 1, the exports' static batch); write-back = every trainable tensor of "
             "the converted student scaled by (1 + 0.1 noise), written back into its graph (what `compress finetune` "
             "saves), ORT vs torch. The verification "
             "tolerance of the engine is 1e-4 relative.", "",
             "| model | exporter | MACs removed | teacher | student | write-back | trainable / float initializer elements | frozen |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        write_back = f"{row['write_back_rel_err']:.1e}" if "write_back_rel_err" in row else "-"
        reduction = f"{100 * row['macs_reduction']:.1f}%" if "macs_reduction" in row else "-"
        lines.append(f"| {row['model']} | {row['exporter']} | {reduction} | {cell(row, 'teacher')} | "
                     f"{cell(row, 'student')} | {write_back} | {row.get('trainable_params', '-')} / {row.get('float_params', '-')} | "
                     f"{row.get('frozen_tensors', '-')} |")
    converted = sum(row.get("student") == "converted" and row.get("teacher") == "converted" for row in rows)
    worst = max((row.get(k, 0.0) for row in rows for k in ("teacher_rel_err", "student_rel_err", "write_back_rel_err")),
                default=0.0)
    lines += ["", f"{converted}/{len(rows)} pairs converted; worst relative error {worst:.1e}.", "",
              "Trainable elements are the weights and biases of Conv, Gemm and BatchNormalization nodes (the values "
              "`compress finetune` writes back). Float initializers of other ops stay as they are: per-channel "
              "scale/shift constants of Mul/Add (DenseNet's BatchNorm before each Conv, which no exporter can fold) "
              "and scalars such as Clip bounds; they are buffers in onnx2torch's module.", ""]
    return "\n".join(lines)


def main() -> None:
    """Run the matrix and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(TORCHVISION) + list(CIFAR))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="finetune-converter-") as scratch:
        for name in args.models:
            for dynamo in (False, True):
                try:
                    row = check_one(name, dynamo, Path(scratch))
                except Exception as exc:  # noqa: BLE001 - a failing export is a row of the table, not the end
                    row = {"model": name, "exporter": "dynamo" if dynamo else "torchscript",
                           "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    command = shlex.join(["python3", "benchmarks/finetune_converter.py"] + sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "finetune_converter.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "finetune_converter.md").write_text(markdown(rows, command, time.perf_counter() - started))
    print(f"wrote {args.out / 'finetune_converter.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()

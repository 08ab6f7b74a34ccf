"""PyTorch -> ONNX export, then the engine's exact removal of zero filters and blocks, checked on real images.

Exporters (torch 2.13-2.15, checked by tests/test_training.py):
- dynamo=True (torch.export + onnxscript, needs onnxscript): the optimizer folds BatchNorm into the preceding Conv;
  the conv weights keep their PyTorch names (`layer1.0.conv1.weight`, values scaled by gamma/sigma), the folded biases
  get generated names. Clean graph (Conv/Relu/Add/...).
- dynamo=False (TorchScript): in eval mode BN is folded too and every conv initializer is renamed (`onnx::Conv_274`);
  with `keep_bn=True` (training=PRESERVE) BN stays a BatchNormalization node and every initializer keeps its PyTorch
  name, which is what mapping an engine plan back to parameters needs (compressor.training.masks).
Zero groups survive folding exactly: gamma = beta = 0 gives a folded filter w * 0 / sigma = 0 and bias
beta - mu * gamma / sigma = 0, so the engine's `zeros` method sees them in every variant.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from compressor.errors import CompressorError, VerificationError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 18
# ONNX vs PyTorch logits are compared as the engine verifies (compressor.engine.verify.relative_errors): relative to
# the logits' own scale with no absolute floor, within RTOL. fp32 kernels in another order (and BN folding) differ
# by a few ulps per layer; ResNet-56 shows ~6e-7 relative (1.5e-5 on logits up to 25), 1e-4 leaves ~100x.


def onnxscript_available() -> bool:
    """True when the dynamo exporter can run (it needs onnxscript)."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_copy(model: nn.Module) -> nn.Module:
    """An fp32 eval-mode copy of the model on the CPU (the original is untouched)."""
    clone = copy.deepcopy(model).to("cpu", torch.float32).to(memory_format=torch.contiguous_format)
    return clone.eval()


def export_onnx(model: nn.Module, path: str | Path, *, dynamo: bool | None = None, keep_bn: bool = False,
                image_size: int = 32, opset: int = OPSET) -> str:
    """Export the model (eval mode, CPU fp32 copy) to one self-contained ONNX file with a dynamic batch axis; returns
    the exporter used: 'dynamo', 'torchscript' or 'torchscript-keep-bn'.

    dynamo=None tries the dynamo exporter when onnxscript is installed and falls back to TorchScript if it fails.
    keep_bn=True keeps BN nodes and the PyTorch names of every initializer (TorchScript, training=PRESERVE).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = cpu_copy(model)
    sample = torch.zeros(2, 3, image_size, image_size)
    if dynamo and not onnxscript_available():
        raise CompressorError("the dynamo ONNX exporter needs onnxscript (pip install onnxscript); or use TorchScript")
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        if not keep_bn and (dynamo or (dynamo is None and onnxscript_available())):
            try:
                batch = torch.export.Dim("batch", min=1)
                program = torch.onnx.export(net, (sample,), None, dynamo=True, input_names=[INPUT_NAME],
                                            output_names=[OUTPUT_NAME], opset_version=opset,
                                            dynamic_shapes=({0: batch},), optimize=True, verbose=False)
                program.save(str(path), external_data=False)
                return "dynamo"
            except Exception:  # noqa: BLE001 - the dynamo exporter fails in many ways on unusual models
                if dynamo:
                    raise
        mode = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
        torch.onnx.export(net, (sample,), str(path), dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=opset, training=mode,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return "torchscript-keep-bn" if keep_bn else "torchscript"


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporters' progress prints and loggers for the duration of an export."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def torch_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """fp32 CPU eval-mode outputs of the model on normalized NCHW images."""
    net = cpu_copy(model)
    images = images.detach().to("cpu", torch.float32)
    with torch.no_grad():
        return np.concatenate([net(images[i:i + batch_size]).numpy() for i in range(0, len(images), batch_size)])


def onnx_logits(model: str | Path | onnx.ModelProto, images: np.ndarray, batch_size: int = 500,
                threads: int = 0) -> np.ndarray:
    """ONNX Runtime CPU outputs of an ONNX model on normalized NCHW float32 images (threads 0: ORT's default)."""
    from compressor.runtime.sessions import cpu_session

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    session = cpu_session(proto, threads)
    name = session.get_inputs()[0].name
    chunks = [session.run(None, {name: images[i:i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks)


def check_outputs(reference: np.ndarray, actual: np.ndarray, what: str) -> dict:
    """Raise VerificationError unless actual matches reference within the engine's RTOL · max|reference| (an
    all-zero reference must be matched exactly; any NaN or inf fails)."""
    from compressor.engine.verify import RTOL, relative_errors

    if reference.shape != actual.shape:
        raise VerificationError(f"{what}: output shape {actual.shape} differs from PyTorch's {reference.shape}")
    [(scale, relative)] = relative_errors([[actual]], [[reference]])
    diff, tolerance = relative * scale if scale > 0 else relative, RTOL * scale
    finite = bool(np.isfinite(reference).all() and np.isfinite(actual).all())
    if not finite or relative > RTOL:
        raise VerificationError(f"{what}: outputs differ from PyTorch by {diff:.3g} (tolerance {tolerance:.3g}) "
                                f"on {len(reference)} real test images")
    agree = float(np.mean(reference.argmax(1) == actual.argmax(1))) if reference.ndim == 2 else 1.0
    return {"max_abs_diff": diff, "tolerance": tolerance, "top1_agreement": agree, "images": int(len(reference))}


def export_and_slim(model: nn.Module, out_prefix: str | Path, reference_images: torch.Tensor, *,
                    dynamo: bool | None = None, image_size: int = 32) -> dict:
    """Write OUT.onnx (dense, zeros included) and OUT.slim.onnx (engine method `zeros`), and check both against the
    PyTorch model's outputs on `reference_images` (normalized real images). Returns the engine's report plus checks
    and `channels_removed_outside_blocks` (filters removed from layers that survive, i.e. not in a dropped block).

    Raises VerificationError when either ONNX model disagrees with PyTorch.
    """
    from compressor.api import compress

    started = time.perf_counter()
    prefix = Path(out_prefix)
    dense_path = prefix.with_name(prefix.name + ".onnx")
    slim_path = prefix.with_name(prefix.name + ".slim.onnx")
    exporter = export_onnx(model, dense_path, dynamo=dynamo, image_size=image_size)
    reference = torch_logits(model, reference_images)
    images = reference_images.detach().to("cpu", torch.float32).numpy()
    dense_check = check_outputs(reference, onnx_logits(dense_path, images), f"dense export {dense_path.name}")
    result = compress(str(dense_path), method="zeros")
    result.save(str(slim_path))
    slim_check = check_outputs(reference, onnx_logits(result.model, images), f"slim model {slim_path.name}")
    report = dict(result.report)
    dropped = result.analysis.dropped_nodes(result.plan)
    report["channels_removed_outside_blocks"] = int(sum(
        len(result.plan.removed.get(g.index, ())) for g in result.analysis.groups if not set(g.producers) <= dropped))
    report.update({"dense_onnx": str(dense_path), "slim_onnx": str(slim_path), "exporter": exporter,
                   "dense_check": dense_check, "slim_check": slim_check,
                   "export_seconds": time.perf_counter() - started})
    return report


def removed_macs_fraction(model: nn.Module, workdir: str | Path, image_size: int = 32) -> dict:
    """Fraction of MACs (and params) the engine's `zeros` method removes from the model's export, without writing
    a slim file or verifying (fast; used while searching AMSC's lambda)."""
    from compressor.api import compress

    with tempfile.TemporaryDirectory(prefix="compressor-probe-", dir=workdir) as scratch:
        path = Path(scratch) / "probe.onnx"
        export_onnx(model, path, dynamo=False, image_size=image_size)
        report = compress(str(path), method="zeros", verify=False).report
    return {
        "macs_before": int(report["macs_before"]), "macs_after": int(report["macs_after"]),
        "params_before": int(report["params_before"]), "params_after": int(report["params_after"]),
        "macs_removed": 1.0 - report["macs_after"] / report["macs_before"],
        "blocks_removed": report.get("blocks_removed"),
    }

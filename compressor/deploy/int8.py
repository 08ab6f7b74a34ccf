"""int8 QDQ quantization with onnxruntime.quantization: `quant_pre_process`, then `quantize_static`.

`quant_pre_process` (shape inference and ONNX Runtime's basic graph optimizations) runs first: without it the
exporters' Identity and BatchNormalization nodes stay between Conv and its QDQ pairs, block ONNX Runtime's int8
fusions, and the int8 model runs slower than fp32. Weights are quantized per channel; activation ranges come from
the calibration feeds. Activations default to QUInt8 and weights to QInt8 (U8S8), which x86 CPUs (VNNI, AMX)
fuse; S8S8 is available for targets that prefer it: choose by measuring on the target.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx

from compressor.deploy.select import matching_nodes
from compressor.errors import CompressorError, first_line

QUANT_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def _reader(feeds: Iterable[dict[str, np.ndarray]]):
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        """Hands the feeds to the calibrator one batch at a time."""

        def __init__(self):
            self._iterator: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self):
            return next(self._iterator, None)

        def rewind(self):
            self._iterator = iter(feeds)

    return FeedReader()


def to_int8(proto: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]], *, activation_type: str = "uint8",
            weight_type: str = "int8", per_channel: bool = True, calibrate_method: str = "minmax",
            exclude: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, dict]:
    """A QDQ int8 copy of `proto` calibrated on `feeds`; returns it and a summary (settings, quantized op counts).

    Nodes matching the `exclude` patterns (after pre-processing, which keeps the names of the nodes it keeps) stay
    in float.
    """
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static
    except ImportError as exc:
        raise CompressorError("--precision int8 needs onnxruntime (pip install 'compressor[cpu]')") from exc
    for value, allowed, what in ((activation_type, QUANT_TYPES, "activation type"), (weight_type, QUANT_TYPES,
                                 "weight type"), (calibrate_method, CALIBRATION_METHODS, "calibration method")):
        if value not in allowed:
            raise CompressorError(f"unknown int8 {what} '{value}' (choose from {', '.join(allowed)})")
    quiet = logging.getLogger("onnxruntime.quantization")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="compressor-int8-") as scratch:
            source, prepared, quantized = (Path(scratch) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
            onnx.save_model(proto, str(source))
            # From a file: given a ModelProto, the optimizer step moves the weights out and then fails on shape
            # constants. ONNX shape inference is enough for CNNs; the symbolic one would import torch via
            # onnxruntime.tools.
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            excluded = matching_nodes(onnx.load(str(prepared), load_external_data=False), exclude)
            quantize_static(
                str(prepared), str(quantized), _reader(feeds), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=getattr(QuantType, QUANT_TYPES[activation_type]),
                weight_type=getattr(QuantType, QUANT_TYPES[weight_type]),
                calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[calibrate_method]),
                nodes_to_exclude=excluded or None,
            )
            result = onnx.load(str(quantized))
    except CompressorError:
        raise
    except Exception as exc:  # noqa: BLE001 - the quantizer raises many types
        first = first_line(exc)
        raise CompressorError(f"int8 quantization failed: {first}") from exc
    finally:
        quiet.setLevel(level)
    summary = {
        "format": "QDQ", "activation_type": activation_type, "weight_type": weight_type, "per_channel": per_channel,
        "calibrate_method": calibrate_method, "pre_process": "onnxruntime.quantization.quant_pre_process",
        "excluded_nodes": excluded, "quantized_ops": quantized_op_counts(result),
    }
    return result, summary


def quantized_op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """Per op type, how many nodes read a DequantizeLinear output (i.e. run on quantized inputs)."""
    dequantized = {out for node in proto.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dequantized for i in node.input):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))

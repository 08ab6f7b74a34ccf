"""The precision stage: fp16 or int8 after surgery (and reconstruction), compared with the fp32 model.

`convert_precision(proto, precision, calib_batches, options)` takes the verified fp32 model, converts it, runs the
converted and the fp32 model on the same inputs (the calibration inputs when given, else seeded random inputs) and
refuses (VerificationError, nothing written) when the relative output error exceeds `max_relative_error` or the
top-1 agreement of a classification output falls below `min_top1_agreement`. Default limits per precision:

| precision | max relative output error | min top-1 agreement |
|---|---|---|
| fp16 | 0.01 | 0.98 |
| int8 | 0.25 | 0.90 |

fp16 rounding moves logits by about 1e-3 relative; per-channel int8 with good calibration data by 0.02-0.1. A model
beyond these limits has a layer that does not survive the precision (an overflow in fp16, an outlier range in int8):
exclude it (`exclude`, matched like --exclude) or keep fp32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx

from compressor.deploy.agreement import compare_models
from compressor.deploy.feeds import as_feeds, seeded_feeds
from compressor.deploy.select import matching_nodes
from compressor.errors import CompressorError, VerificationError

PRECISIONS = ("fp32", "fp16", "int8")
LIMITS = {"fp16": (0.01, 0.98), "int8": (0.25, 0.90)}  # (max relative error, min top-1 agreement)
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}


@dataclass
class PrecisionOptions:
    """Settings of the precision stage (the defaults are the documented choices)."""

    keep_io_types: bool = True  # fp16: graph inputs and outputs stay fp32
    fp32_ops: tuple[str, ...] = ()  # fp16: op types kept fp32 on top of ONNX Runtime's default block list
    exclude: tuple[str, ...] = ()  # node/weight name patterns kept fp32 (fp16) or left unquantized (int8)
    activation_type: str = "uint8"  # int8 activations: uint8 (U8S8 with int8 weights) or int8 (S8S8)
    weight_type: str = "int8"
    per_channel: bool = True
    calibrate_method: str = "minmax"  # minmax, entropy or percentile
    calib_batch: int = 32  # batch size the calibration feeds are cut into (file sources)
    compare_samples: int = 64  # samples compared with the fp32 model
    seed: int = 0  # seed of the random comparison inputs when no calibration data is given
    max_relative_error: float | None = None  # None: the precision's default limit (LIMITS)
    min_top1_agreement: float | None = None
    input_shapes: dict[str, list[int]] | None = field(default=None)  # for random inputs; None: declared, dynamic = 1

    def limits(self, precision: str) -> tuple[float, float]:
        """(max relative error, min top-1 agreement) for `precision`."""
        default_error, default_agreement = LIMITS[precision]
        return (default_error if self.max_relative_error is None else self.max_relative_error,
                default_agreement if self.min_top1_agreement is None else self.min_top1_agreement)


def int8_model(proto: onnx.ModelProto, feeds, options: PrecisionOptions) -> tuple[onnx.ModelProto, dict]:
    """The product's int8 conversion of `proto` with `options` (types, per-channel, calibration method, exclusions),
    ranges from `feeds`: what `--precision int8` ships and what int8 latency tables time."""
    from compressor.deploy.int8 import to_int8

    return to_int8(proto, feeds, activation_type=options.activation_type, weight_type=options.weight_type,
                   per_channel=options.per_channel, calibrate_method=options.calibrate_method,
                   exclude=tuple(options.exclude))


def fp16_model(proto: onnx.ModelProto, options: PrecisionOptions, whole: bool = True
               ) -> tuple[onnx.ModelProto, dict]:
    """The product's fp16 conversion of `proto` with `options`: what `--precision fp16` ships and what fp16 latency
    tables time. Op types in `fp32_ops` (on top of ONNX Runtime's default list) stay fp32; so do the nodes that
    `exclude` names (node or weight name patterns, matched like --exclude); graph inputs and outputs stay fp32 with
    `keep_io_types`. Returns (model, settings for the report).

    `whole=False` converts a micro-model (one layer cut out of the network for the latency tables): fp16 throughout
    (a layer inside an fp16 network has no Cast around it) and only the op-type keeps apply. Name patterns do not:
    table entries are keyed by a layer's structure, never its name, so one entry serves every layer of that shape.
    Excluded layers reach the plan through the whole-network timings (calibration, closed-loop candidates, aligned
    baseline), which are converted with every setting.
    """
    from compressor.deploy.fp16 import default_fp32_ops, to_fp16

    kept = matching_nodes(proto, options.exclude) if whole else []
    keep_io_types = options.keep_io_types and whole
    converted = to_fp16(proto, keep_io_types, tuple(options.fp32_ops), tuple(kept))
    return converted, {"converter": "onnxruntime.transformers.float16", "keep_io_types": keep_io_types,
                       "fp32_ops": sorted(set(default_fp32_ops()) | set(options.fp32_ops)), "fp32_nodes": kept}


def check_precision_request(precision: str, has_calibration: bool) -> None:
    """Refuse an unknown precision, or int8 without calibration data, before any work is done."""
    if precision not in PRECISIONS:
        raise CompressorError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if precision == "int8" and not has_calibration:
        raise CompressorError("--precision int8 needs calibration data (--precision-calib PATH to a .npy/.npz of real "
                              "inputs): static int8 activation ranges come from real inputs, and random ones would set "
                              "wrong ranges")


def convert_precision(proto: onnx.ModelProto, precision: str, calib_batches=None,
                      options: PrecisionOptions | None = None) -> tuple[onnx.ModelProto, dict]:
    """Convert a verified fp32 model to `precision` and compare it with the fp32 model; returns (model, report).

    `calib_batches`: None, a .npy/.npz path, an object with `batches(batch_size)`, or an iterable of feed dicts
    (required for int8). Raises VerificationError (nothing to write) when the converted model exceeds the limits.
    """
    options = options or PrecisionOptions()
    check_precision_request(precision, calib_batches is not None)
    if precision == "fp32":
        return proto, {"precision": "fp32"}
    feeds = as_feeds(calib_batches, proto, options.calib_batch)
    kept = matching_nodes(proto, options.exclude)
    if options.exclude and not kept:
        raise CompressorError(f"--exclude-quant {' '.join(options.exclude)} matches no node of the model")
    absent = sorted(set(options.fp32_ops) - {n.op_type for n in proto.graph.node}) if precision == "fp16" else []
    if absent:
        raise CompressorError(f"--fp16-keep-op {' '.join(absent)}: no node of the model has that op type")
    if precision == "fp16":
        converted, settings = fp16_model(proto, options)
    else:
        converted, settings = int8_model(proto, feeds, options)
        settings["calibration_samples"] = feeds.samples
    if feeds is not None:
        compared, source = feeds.head(options.compare_samples), "calibration"
    else:
        compared, source = seeded_feeds(proto, _random_shapes(proto, options), options.compare_samples, options.seed), \
            "seeded random"
    agreement = compare_models(proto, converted, compared, source)
    max_error, min_agreement = options.limits(precision)
    report = {"precision": precision, **settings, "compared_with": "the fp32 compressed model",
              **agreement.to_dict(), "max_relative_error": max_error, "min_top1_agreement": min_agreement,
              "bytes_fp32": proto.ByteSize(), "bytes": converted.ByteSize()}
    worst_agreement = agreement.worst_top1_agreement
    if agreement.worst_relative_error > max_error or (worst_agreement is not None and worst_agreement < min_agreement):
        shown = "n/a" if worst_agreement is None else f"{worst_agreement:.3f}"
        raise VerificationError(
            f"{precision} model strays from the fp32 model on {agreement.samples} {source} samples: relative output "
            f"error {agreement.worst_relative_error:.3g} (limit {max_error:g}), top-1 agreement {shown} (limit "
            f"{min_agreement:g}); nothing written (exclude the sensitive layers or keep fp32)")
    return converted, report


def _random_shapes(proto: onnx.ModelProto, options: PrecisionOptions) -> dict[str, list[int]]:
    from compressor.engine.loading import resolve_input_shapes

    return resolve_input_shapes(proto, options.input_shapes)


def model_precision(proto: onnx.ModelProto) -> str:
    """fp32, fp16 or int8 as read from the graph (quantization nodes, else the dominant float initializer type);
    works on a model loaded without its external data."""
    if any(node.op_type in QUANTIZED_OPS for node in proto.graph.node):
        return "int8"
    elements = {onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 0}
    for init in proto.graph.initializer:
        if init.data_type in elements:
            count = 1
            for dim in init.dims:
                count *= dim
            elements[init.data_type] += count
    return "fp16" if elements[onnx.TensorProto.FLOAT16] > elements[onnx.TensorProto.FLOAT] else "fp32"


def options_dict(options: PrecisionOptions) -> dict:
    """JSON-ready settings."""
    return asdict(options)

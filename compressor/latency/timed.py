"""Models as they are timed: converted to the latency request's precision, with the product's own converters.

fp32 models are timed as they are. fp16: the conversion the product ships (compressor.deploy.precision.fp16_model)
with the request's settings: whole networks with their op-type keeps, name exclusions and I/O types as deployed,
micro-models fp16 throughout with the op-type keeps only (a layer inside an fp16 network has no Cast around it, and
table entries are keyed by structure, not name). int8: the QDQ conversion the product ships
(compressor.deploy.precision.int8_model: `quant_pre_process`, then `quantize_static`) with the request's activation
and weight types, per-channel setting and exclusions. Its activation ranges come from seeded random inputs: ranges
change the scales and zero points, not the kernels ONNX Runtime runs, so they are good enough for timing (the
shipped model's ranges still come from the user's calibration data). A quantized micro-model takes its input
already quantized (the leading QuantizeLinear is removed), as the layer inside an int8 network reads the previous
layer's int8 output.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import onnx
from onnx import helper

from compressor.latency.request import LatencyRequest

TIMING_SEED = 0  # seed of the random calibration inputs of int8 timing models
CONVERTED_NETWORKS = 4  # whole networks kept converted: the closed loop times the original against every candidate
_converted: OrderedDict[tuple, bytes] = OrderedDict()


def timing_model(model: onnx.ModelProto, request: LatencyRequest, whole: bool,
                 input_shapes: dict | None = None) -> onnx.ModelProto:
    """`model` in the request's precision, as it is timed: `whole` for a network (as deployed), else a
    micro-model (reduced precision throughout); input_shapes: the network's analysis shapes (dynamic axes other
    than the batch), as for the measurement. The last few converted networks are remembered
    (by content), so the original is converted once however many candidates it is paired with."""
    if request.precision not in ("fp16", "int8"):
        return model
    if not whole:
        return converted_model(model, request, whole, input_shapes)
    shapes = tuple(sorted((k, tuple(v)) for k, v in (input_shapes or {}).items()))
    key = (hashlib.sha1(model.SerializeToString()).hexdigest(), request.timed_precision, request.batch, shapes)
    data = _converted.get(key)
    if data is None:
        data = _converted[key] = converted_model(model, request, whole, input_shapes).SerializeToString()
        while len(_converted) > CONVERTED_NETWORKS:
            _converted.popitem(last=False)
    else:
        _converted.move_to_end(key)
    return onnx.load_from_string(data)


def converted_model(model: onnx.ModelProto, request: LatencyRequest, whole: bool,
                    input_shapes: dict | None = None) -> onnx.ModelProto:
    """`model` converted to the request's precision (no memory): see timing_model."""
    from compressor.deploy.precision import fp16_model, int8_model

    if request.precision == "fp16":
        return fp16_model(model, request.conversion_options(), whole)[0]
    if request.precision != "int8":
        return model
    from compressor.runtime.inputs import input_specs, make_inputs

    feeds = [make_inputs(input_specs(model, request.batch, input_shapes), TIMING_SEED)]
    quantized, _ = int8_model(model, feeds, request.conversion_options())
    return quantized if whole else quantized_inputs(quantized)


def quantized_inputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` with every graph input that only feeds one QuantizeLinear replaced by that node's (integer) output."""
    graph = proto.graph
    zero_points = {init.name: init.data_type for init in graph.initializer}
    for index, inp in enumerate(list(graph.input)):
        readers = [n for n in graph.node if inp.name in n.input]
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear" or len(readers[0].input) < 3:
            continue
        quantize = readers[0]
        elem_type = zero_points.get(quantize.input[2])
        if elem_type is None:
            continue
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in inp.type.tensor_type.shape.dim]
        graph.input[index].CopyFrom(helper.make_tensor_value_info(quantize.output[0], elem_type, shape))
        graph.node.remove(quantize)
    return proto

"""Load an ONNX model into a clean, analyzable form.

Handles external data, old-IR models whose initializers are also graph inputs, weights produced by
Constant / ConstantOfShape / Identity chains (folded into initializers) and stale value_info (dropped).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from compressor.errors import CompressorError, first_line

MIN_OPSET = 9
FOLD_MAX_ELEMENTS = 4096  # fold run-time computations of constants up to this size (shape and pad arithmetic)


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read a model from a path (external data included) or copy a ModelProto, and normalize it.

    The caller's object and file are never modified.
    """
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    else:
        path = Path(model)
        if not path.exists():
            raise CompressorError(f"model file not found: {path}")
        if not path.is_file():
            raise CompressorError(f"not a file: {path}")
        try:
            proto = onnx.load(str(path), load_external_data=True)
        except Exception as exc:  # noqa: BLE001 - protobuf raises several unrelated types on corrupt input
            raise CompressorError(f"cannot read ONNX model {path}: {first_line(exc, 200)}") from exc
        if not proto.graph.node:
            raise CompressorError(f"{path} is not an ONNX model (no graph nodes)")
    opset = model_opset(proto)
    if opset < MIN_OPSET:
        raise CompressorError(f"opset {opset} is not supported (need {MIN_OPSET} or newer); convert it with onnx.version_converter")
    normalize(proto)
    return proto


def default_opset(proto: onnx.ModelProto) -> int | None:
    """The model's opset version of the default ONNX domain."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


def model_opset(proto: onnx.ModelProto) -> int:
    """The default-domain opset of a model; a CompressorError when it has none."""
    opset = default_opset(proto)
    if opset is None:
        raise CompressorError("model has no default-domain opset import")
    return opset


def normalize(proto: onnx.ModelProto) -> None:
    """In place: drop initializer-shadowed inputs and stale value_info, fold constant producers of weights."""
    graph = proto.graph
    init_names = {t.name for t in graph.initializer}
    kept_inputs = [i for i in graph.input if i.name not in init_names]
    if len(kept_inputs) != len(graph.input):
        proto.ir_version = max(proto.ir_version, 4)  # IR 4 is the first that allows initializers outside inputs
    del graph.input[:]
    graph.input.extend(kept_inputs)
    del graph.value_info[:]
    _fold_constant_producers(graph, default_opset(proto))


def _fold_constant_producers(graph: onnx.GraphProto, opset: int | None = None) -> None:
    """Turn Constant, ConstantOfShape(const) and Identity(const) nodes, and small computations on constants
    (e.g. the pads or shapes an exporter computes at run time), into initializers, repeatedly."""
    consts: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    changed = True
    while changed:
        changed = False
        kept = []
        for node in graph.node:
            value = _constant_value(node, consts, opset or 17)
            if value is not None and node.output[0] not in graph_outputs:
                tensor = numpy_helper.from_array(value, node.output[0])
                consts[node.output[0]] = tensor
                graph.initializer.append(tensor)
                changed = True
            else:
                kept.append(node)
        if changed:
            del graph.node[:]
            graph.node.extend(kept)


def _constant_value(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto], opset: int = 17) -> np.ndarray | None:
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    value = _trivial_constant(node, consts)
    if value is not None or node.op_type in ("Constant", "Identity", "ConstantOfShape"):
        return value
    inputs = [i for i in node.input if i]
    if not inputs or any(i not in consts for i in inputs) or node.op_type in NEVER_FOLD:
        return None
    if sum(int(np.prod(consts[i].dims, dtype=np.int64)) for i in inputs) > FOLD_MAX_ELEMENTS:
        return None
    return _evaluate(node, consts, opset)


NEVER_FOLD = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")


def _evaluate(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto], opset: int) -> np.ndarray | None:
    from onnx.reference import ReferenceEvaluator

    try:
        feeds = {name: numpy_helper.to_array(consts[name]) for name in node.input if name}
        inputs = [onnx.helper.make_tensor_value_info(n, consts[n].data_type, list(consts[n].dims)) for n in feeds]
        graph = onnx.helper.make_graph([node], "fold", inputs, [onnx.ValueInfoProto(name=node.output[0])])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
        value = ReferenceEvaluator(model).run(None, feeds)[0]
    except Exception:  # noqa: BLE001 - anything the reference runtime cannot fold stays a computation
        return None
    value = np.asarray(value)
    return value if value.size <= FOLD_MAX_ELEMENTS else None


def _trivial_constant(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    if node.op_type == "Constant":
        attr = node.attribute[0] if node.attribute else None
        if attr is None:
            return None
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        scalars = {"value_float": np.float32, "value_int": np.int64}
        lists = {"value_floats": np.float32, "value_ints": np.int64}
        if attr.name in scalars:
            return np.array(onnx.helper.get_attribute_value(attr), dtype=scalars[attr.name])
        if attr.name in lists:
            return np.array(onnx.helper.get_attribute_value(attr), dtype=lists[attr.name])
        return None
    if node.op_type == "Identity" and node.input and node.input[0] in consts:
        return numpy_helper.to_array(consts[node.input[0]])
    if node.op_type == "ConstantOfShape" and node.input and node.input[0] in consts:
        shape = numpy_helper.to_array(consts[node.input[0]]).astype(np.int64)
        fill = np.zeros(1, dtype=np.float32)
        for attr in node.attribute:
            if attr.name == "value":
                fill = numpy_helper.to_array(attr.t).reshape(-1)
        return np.full(tuple(int(s) for s in shape), fill[0], dtype=fill.dtype)
    return None


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """Parse `name:1x3x224x224` (or bare `1x3x224x224` for a single-input model) into a dict; '' key for bare."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, _, dims = spec.rpartition(":")
        try:
            shape = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise CompressorError(f"bad --input-shape '{spec}' (expected NAME:1x3x224x224 or 1x3x224x224)") from None
        if not shape or any(d <= 0 for d in shape):
            raise CompressorError(f"bad --input-shape '{spec}': dimensions must be positive")
        shapes[name] = shape
    return shapes


def resolve_input_shapes(proto: onnx.ModelProto, overrides: dict[str, list[int]] | None) -> dict[str, list[int]]:
    """Concrete shapes for every graph input: declared dims, dynamic dims set to 1, overrides applied."""
    overrides = dict(overrides or {})
    inputs = list(proto.graph.input)
    if "" in overrides:
        if len(inputs) != 1:
            raise CompressorError("--input-shape without a name needs a model with exactly one input")
        overrides[inputs[0].name] = overrides.pop("")
    unknown = set(overrides) - {i.name for i in inputs}
    if unknown:
        raise CompressorError(f"--input-shape names unknown inputs: {', '.join(sorted(unknown))}")
    shapes = {}
    for inp in inputs:
        if inp.name in overrides:
            shapes[inp.name] = check_input_shape(inp, overrides[inp.name])
            continue
        dims = inp.type.tensor_type.shape.dim
        shapes[inp.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims]
    return shapes


def check_input_shape(inp: onnx.ValueInfoProto, shape: list[int]) -> list[int]:
    """`shape` if it fits the declared shape of graph input `inp` (same rank, same fixed dims), else CompressorError."""
    tensor_type = inp.type.tensor_type
    if not tensor_type.HasField("shape"):
        return list(shape)
    declared = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
    text = "x".join(str(d) for d in shape)
    wanted = "x".join("?" if d is None else str(d) for d in declared)
    if len(declared) != len(shape):
        raise CompressorError(f"--input-shape {inp.name}:{text} has rank {len(shape)} but the model's input "
                              f"'{inp.name}' has rank {len(declared)} ({wanted})")
    for axis, (fixed, given) in enumerate(zip(declared, shape)):
        if fixed is not None and fixed != given:
            raise CompressorError(f"--input-shape {inp.name}:{text}: dim {axis} is {given} but the model fixes it to "
                                  f"{fixed} ({wanted}; ? dims are free)")
    return list(shape)


QUANTIZATION_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                    "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul", "QGemm")


def refuse_quantized(proto: onnx.ModelProto) -> None:
    """Raise CompressorError for a quantized (QDQ or QOperator) model: compress the float model, then quantize."""
    found = sorted({n.op_type for n in proto.graph.node if n.op_type in QUANTIZATION_OPS})
    if found:
        raise CompressorError(f"quantized models are not supported yet (this one has {', '.join(found)}): compress "
                              f"the float model before quantizing it (then quantize the result)")

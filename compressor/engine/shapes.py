"""Concrete tensor shapes under fixed input shapes: ONNX shape inference, ONNX Runtime as a fallback."""

from __future__ import annotations

import numpy as np
import onnx

from compressor.errors import CompressorError
from compressor.runtime.inputs import random_inputs
from compressor.runtime.sessions import cpu_session


def with_fixed_inputs(proto: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of `proto` whose graph inputs have the given concrete shapes and no value_info."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    del fixed.graph.value_info[:]
    _fix_inputs(fixed.graph, input_shapes)
    return fixed


def _fix_inputs(graph: onnx.GraphProto, input_shapes: dict[str, list[int]]) -> None:
    for inp in graph.input:
        shape = input_shapes.get(inp.name)
        if shape is None:
            continue
        dims = inp.type.tensor_type.shape
        del dims.dim[:]
        for d in shape:
            dims.dim.add().dim_value = int(d)


# Initializers up to this many elements keep their values in shapes_only(): shape tensors (Reshape targets, Slice
# bounds) feed shape inference's data propagation; weights only need their type and dims.
SHAPE_VALUE_ELEMENTS = 1024


def shapes_only(proto: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """with_fixed_inputs() for shape and type inference: a copy of `proto`'s graph and opsets whose initializers larger
    than SHAPE_VALUE_ELEMENTS keep only name, type and dims. Inference then serializes kilobytes instead of the weights
    (a VGG-11 is 0.5 GB, serialized for each inference)."""
    light = onnx.ModelProto(ir_version=proto.ir_version)
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    graph, source = light.graph, proto.graph
    graph.name = source.name
    for field in ("node", "input", "output", "sparse_initializer"):
        getattr(graph, field).extend(getattr(source, field))
    for tensor in source.initializer:
        if int(np.prod(tensor.dims)) <= SHAPE_VALUE_ELEMENTS:
            graph.initializer.append(tensor)
        else:
            graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    _fix_inputs(graph, input_shapes)
    return light


def infer_shapes(proto: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> dict[str, tuple[int, ...]]:
    """Map every tensor name to its concrete shape; ONNX Runtime fills what shape inference leaves unknown."""
    shapes: dict[str, tuple[int, ...]] = {}
    light = shapes_only(proto, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - fall back to running the model
        inferred = light
    graph = inferred.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    missing = [o for n in graph.node for o in n.output if o and o not in shapes]
    if missing:
        try:
            shapes.update(run_for_shapes(with_fixed_inputs(proto, input_shapes), input_shapes, missing))
        except CompressorError:
            pass  # e.g. custom ops ONNX Runtime cannot run: tensors of unknown shape stay unprunable
    return shapes


def run_for_shapes(proto: onnx.ModelProto, input_shapes: dict[str, list[int]], names: list[str]) -> dict[str, tuple[int, ...]]:
    """Run the model once with ONNX Runtime, exposing `names` as outputs, and read their shapes."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    session = cpu_session(probe)
    wanted = [o.name for o in session.get_outputs() if o.name in set(names)]
    values = session.run(wanted, random_inputs(proto, input_shapes, seed=0))
    return {name: tuple(np.shape(v)) for name, v in zip(wanted, values)}

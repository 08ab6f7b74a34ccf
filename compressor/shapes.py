"""Concrete tensor shapes under fixed input shapes: ONNX shape inference, ONNX Runtime as a fallback."""

from __future__ import annotations

import numpy as np
import onnx

from compressor.errors import CompressorError

ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


def with_fixed_inputs(proto: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of `proto` whose graph inputs have the given concrete shapes and no value_info."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    del fixed.graph.value_info[:]
    for inp in fixed.graph.input:
        shape = input_shapes.get(inp.name)
        if shape is None:
            continue
        dims = inp.type.tensor_type.shape
        del dims.dim[:]
        for d in shape:
            dims.dim.add().dim_value = int(d)
    return fixed


def infer_shapes(proto: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> dict[str, tuple[int, ...]]:
    """Map every tensor name to its concrete shape; ONNX Runtime fills what shape inference leaves unknown."""
    fixed = with_fixed_inputs(proto, input_shapes)
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - fall back to running the model
        inferred = fixed
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
            shapes.update(run_for_shapes(fixed, input_shapes, missing))
        except CompressorError:
            pass  # e.g. custom ops ONNX Runtime cannot run: tensors of unknown shape stay unprunable
    return shapes


def random_inputs(proto: onnx.ModelProto, input_shapes: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input: standard normal floats, zeros for integer and bool inputs."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in proto.graph.input:
        dtype = ONNX_TO_NUMPY.get(inp.type.tensor_type.elem_type)
        if dtype is None:
            raise CompressorError(f"input '{inp.name}' has an unsupported element type")
        shape = input_shapes[inp.name]
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
    return feeds


def run_for_shapes(proto: onnx.ModelProto, input_shapes: dict[str, list[int]], names: list[str]) -> dict[str, tuple[int, ...]]:
    """Run the model once with ONNX Runtime, exposing `names` as outputs, and read their shapes."""
    from compressor.runtime import cpu_session

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

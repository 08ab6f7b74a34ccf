"""The inputs a caller feeds a model: concrete shapes (batch and --input-shape) and seeded random values."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import onnx

from compressor.errors import CompressorError, first_line

ModelRef = Union[str, os.PathLike, onnx.ModelProto]


@dataclass(frozen=True)
class InputSpec:
    """One concrete model input: name, shape and numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def read_graph_inputs(model: ModelRef) -> list[onnx.ValueInfoProto]:
    """The fed inputs of a model path or proto, without loading external weights; CompressorError when unreadable."""
    return graph_inputs(read_model_header(model))


def read_model_header(model: ModelRef) -> onnx.ModelProto:
    """The model without its external weights (a proto is returned as is); CompressorError when unreadable."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise CompressorError(f"model file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise many types for a bad file
        raise CompressorError(f"cannot read ONNX model {path}: {first_line(exc, 200)}") from exc
    if not proto.graph.node:
        raise CompressorError(f"{path} is not an ONNX model (no graph nodes)")
    return proto


def input_specs(model: onnx.ModelProto, batch: int | None, input_shapes: dict[str, list[int]] | None = None) -> list[InputSpec]:
    """Concrete shapes for the model's inputs: a dynamic first dim takes `batch` (1 when None), other dynamic dims
    take the value in `input_shapes[name]` or 1. A fixed first dim that differs from `batch` is an error."""
    return specs_from_inputs(graph_inputs(model), batch, input_shapes)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds (graph inputs that are not initializers)."""
    initializers = {init.name for init in model.graph.initializer}
    return [onnx.ValueInfoProto.FromString(inp.SerializeToString()) for inp in model.graph.input if inp.name not in initializers]


def specs_from_inputs(inputs: list[onnx.ValueInfoProto], batch: int | None, input_shapes: dict | None) -> list[InputSpec]:
    """InputSpecs of `inputs` (see input_specs); `input_shapes` may name the only input "" (a bare 1x3x224x224)."""
    given = dict(input_shapes or {})
    if "" in given and len(inputs) == 1:  # a bare 1x3x224x224 names the only input
        given[inputs[0].name] = given.pop("")
    unknown = set(given) - {inp.name for inp in inputs}
    if unknown:
        names = ", ".join(inp.name for inp in inputs)
        raise CompressorError(f"--input-shape names unknown input(s) {', '.join(sorted(unknown))} (model inputs: {names})")
    specs = []
    for inp in inputs:
        tensor_type = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
        wanted = given.get(inp.name)
        if wanted is not None and len(wanted) != len(dims):
            raise CompressorError(f"input '{inp.name}' has rank {len(dims)}, --input-shape gives {len(wanted)} dims")
        shape = []
        for axis, dim in enumerate(dims):
            if axis == 0:
                if dim is not None and batch is not None and dim != batch:
                    raise CompressorError(f"input '{inp.name}' has a fixed batch size of {dim}; cannot run batch {batch}")
                shape.append(dim or batch or 1)
            elif dim is not None:
                if wanted is not None and wanted[axis] != dim:
                    raise CompressorError(
                        f"input '{inp.name}' has a fixed dim {axis} of {dim}, --input-shape gives {wanted[axis]}")
                shape.append(dim)
            else:
                shape.append(int(wanted[axis]) if wanted is not None else 1)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        specs.append(InputSpec(inp.name, tuple(shape), dtype))
    return specs


def make_inputs(specs: list[InputSpec], seed: int = 0, integers: str = "random") -> dict[str, np.ndarray]:
    """Seeded inputs: standard normal for floats; for integers and booleans small non-negative integers and random
    booleans (integers="random"), or zeros without drawing (integers="zeros": verification, where integer inputs
    are often indices)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        elif integers == "zeros":
            feeds[spec.name] = np.zeros(spec.shape, dtype=dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.random(spec.shape) < 0.5
        else:
            feeds[spec.name] = rng.integers(0, 8, size=spec.shape).astype(dtype)
    return feeds


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


def random_inputs(proto: onnx.ModelProto, input_shapes: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    """Seeded feeds for every graph input of `proto` at `input_shapes`: standard normal floats, zeros for integer
    and bool inputs."""
    specs = []
    for inp in proto.graph.input:
        dtype = ONNX_TO_NUMPY.get(inp.type.tensor_type.elem_type)
        if dtype is None:
            raise CompressorError(f"input '{inp.name}' has an unsupported element type")
        specs.append(InputSpec(inp.name, tuple(input_shapes[inp.name]), np.dtype(dtype).name))
    return make_inputs(specs, seed, integers="zeros")

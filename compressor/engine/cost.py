"""MACs and parameter counts per layer and in total, measured on a concrete graph."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from compressor.engine.graph import GraphView, ensure_node_names
from compressor.engine.loading import load_model, resolve_input_shapes
from compressor.engine.shapes import infer_shapes

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class LayerCost:
    """Cost of one node: multiply-accumulates and the float parameters it is first to consume."""

    name: str
    op_type: str
    macs: int
    params: int


@dataclass
class ModelCost:
    """Total MACs and parameters of a model, with the per-layer breakdown."""

    macs: int
    params: int
    layers: list[LayerCost] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"macs": self.macs, "params": self.params, "layers": [vars(layer) for layer in self.layers]}


def node_macs(node: onnx.NodeProto, view: GraphView) -> int:
    """Multiply-accumulates of one node under the view's shapes (0 for ops without a MAC rule or shape)."""
    if node.op_type not in MAC_OPS:
        return 0
    out_shape = view.shape(node.output[0])
    in_shape = view.shape(node.input[0])
    w_shape = view.shape(node.input[1]) if len(node.input) > 1 else None
    if out_shape is None or in_shape is None or w_shape is None:
        return 0
    if node.op_type == "Conv":
        return int(np.prod(out_shape, dtype=np.int64) * np.prod(w_shape[1:], dtype=np.int64))
    if node.op_type == "ConvTranspose":
        return int(np.prod(in_shape, dtype=np.int64) * np.prod(w_shape[1:], dtype=np.int64))
    if node.op_type == "Gemm":
        trans_a = any(a.name == "transA" and a.i for a in node.attribute)
        k = in_shape[0] if trans_a else in_shape[-1]
        return int(np.prod(out_shape, dtype=np.int64) * k)
    k = in_shape[-1]
    return int(np.prod(out_shape, dtype=np.int64) * k)


def is_param(value: np.ndarray) -> bool:
    """Whether an initializer counts as a parameter (floating point weights, not shape constants)."""
    return np.issubdtype(value.dtype, np.floating)


def view_cost(view: GraphView) -> ModelCost:
    """Cost of every node of a graph view; each parameter is counted once, at its first consumer."""
    counted: set[str] = set()
    layers = []
    for node in view.nodes:
        params = 0
        # A QDQ model's weights are the integer inputs of DequantizeLinear; its scales and zero points are not params.
        dequantize = node.op_type == "DequantizeLinear"
        for position, name in enumerate(node.input):
            value = view.const(name)
            counts = (position == 0) if dequantize else value is not None and is_param(value)
            if value is not None and name not in counted and counts:
                counted.add(name)
                params += int(value.size)
        macs = node_macs(node, view)
        if macs or params:
            layers.append(LayerCost(node.name, node.op_type, macs, params))
    return ModelCost(sum(layer.macs for layer in layers), sum(layer.params for layer in layers), layers)


def model_cost(model, input_shapes: dict[str, list[int]] | None = None) -> ModelCost:
    """MACs and parameters of a model (path or ModelProto); dynamic input dims default to 1."""
    proto = load_model(model)
    ensure_node_names(proto)
    shapes = resolve_input_shapes(proto, input_shapes)
    return view_cost(GraphView(proto, infer_shapes(proto, shapes)))

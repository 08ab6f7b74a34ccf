"""Write refitted weights and biases into a model: the pruned result, and the verification reference (the original
with the removed channels zeroed) where they go in at the kept positions, so verification still proves the surgery.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from compressor.calibration.layers import LinearLayer, initializer_value
from compressor.engine.graph import attr, set_attr


def write_layer(proto: onnx.ModelProto, layer: LinearLayer, weight: np.ndarray, bias: np.ndarray) -> None:
    """In place: give `layer` of `proto` this ONNX-shaped weight and effective per-output bias (added when missing)."""
    inits = {t.name: t for t in proto.graph.initializer}
    inits[layer.weight].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weight), layer.weight))
    dtype = weight.dtype
    node_index, node = next((i, n) for i, n in enumerate(proto.graph.node) if n.name == layer.node)
    if layer.op == "Gemm":
        beta = float(attr(node, "beta", 1.0))
        if beta == 0.0:
            set_attr(node, "beta", 1.0)
            beta = 1.0
        bias = bias / beta
    if layer.bias is not None:
        old = inits[layer.bias]
        value = bias.reshape(tuple(old.dims)) if int(np.prod(old.dims)) == bias.size else bias
        old.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value.astype(dtype)), layer.bias))
        return
    name = _fresh_name(proto, f"{layer.node}__refit_bias")
    proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(bias.astype(dtype)), name))
    if layer.op == "MatMul":
        product = _fresh_name(proto, f"{layer.output}__refit_product")
        node.output[0] = product
        add = onnx.helper.make_node("Add", [product, name], [layer.output], name=_fresh_name(proto, f"{layer.node}__refit_add"))
        proto.graph.node.insert(node_index + 1, add)
    else:
        while len(node.input) < 2:
            node.input.append("")
        if len(node.input) == 2:
            node.input.append(name)
        else:
            node.input[2] = name


def _fresh_name(proto: onnx.ModelProto, base: str) -> str:
    taken = {t.name for t in proto.graph.initializer} | {n.name for n in proto.graph.node}
    taken |= {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def kept_masks(analysis, plan, init: str, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Per axis of initializer `init` (original shape): True where the plan keeps the position."""
    removed = analysis.removed_mask(plan)
    dropped = analysis.dropped_nodes(plan)
    masks = [np.ones(n, dtype=bool) for n in shape]
    seen: set[int] = set()
    for p in analysis.params:
        if p.init == init and p.node not in dropped and p.axis not in seen:
            seen.add(p.axis)
            masks[p.axis] = ~removed[p.units]
    return masks


def add_refits_to_reference(reference: onnx.ModelProto, analysis, plan, refits) -> None:
    """In place: put each refit (LayerRefit with .layer, .weight, .bias, .kept_outputs) into the zeroed reference.

    The refitted weight fills the kept positions of the original weight (removed inputs stay zero, removed outputs
    keep their original filters); the bias is the original one with the kept outputs replaced.
    """
    for refit in refits:
        layer = refit.layer
        original = initializer_value(reference, layer.weight)
        masks = kept_masks(analysis, plan, layer.weight, original.shape)
        full = original.copy()
        full[np.ix_(*masks)] = refit.weight
        outputs = refit.original_outputs
        old_bias = initializer_value(reference, layer.bias) if layer.bias is not None else None
        bias = layer.bias_vector(old_bias, outputs)
        bias[refit.kept_outputs] = refit.bias
        write_layer(reference, layer, full, bias)

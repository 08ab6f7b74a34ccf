"""Cost items and their micro-models: the pieces of a network whose latency the table measures in isolation.

A *cost item* is a small subgraph of the analysed model whose latency depends on the kept widths of a few channel
groups: a `layer` (one conv/gemm with a constant weight, plus the chain of per-channel ops that follow it alone,
e.g. BN and the activation, which ONNX Runtime fuses into it) or a `join` (the Add of a removable residual block).
Everything else (pools, flatten, the ReLU after a join, the session's own overhead) is the network's residual,
calibrated against measurements of the whole model (see table.py).

`micro_model` cuts an item out of the graph at given group widths with the engine's own surgery (the same parameter
slices and attribute rewrites as `apply_plan`), so a measured micro-model has exactly the shapes and attributes the
layer will have in the compressed network. `structure_key` hashes a micro-model without its weight values and
names: the layer signature of the on-disk cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressor.engine.cost import MAC_OPS, is_param
from compressor.engine.surgery import SurgeryContext, apply_rewrites, keep_function, slice_parameters

if TYPE_CHECKING:
    from compressor.engine.analysis import Analysis

# Ops that act on each channel alone; a chain of them after a layer (each the only reader of its input, every
# other input constant) belongs to the layer's cost item, as ONNX Runtime usually fuses or streams them with it.
PER_CHANNEL_FOLLOWERS = {
    "BatchNormalization", "Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Elu",
    "Selu", "Tanh", "Softplus", "Identity", "Dropout", "Add", "Sub", "Mul", "Div",
}


@dataclass(frozen=True)
class CostItem:
    """A measured piece of the network.

    kind: "layer" or "join"; nodes: node names in graph order; inputs: activation tensors it reads from outside;
    dims: the variable groups whose kept widths change its shapes (sorted); blocks: removable blocks whose
    dropping removes it (an item inside nested branches belongs to several).
    """

    index: int
    name: str
    kind: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dims: tuple[int, ...]
    blocks: frozenset[int]


def find_items(analysis: Analysis, variable_groups: set[int]) -> list[CostItem]:
    """The layer items (every MAC node with a constant weight, with its follower chain) and the join items (one per
    removable block) of `analysis`; `variable_groups` are the groups whose widths the allocation may change."""
    view = analysis.view
    in_blocks: dict[str, set[int]] = {}
    for block in analysis.blocks:
        for name in [*block.nodes, block.join]:
            in_blocks.setdefault(name, set()).add(block.index)
    items: list[CostItem] = []
    for node in view.nodes:
        if node.op_type in MAC_OPS and len(node.input) > 1 and view.const(node.input[1]) is not None:
            chain = _follower_chain(view, node)
            blocks = frozenset(in_blocks.get(node.name, set()))
            items.append(_item(analysis, len(items), "layer", chain, blocks, variable_groups))
    joins = {b.join: b for b in analysis.blocks}
    for node in view.nodes:
        if node.name in joins:
            blocks = frozenset(in_blocks.get(node.name, set()))
            items.append(_item(analysis, len(items), "join", [node], blocks, variable_groups))
    return items


def _follower_chain(view, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    chain = [node]
    while True:
        out = chain[-1].output[0]
        consumers = view.consumers.get(out, [])
        if out in view.outputs or len(consumers) != 1:
            return chain
        nxt = consumers[0]
        others = [i for i in nxt.input if i and i != out]
        if nxt.op_type not in PER_CHANNEL_FOLLOWERS or nxt.input[0] != out or any(view.const(i) is None for i in others):
            return chain
        chain.append(nxt)


def _item(analysis: Analysis, index: int, kind: str, nodes: list[onnx.NodeProto], blocks: frozenset[int],
          variable_groups: set[int]) -> CostItem:
    view = analysis.view
    names = {n.name for n in nodes}
    produced = {o for n in nodes for o in n.output if o}
    inputs = []
    for n in nodes:
        for i in n.input:
            if i and i not in produced and view.const(i) is None and i not in inputs:
                inputs.append(i)
    outputs = [o for n in nodes for o in n.output
               if o and (o in view.outputs or any(c.name not in names for c in view.consumers.get(o, [])))]
    if not outputs:
        outputs = [nodes[-1].output[0]]
    units: list[np.ndarray] = [analysis.cmaps[t].units for t in [*inputs, *outputs] if t in analysis.cmaps]
    units += [p.units for p in analysis.params if p.node in names]
    touched = {analysis.unit_group.get(int(u)) for array in units for u in np.unique(array)}
    dims = tuple(sorted(g for g in touched if g in variable_groups))
    return CostItem(index, nodes[0].name, kind, tuple(n.name for n in nodes), tuple(inputs), tuple(outputs), dims, blocks)


def removed_units(analysis: Analysis, widths: dict[int, int]) -> np.ndarray:
    """Boolean mask over unit ids that keeps `widths[g]` units of each listed group (the last prunable ones go)."""
    removed = np.zeros(len(analysis.unit_roots), dtype=bool)
    for g, kept in widths.items():
        group = analysis.groups[g]
        prunable = np.nonzero(group.prunable)[0]
        n_remove = min(max(group.size - int(kept), 0), len(prunable))
        if n_remove:
            removed[group.units[prunable[len(prunable) - n_remove:]]] = True
    return removed


def micro_model(analysis: Analysis, item: CostItem, widths: dict[int, int], batch: int, copies: int = 1,
                weights: bool = True, pooled: bool = False) -> onnx.ModelProto:
    """A model computing `item` alone at the given group widths and batch size, `copies` times side by side.

    Parameters are sliced and attributes rewritten exactly as surgery would for those widths. Copies read the same
    inputs but own their (slightly scaled) weights, so ONNX Runtime cannot merge them; several copies let a GPU
    overlap one layer's kernel with the next one's launch, as it does inside the network. weights=False gives the
    float parameters as empty placeholders of the right shapes: enough for `structure_key`, and much cheaper.
    pooled=True ends every 4-D output in a GlobalAveragePool: on CPUs the layer's output is then read once, as
    its consumer in the network would, instead of being reordered out of ONNX Runtime's blocked layout and copied
    into a numpy array, work the network does not do (and that would dwarf a memory-bound layer).
    """
    view = analysis.view
    keep = keep_function(analysis, removed_units(analysis, widths))
    nodes = [onnx.NodeProto() for _ in item.nodes]
    by_name = {n.name: n for n in view.nodes}
    for copy, name in zip(nodes, item.nodes):
        copy.CopyFrom(by_name[name])
    constants = list(dict.fromkeys(i for n in nodes for i in n.input if i and view.const(i) is not None))
    placeholders = {c for c in constants if not weights and is_param(view.const(c))}
    inits = []
    for c in constants:
        value = np.asarray(view.const(c))
        if c in placeholders:
            inits.append(TensorProto(name=c, dims=value.shape, data_type=helper.np_dtype_to_tensor_dtype(value.dtype)))
        else:
            inits.append(numpy_helper.from_array(value, c))
    base_batch = _analysis_batch(analysis)
    inputs = [helper.make_tensor_value_info(t, _elem_type(view, t), _shape_at(analysis, t, keep, batch, base_batch))
              for t in item.inputs]
    outputs = [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in item.outputs]
    if pooled:
        for out in outputs:
            if len(view.shape(out.name) or ()) == 4:
                nodes.append(helper.make_node("GlobalAveragePool", [out.name], [f"{out.name}__pooled"],
                                              name=f"{out.name}__pool"))
                out.name = f"{out.name}__pooled"
    graph = helper.make_graph(nodes, item.name, inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=list(analysis.proto.opset_import), ir_version=analysis.proto.ir_version)
    ctx = SurgeryContext(proto)
    names = set(item.nodes)
    slice_parameters(analysis, ctx, keep, lambda p: p.node in names, placeholders)
    apply_rewrites(analysis, ctx, keep)
    if weights:
        _declare_output_shapes(proto)
    return _replicate(proto, copies) if copies > 1 else proto


def _declare_output_shapes(proto: onnx.ModelProto) -> None:
    """Give the graph outputs the shapes and types ONNX shape inference finds (where it finds them)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph
    except Exception:  # noqa: BLE001 - untyped outputs still run in ONNX Runtime
        return
    known = {vi.name: vi for vi in [*inferred.value_info, *inferred.output] if vi.type.tensor_type.HasField("shape")}
    for out in proto.graph.output:
        if out.name in known:
            out.CopyFrom(known[out.name])


def _analysis_batch(analysis: Analysis) -> int:
    shapes = [s for s in analysis.input_shapes.values() if s]
    return int(shapes[0][0]) if shapes else 1


def _elem_type(view, tensor: str) -> int:
    for vi in list(view.proto.graph.input) + list(view.proto.graph.value_info) + list(view.proto.graph.output):
        if vi.name == tensor and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
    return TensorProto.FLOAT


def _shape_at(analysis: Analysis, tensor: str, keep, batch: int, base_batch: int) -> list[int]:
    shape = list(analysis.view.shape(tensor) or ())
    if not shape:
        raise ValueError(f"tensor '{tensor}' has no known shape")
    cmap = analysis.cmaps.get(tensor)
    if cmap is not None:
        shape[cmap.axis] = int(keep(cmap.units).sum())
    if shape[0] == base_batch:
        shape[0] = batch
    return shape


def _replicate(proto: onnx.ModelProto, copies: int) -> onnx.ModelProto:
    """`copies` independent copies of the graph on the same inputs (own weights, own outputs)."""
    graph = proto.graph
    shared = {i.name for i in graph.input}
    nodes, inits, outputs = [], [], []
    for c in range(copies):
        rename = lambda name, c=c: name if not name or name in shared else f"{name}__copy{c}"  # noqa: E731
        for init in graph.initializer:
            value = numpy_helper.to_array(init)
            if np.issubdtype(value.dtype, np.floating) and value.ndim > 1:
                value = value * value.dtype.type(1.0 + 1e-3 * c)
            inits.append(numpy_helper.from_array(value, rename(init.name)))
        for node in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = rename(node.name)
            copy.input[:] = [rename(i) for i in node.input]
            copy.output[:] = [rename(o) for o in node.output]
            nodes.append(copy)
        for out in graph.output:
            outputs.append(onnx.ValueInfoProto())
            outputs[-1].CopyFrom(out)
            outputs[-1].name = rename(out.name)
    new = helper.make_graph(nodes, graph.name, list(graph.input), outputs, inits)
    return helper.make_model(new, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)


def structure_key(proto: onnx.ModelProto) -> str:
    """A hash of the model's structure: op types, attributes, tensor wiring, shapes and dtypes of inputs and
    initializers; no names and no weight values (latency does not depend on them)."""
    graph = proto.graph
    ids: dict[str, int] = {}

    def tid(name: str) -> str:
        return "" if not name else f"t{ids.setdefault(name, len(ids))}"

    digest = hashlib.sha256()
    for vi in graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
        digest.update(f"in {tid(vi.name)} {vi.type.tensor_type.elem_type} {dims};".encode())
    for init in graph.initializer:
        digest.update(f"init {tid(init.name)} {init.data_type} {list(init.dims)};".encode())
    for node in graph.node:
        attrs = []
        for a in sorted(node.attribute, key=lambda a: a.name):
            if a.type == onnx.AttributeProto.TENSOR:
                attrs.append(f"{a.name}=tensor{list(a.t.dims)}:{hashlib.sha256(a.t.SerializeToString()).hexdigest()[:16]}")
            else:
                attrs.append(f"{a.name}={helper.get_attribute_value(a)!r}")
        ins = ",".join(tid(i) for i in node.input)
        outs = ",".join(tid(o) for o in node.output)
        digest.update(f"{node.domain}:{node.op_type}({ins})->{outs}[{';'.join(attrs)}];".encode())
    for out in graph.output:
        digest.update(f"out {tid(out.name)};".encode())
    opsets = sorted((o.domain, o.version) for o in proto.opset_import)
    digest.update(repr(opsets).encode())
    return digest.hexdigest()[:32]

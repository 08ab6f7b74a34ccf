"""Apply a plan to the ONNX graph: drop blocks, slice initializers, rewrite attributes and shape constants.

The same machinery builds the verification reference (`zeroed_reference`): the original model with the removed
channels zeroed where mixing layers consume them and the dropped branches bypassed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from compressor.engine.plan import Plan

if TYPE_CHECKING:
    from compressor.engine.analysis import Analysis
    from compressor.engine.tracer import KeepFn, ParamSlice


class SurgeryContext:
    """Access to a model under surgery for the rewrite functions of the rule table."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.inits = {t.name: i for i, t in enumerate(proto.graph.initializer)}
        self._fresh = 0

    def value(self, name: str) -> np.ndarray:
        """Current value of initializer `name`."""
        return numpy_helper.to_array(self.proto.graph.initializer[self.inits[name]])

    def replace(self, name: str, value: np.ndarray) -> None:
        """Replace the value of initializer `name`."""
        self.proto.graph.initializer[self.inits[name]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))

    def set_input_constant(self, node: onnx.NodeProto, slot: int, value: np.ndarray) -> None:
        """Point input `slot` of `node` at a new initializer holding `value` (never edits shared constants)."""
        old = node.input[slot]
        dtype = self.value(old).dtype if old in self.inits else np.int64
        self._fresh += 1
        name = f"{old or node.name}__pruned_{self._fresh}"
        self.proto.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        self.inits[name] = len(self.proto.graph.initializer) - 1
        node.input[slot] = name


def bypass_blocks(proto: onnx.ModelProto, analysis: Analysis, plan: Plan) -> None:
    """Remove the plan's dropped branches: each join's output becomes its skip input (in place)."""
    if not plan.dropped_blocks:
        return
    graph = proto.graph
    outputs = {o.name for o in graph.output}
    renames: dict[str, str] = {}
    doomed: set[str] = set()
    identities = []
    for index in sorted(plan.dropped_blocks):
        block = analysis.blocks[index]
        doomed.update(block.nodes)
        join = next(n for n in graph.node if n.name == block.join)
        doomed.add(join.name)
        if join.output[0] in outputs:
            identities.append(onnx.helper.make_node("Identity", [block.skip], [join.output[0]], name=f"{join.name}__bypass"))
        else:
            renames[join.output[0]] = block.skip
    for name, target in list(renames.items()):
        while target in renames:
            target = renames[target]
        renames[name] = target
    kept = [n for n in graph.node if n.name not in doomed]
    for node in kept + identities:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    del graph.node[:]
    graph.node.extend(kept + identities)


def keep_function(analysis: Analysis, removed: np.ndarray) -> KeepFn:
    """keep(units) → bool mask of the units that stay; units captured by rules at trace time are mapped to their
    roots first. `removed` is a bool array over unit ids (Analysis.removed_mask)."""
    roots = analysis.unit_roots

    def keep(units: np.ndarray) -> np.ndarray:
        return ~removed[roots[np.asarray(units, dtype=np.int64)]]

    return keep


def slice_parameters(analysis: Analysis, ctx: SurgeryContext, keep: KeepFn, include: Callable[[ParamSlice], bool],
                     placeholders: frozenset[str] | set[str] = frozenset()) -> None:
    """Remove the dropped positions of every registered parameter slice `include` accepts, once per (initializer,
    axis). Placeholders (initializers without values) only get their dims shrunk."""
    done: set[tuple[str, int]] = set()
    for p in analysis.params:
        if (p.init, p.axis) in done or p.init not in ctx.inits or not include(p):
            continue
        done.add((p.init, p.axis))
        mask = keep(p.units)
        if mask.all():
            continue
        if p.init in placeholders:
            ctx.proto.graph.initializer[ctx.inits[p.init]].dims[p.axis] = int(mask.sum())
        else:
            ctx.replace(p.init, np.compress(mask, ctx.value(p.init), axis=p.axis))


def apply_rewrites(analysis: Analysis, ctx: SurgeryContext, keep: KeepFn, skip: set[str] = frozenset()) -> None:
    """Run the rules' attribute and shape-constant rewrites on the nodes of `ctx.proto` (those in `skip` aside)."""
    nodes = {n.name: n for n in ctx.proto.graph.node}
    for node_name, rewrite in analysis.rewrites:
        if node_name in nodes and node_name not in skip:
            rewrite(nodes[node_name], keep, ctx)


def apply_plan(analysis: Analysis, plan: Plan) -> onnx.ModelProto:
    """A new model with the plan's channels and blocks physically removed, cleaned up and shape-inferred."""
    proto = onnx.ModelProto()
    proto.CopyFrom(analysis.proto)
    bypass_blocks(proto, analysis, plan)
    keep = keep_function(analysis, analysis.removed_mask(plan))
    dropped = analysis.dropped_nodes(plan)
    ctx = SurgeryContext(proto)
    slice_parameters(analysis, ctx, keep, lambda p: p.node not in dropped)
    apply_rewrites(analysis, ctx, keep, skip=dropped)
    return finalize(proto)


def zeroed_reference(analysis: Analysis, plan: Plan) -> onnx.ModelProto:
    """The original model with removed channels zeroed at their mixing consumers and dropped branches bypassed."""
    proto = onnx.ModelProto()
    proto.CopyFrom(analysis.proto)
    bypass_blocks(proto, analysis, plan)
    removed = analysis.removed_mask(plan)
    ctx = SurgeryContext(proto)
    for p in analysis.params:
        if p.role != "in" or not removed[p.units].any():
            continue
        value = ctx.value(p.init).copy()
        index = [slice(None)] * value.ndim
        index[p.axis] = np.nonzero(removed[p.units])[0]
        value[tuple(index)] = 0
        ctx.replace(p.init, value)
    return finalize(proto)


def finalize(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Remove dead nodes and unused initializers, sort topologically, drop stale intermediate shapes."""
    graph = gs.import_onnx(proto)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor not in graph.inputs and tensor not in graph.outputs:
            tensor.shape = None
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = proto.ir_version
    del out.opset_import[:]
    out.opset_import.extend(proto.opset_import)
    out.producer_name = proto.producer_name
    out.producer_version = proto.producer_version
    del out.metadata_props[:]
    out.metadata_props.extend(proto.metadata_props)
    del out.graph.value_info[:]
    for field_name in ("input", "output"):
        declared = {vi.name: vi for vi in getattr(proto.graph, field_name)}
        for vi in getattr(out.graph, field_name):
            if vi.name in declared:
                vi.CopyFrom(declared[vi.name])
    return out

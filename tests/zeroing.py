"""Make chosen channel units and residual branches exactly zero in an ONNX model (for `zeros` tests)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from compressor.engine.analysis import Analysis
from compressor.engine.plan import Plan

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _zero_along(value: np.ndarray, axis: int, mask: np.ndarray) -> np.ndarray:
    value = value.copy()
    index = [slice(None)] * value.ndim
    index[axis] = np.nonzero(mask)[0]
    value[tuple(index)] = 0
    return value


def zero_structures(analysis: Analysis, n_groups: int = 3, with_block: bool = True) -> tuple[onnx.ModelProto, Plan]:
    """Zero unit 0 of up to `n_groups` prunable groups and one residual branch; return the model and the plan
    that `zeros` must find."""
    proto = onnx.ModelProto()
    proto.CopyFrom(analysis.proto)
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = {n.name: n for n in analysis.view.nodes}
    block = analysis.blocks[0] if with_block and analysis.blocks else None
    in_block = set(block.nodes) if block else set()
    candidates = [g for g in analysis.groups if g.prunable[0] and g.size > 1 and not set(g.producers) & in_block
                  and not any(analysis.unit_roots[u] in set(_units_in_nodes(analysis, in_block)) for u in g.units[:1])]
    chosen = [candidates[i] for i in np.linspace(0, len(candidates) - 1, min(n_groups, len(candidates))).astype(int)] if candidates else []
    targets = np.array([g.units[0] for g in chosen], dtype=np.int64)
    for p in analysis.params:
        node = nodes[p.node]
        mask = np.isin(p.units, targets)
        if not mask.any() or p.role == "in":
            continue
        if node.op_type == "BatchNormalization" and list(node.input).index(p.init) not in (1, 2):
            continue
        if node.op_type in ("Mul", "Div", "Pow", "PRelu"):
            continue
        values[p.init] = _zero_along(values[p.init], p.axis, mask)
    if block:
        order = [n.name for n in analysis.view.nodes if n.name in in_block]
        last_mac = max(i for i, name in enumerate(order) if nodes[name].op_type in MAC_OPS)
        for name in order[last_mac:]:
            node = nodes[name]
            slots = {"BatchNormalization": (1, 2), "Add": (0, 1), "Sub": (0, 1)}.get(node.op_type, (1, 2) if node.op_type in MAC_OPS else ())
            for slot in slots:
                if slot < len(node.input) and node.input[slot] in values:
                    values[node.input[slot]] = np.zeros_like(values[node.input[slot]])
    for t in proto.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    plan = Plan(removed={g.index: np.array([0]) for g in chosen}, dropped_blocks={block.index} if block else set())
    return proto, plan


def _units_in_nodes(analysis: Analysis, names: set[str]) -> list[int]:
    return [int(u) for p in analysis.params if p.node in names for u in p.units]

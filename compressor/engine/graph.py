"""A small read-only view of an ONNX graph: topological node order, producers, consumers, constants, shapes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from compressor.errors import CompressorError


def ensure_node_names(proto: onnx.ModelProto) -> None:
    """Give every node a unique, non-empty name (in place)."""
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute `name` of `node`, or `default`."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    """Set (replace or add) attribute `name` of `node`."""
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


@dataclass
class GraphView:
    """Topologically sorted nodes with producer/consumer maps, constant values and concrete shapes."""

    proto: onnx.ModelProto
    shapes: dict[str, tuple[int, ...]]
    nodes: list[onnx.NodeProto] = field(init=False)
    by_name: dict[str, onnx.NodeProto] = field(init=False)
    producer: dict[str, onnx.NodeProto] = field(init=False)
    consumers: dict[str, list[onnx.NodeProto]] = field(init=False)
    constants: dict[str, np.ndarray] = field(init=False)
    outputs: set[str] = field(init=False)
    inputs: set[str] = field(init=False)

    def __post_init__(self) -> None:
        graph = self.proto.graph
        self.constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.outputs = {o.name for o in graph.output}
        self.nodes = topological_order(graph)
        self.by_name = {node.name: node for node in self.nodes}
        self.producer = {}
        self.consumers = {}
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        for name, value in self.constants.items():
            self.shapes.setdefault(name, tuple(value.shape))

    def const(self, name: str) -> np.ndarray | None:
        """The constant value of tensor `name`, or None if it is computed at run time."""
        return self.constants.get(name) if name else None

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The concrete shape of tensor `name` under the analysis input shapes, if known."""
        return self.shapes.get(name)


def topological_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes in an order where every node comes after the producers of its inputs."""
    available = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        remaining = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            missing = sorted({i for n in remaining for i in n.input if i not in available})[:3]
            raise CompressorError(f"graph is not a DAG or has dangling inputs (e.g. {', '.join(missing)})")
        pending = remaining
    return ordered

"""The tracing state the rule table works on: channel maps of tensors, parameter slices, MAC terms and rewrites.

`Analysis` creates one `Tracer`, runs every node's rule on it in topological order, and keeps what it recorded.
A rewrite is a closure a rule registers for surgery (`Rewrite`): it gets the node under surgery, the `keep`
function (units → bool mask of the kept ones) and a `RewriteContext` that reads and replaces initializers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import onnx

from compressor.engine.cost import node_macs
from compressor.engine.graph import GraphView
from compressor.engine.units import UnitTable


class KeepFn(Protocol):
    """Which of `units` survive the plan (a bool mask of the same length)."""

    def __call__(self, units: np.ndarray) -> np.ndarray: ...


class RewriteContext(Protocol):
    """What a rewrite may do to the model under surgery (compressor.engine.surgery.SurgeryContext)."""

    def value(self, name: str) -> np.ndarray:
        """Current value of initializer `name`."""

    def replace(self, name: str, value: np.ndarray) -> None:
        """Replace the value of initializer `name`."""

    def set_input_constant(self, node: onnx.NodeProto, slot: int, value: np.ndarray) -> None:
        """Point input `slot` of `node` at a new initializer holding `value`."""


class Rewrite(Protocol):
    """An attribute or shape-constant rewrite registered by a rule, applied by surgery to the node's copy."""

    def __call__(self, node: onnx.NodeProto, keep: KeepFn, surgery: RewriteContext) -> None: ...


@dataclass
class ChannelMap:
    """The channel axis of a tensor, the unit of each position along it, and which positions are exactly zero."""

    axis: int
    units: np.ndarray
    zero: np.ndarray


@dataclass
class ParamSlice:
    """Axis `axis` of initializer `init` has positions belonging to `units`.

    role: 'out' (a layer's output filters), 'in' (a mixing layer's input channels, read from activation `tensor`),
    'chan' (per-channel parameters such as BN statistics or per-channel constants).
    """

    init: str
    axis: int
    units: np.ndarray
    role: str
    node: str
    tensor: str | None = None


@dataclass
class MacTerm:
    """A MAC-bearing node: its MACs scale with the kept fraction of its input and output units."""

    node: str
    macs: int
    in_units: np.ndarray | None
    out_units: np.ndarray | None

    def scaled(self, kept: Callable[[np.ndarray], float | np.ndarray]) -> float | np.ndarray:
        """MACs once pruned: macs · Π over the input and output units of kept(units) / len(units), where kept
        counts the units that stay (a number, or an array over candidate widths)."""
        value = float(self.macs)
        for units in (self.in_units, self.out_units):
            if units is not None and len(units):
                value = value * kept(units) / len(units)
        return value



class Tracer:
    """The state rules work on while the graph is traced in topological order."""

    def __init__(self, view: GraphView, opset: int):
        self.view = view
        self.opset = opset
        self.table = UnitTable()
        self.cmaps: dict[str, ChannelMap] = {}
        self.params: list[ParamSlice] = []
        self.rewrites: list[tuple[str, Rewrite]] = []
        self.mac_terms: list[MacTerm] = []
        self.consumed_params: dict[str, set[str]] = {}

    def cmap(self, name: str) -> ChannelMap | None:
        """The channel map of tensor `name`, or None when its channels are fixed or unknown."""
        return self.cmaps.get(name) if name else None

    def rank(self, name: str) -> int | None:
        """Rank of tensor `name`, if known."""
        shape = self.view.shape(name)
        return None if shape is None else len(shape)

    def set(self, name: str, axis: int, units: np.ndarray, zero: np.ndarray | None) -> None:
        """Give tensor `name` a channel map (zero=None: no position is known to be exactly zero)."""
        units = np.asarray(units, dtype=np.int64)
        zero = np.zeros(len(units), dtype=bool) if zero is None else np.asarray(zero, dtype=bool)
        shape = self.view.shape(name)
        if shape is None or axis >= len(shape) or shape[axis] != len(units):
            self.block(units, f"tensor '{name}' has an unexpected shape")
            return
        self.cmaps[name] = ChannelMap(axis, units, zero)

    def new_units(self, count: int, node: onnx.NodeProto, blocked: str | None = None) -> np.ndarray:
        """Fresh units born at `node`."""
        return self.table.new(count, node.name, blocked)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Couple unit a[i] with b[i]."""
        self.table.union(a, b)

    def block(self, units: np.ndarray, reason: str) -> None:
        """Make units unprunable."""
        self.table.block(units, reason)

    def block_inputs(self, node: onnx.NodeProto, reason: str) -> None:
        """Block the channels of every tracked input of `node`."""
        for name in node.input:
            cmap = self.cmap(name)
            if cmap is not None:
                self.block(cmap.units, f"{node.op_type} '{node.name}': {reason}")

    def param(self, init: str, axis: int, units: np.ndarray, role: str, node: onnx.NodeProto, tensor: str | None = None) -> None:
        """Register that initializer `init` is sliced along `axis` with `units`."""
        self.params.append(ParamSlice(init, axis, np.asarray(units, dtype=np.int64), role, node.name, tensor))
        self.consumed_params.setdefault(init, set()).add(node.name)

    def rewrite(self, node: onnx.NodeProto, fn: Rewrite) -> None:
        """Register an attribute/shape-constant rewrite `fn(node, keep, surgery)` for `node`."""
        self.rewrites.append((node.name, fn))

    def macs(self, node: onnx.NodeProto, in_units: np.ndarray | None, out_units: np.ndarray | None) -> None:
        """Register a MAC term for `node`."""
        self.mac_terms.append(MacTerm(node.name, node_macs(node, self.view), in_units, out_units))

"""Channel-dependency analysis: trace channel units through the graph, form groups, find residual blocks.

`analyze(model)` returns an `Analysis`: the prunable groups (sets of channel units that belong together, e.g. all
convs feeding one residual stream), the removable residual blocks, and everything surgery and cost estimation need.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import onnx

from compressor.engine.blocks import Block, find_blocks
from compressor.engine.cost import is_param
from compressor.errors import CompressorError
from compressor.engine.graph import GraphView, ensure_node_names
from compressor.engine.loading import load_model, model_opset, refuse_quantized, resolve_input_shapes
from compressor.engine.rules import RULES
from compressor.engine.shapes import infer_shapes
from compressor.engine.tracer import ParamSlice, Tracer
from compressor.engine.units import DisjointSets


@dataclass
class Group:
    """Channel units that share producers: pruning picks a subset of them to remove."""

    index: int
    name: str
    units: np.ndarray
    prunable: np.ndarray
    producers: list[str]
    blocked_reason: str | None = None

    @property
    def size(self) -> int:
        """Number of channel units in the group."""
        return len(self.units)


class Analysis:
    """Groups, blocks and the bookkeeping that maps a plan to costs and to surgery."""

    def __init__(self, proto: onnx.ModelProto, input_shapes: dict[str, list[int]]):
        self.proto = proto
        self.input_shapes = input_shapes
        self.view = GraphView(proto, infer_shapes(proto, input_shapes))
        tracer = Tracer(self.view, model_opset(proto))
        self._trace(tracer)
        self.unit_roots = tracer.table.roots()
        self.cmaps = tracer.cmaps
        self.params = tracer.params
        self.mac_terms = tracer.mac_terms
        self.rewrites = tracer.rewrites
        self._remap_to_roots()
        self._check_shared_params(tracer)
        self.groups = self._build_groups(tracer)
        self.unit_group = {int(u): g.index for g in self.groups for u in g.units}
        self.unit_local = {int(u): i for g in self.groups for i, u in enumerate(g.units)}
        self.blocks: list[Block] = find_blocks(self.view, self.cmaps)
        self.macs = int(sum(t.macs for t in self.mac_terms))
        self._param_sizes = {
            name: int(v.size) for name, v in self.view.constants.items() if is_param(v) and name in self._used_inits()
        }
        self.params_total = sum(self._param_sizes.values())
        self._live_inits_cache: dict[frozenset[str], set[str]] = {}

    # --- tracing -------------------------------------------------------------------------------------------------
    def _trace(self, t: Tracer) -> None:
        for node in self.view.nodes:
            rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if rule is None:
                t.block_inputs(node, "no channel rule for this op")
                continue
            rule(t, node)
        for name in self.view.outputs:
            cmap = t.cmap(name)
            if cmap is not None:
                t.block(cmap.units, f"channels of graph output '{name}'")
        for name, consumers in t.consumed_params.items():
            for node in self.view.consumers.get(name, []):
                if node.name not in consumers:
                    for p in t.params:
                        if p.init == name:
                            t.block(p.units, f"initializer '{name}' is also read by '{node.name}'")

    def _check_shared_params(self, t: Tracer) -> None:
        seen: dict[tuple[str, int], np.ndarray] = {}
        for p in self.params:
            key = (p.init, p.axis)
            if key in seen and not np.array_equal(seen[key], p.units):
                if len(seen[key]) == len(p.units):
                    t.table.union(seen[key], p.units)
                else:
                    t.table.block(np.concatenate([seen[key], p.units]), f"initializer '{p.init}' shared inconsistently")
            seen.setdefault(key, p.units)
        roots = t.table.roots()
        if not np.array_equal(roots, self.unit_roots):
            self.unit_roots = roots
            self._remap_to_roots()

    def _remap_to_roots(self) -> None:
        """Replace every unit id held by channel maps, parameter slices and MAC terms with its root."""
        roots = self.unit_roots
        for cmap in self.cmaps.values():
            cmap.units = roots[cmap.units]
        for p in self.params:
            p.units = roots[p.units]
        for term in self.mac_terms:
            term.in_units = None if term.in_units is None else roots[term.in_units]
            term.out_units = None if term.out_units is None else roots[term.out_units]

    def _build_groups(self, t: Tracer) -> list[Group]:
        roots = self.unit_roots
        table = t.table
        # Units born at the same node belong together; merged units merge their birth nodes' groups.
        births = sorted(set(table.birth), key=table.birth.index)
        birth_index = {b: i for i, b in enumerate(births)}
        birth_sets = DisjointSets(len(births))
        find = birth_sets.find
        first_birth_of_root: dict[int, int] = {}
        for unit, root in enumerate(roots.tolist()):
            b = birth_index[table.birth[unit]]
            if root in first_birth_of_root:
                birth_sets.merge(first_birth_of_root[root], b)
            else:
                first_birth_of_root[root] = b
        members: dict[int, list[int]] = {}
        for root in sorted(first_birth_of_root):
            members.setdefault(find(first_birth_of_root[root]), []).append(root)
        producers: dict[int, list[str]] = {}
        for p in self.params:
            if p.role == "out" and len(p.units):
                comp = find(birth_index[table.birth[int(p.units[0])]])
                if p.node not in producers.setdefault(comp, []):
                    producers[comp].append(p.node)
        groups = []
        for comp in sorted(members):
            units = np.array(members[comp], dtype=np.int64)
            blocked = np.array([table.is_blocked(int(u)) for u in units])
            reason = next((table.blocked[table.find(int(u))] for u in units if table.is_blocked(int(u))), None)
            names = producers.get(comp) or [births[comp]]
            groups.append(Group(len(groups), names[0], units, ~blocked, producers.get(comp, []), reason))
        return groups

    def _used_inits(self) -> set[str]:
        return {name for node in self.view.nodes for name in node.input if name in self.view.constants}

    # --- plan evaluation -------------------------------------------------------------------------------------------
    def removed_mask(self, plan) -> np.ndarray:
        """Boolean array over unit ids: True where the plan removes the unit."""
        removed = np.zeros(len(self.unit_roots), dtype=bool)
        for g, local in plan.removed.items():
            if len(local):
                removed[self.groups[g].units[np.asarray(local, dtype=np.int64)]] = True
        return removed

    def dropped_nodes(self, plan) -> set[str]:
        """Names of the nodes removed with the plan's dropped blocks."""
        return {n for b in plan.dropped_blocks for n in self.blocks[b].nodes}

    def cost(self, plan) -> tuple[int, int]:
        """(MACs, params) of the model after applying `plan`."""
        removed = self.removed_mask(plan)
        dropped = self.dropped_nodes(plan)
        kept = lambda units: np.count_nonzero(~removed[units])  # noqa: E731 - units that survive the plan
        macs = sum(term.scaled(kept) for term in self.mac_terms if term.node not in dropped and term.macs)
        live_inits = self._live_inits(frozenset(dropped))
        fractions: dict[str, float] = {}
        seen: set[tuple[str, int]] = set()
        for p in self.params:
            if (p.init, p.axis) in seen or p.node in dropped or not len(p.units):
                continue
            seen.add((p.init, p.axis))
            fractions[p.init] = fractions.get(p.init, 1.0) * np.count_nonzero(~removed[p.units]) / len(p.units)
        params = sum(size * fractions.get(name, 1.0) for name, size in self._param_sizes.items() if name in live_inits)
        return int(round(macs)), int(round(params))

    def _live_inits(self, dropped: frozenset[str]) -> set[str]:
        """Names read by nodes outside `dropped` (cached: the rate bisection asks for the same set many times)."""
        if dropped not in self._live_inits_cache:
            self._live_inits_cache[dropped] = {n for node in self.view.nodes if node.name not in dropped for n in node.input}
        return self._live_inits_cache[dropped]

    def pruned_parameters(self, plan) -> dict[str, dict[int, np.ndarray]]:
        """Initializer name → axis → indices the plan removes (dropped blocks: every axis of their weights)."""
        removed = self.removed_mask(plan)
        result: dict[str, dict[int, np.ndarray]] = {}
        for p in self.params:
            idx = np.nonzero(removed[p.units])[0]
            if len(idx):
                result.setdefault(p.init, {})[p.axis] = idx
        for name in self.dropped_nodes(plan):
            for inp in self.view.by_name[name].input:
                value = self.view.const(inp)
                if value is not None and is_param(value):
                    result[inp] = {axis: np.arange(value.shape[axis]) for axis in range(value.ndim)}
        return result

    def group_filters(self, index: int) -> np.ndarray:
        """Per unit of group `index`: the flattened weights of all its producing layers, concatenated."""
        size = self.groups[index].size
        pieces = []
        for p, local in self.group_slices(index, roles=("out",)):
            weight = np.moveaxis(self.view.constants[p.init], p.axis, 0).astype(np.float64)
            rows = weight.reshape(weight.shape[0], -1)
            valid = local >= 0
            repeats = int(np.bincount(local[valid]).max())
            if repeats == 1:
                block = np.zeros((size, rows.shape[1]))
                block[local[valid]] = rows[valid]
            else:
                block = np.zeros((size, rows.shape[1] * repeats))
                fill = np.zeros(size, dtype=np.int64)
                for row, i in zip(rows[valid], local[valid].tolist()):
                    block[i, fill[i]: fill[i] + rows.shape[1]] = row
                    fill[i] += rows.shape[1]
            pieces.append(block)
        return np.concatenate(pieces, axis=1) if pieces else np.zeros((size, 0))

    def group_slices(self, index: int, roles: tuple[str, ...] = ("out", "in")) -> list[tuple[ParamSlice, np.ndarray]]:
        """Per parameter slice touching group `index`: (slice, local unit index per position or -1)."""
        group = self.groups[index]
        local = np.full(len(self.unit_roots), -1, dtype=np.int64)
        local[group.units] = np.arange(group.size)
        return [(p, local[p.units]) for p in self.params if p.role in roles and (local[p.units] >= 0).any()]

    def excluded_groups(self, patterns: tuple[str, ...] | list[str]) -> set[int]:
        """Groups with a producer (or a producer's weight) whose name matches one of the patterns."""
        if not patterns:
            return set()
        weights = {p.node: p.init for p in self.params if p.role == "out"}
        out = set()
        for g in self.groups:
            names = [n for prod in g.producers for n in (prod, weights.get(prod, ""))] + [g.name]
            if any(_matches(name, pat) for name in names for pat in patterns):
                out.add(g.index)
        return out

    def excluded_blocks(self, patterns: tuple[str, ...] | list[str]) -> set[int]:
        """Blocks containing a node whose name matches one of the patterns."""
        return {b.index for b in self.blocks if any(_matches(n, p) for n in b.nodes for p in patterns)}

    def tensor_units(self) -> list[np.ndarray]:
        """Unit arrays of every traced tensor (each must keep at least one channel)."""
        return [c.units for c in self.cmaps.values()]


def _matches(name: str, pattern: str) -> bool:
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def analyze(model, input_shapes: dict[str, list[int]] | None = None) -> Analysis:
    """Load `model` (path or ModelProto) and analyze its channel dependencies and residual blocks."""
    proto = load_model(model)
    refuse_quantized(proto)
    ensure_node_names(proto)
    shapes = resolve_input_shapes(proto, input_shapes)
    try:
        return Analysis(proto, shapes)
    except CompressorError:
        raise
    except (ValueError, IndexError, KeyError) as exc:
        raise CompressorError(f"unsupported graph: {exc}") from exc


__all__ = ["Analysis", "Group", "analyze"]

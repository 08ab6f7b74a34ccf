"""Measured sensitivity: how far the model's outputs move on calibration images when one group is thinned or one
residual block is dropped.

A probe copy of the model takes the weights of every layer reading a probed group's channels as graph inputs, and a
group's probe runs only the nodes downstream of its layers, from the reference run's tensors at that cut: thinning
group g to k removed units feeds those layers' weights with the removed channels zeroed (the verification reference's
semantics) or, when the reconstruction step will run, refitted by least squares on the remaining channels (what
reconstruction will leave). Dropping a block runs the original with that branch bypassed. The damage is the outputs'
squared error relative to their variance, summed over the float outputs, on a fixed subset of the calibration images
(`calib_probe_images`, default 128).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from compressor.calibration.importance import Consumer, linear_to_weight, refit_linear
from compressor.engine.plan import Plan
from compressor.runtime.sessions import cpu_session
from compressor.engine.surgery import zeroed_reference

PROBE_RATES = (0.3, 0.6, 0.9)


@dataclass
class Sensitivity:
    """Damage per group at measured removed counts (0 removed → 0 damage) and per droppable block."""

    counts: dict[int, np.ndarray] = field(default_factory=dict)
    damage: dict[int, np.ndarray] = field(default_factory=dict)
    blocks: dict[int, float] = field(default_factory=dict)

    def group_damage(self, g: int, removed) -> np.ndarray:
        """Damage of group g with `removed` units gone, interpolated linearly between measured counts."""
        if g not in self.counts:
            return np.zeros(np.shape(removed))
        return np.interp(removed, np.concatenate([[0], self.counts[g]]), np.concatenate([[0.0], self.damage[g]]))


def output_damage(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """Σ over float outputs of ‖y − y_ref‖² / ‖y_ref − mean(y_ref)‖² (scale-free, 0 when unchanged)."""
    total = 0.0
    for ref, out in zip(reference, outputs):
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        ref64, out64 = ref.astype(np.float64), np.asarray(out, dtype=np.float64)
        spread = float(((ref64 - ref64.mean()) ** 2).sum())
        err = float(((out64 - ref64) ** 2).sum())
        if not np.isfinite(err):
            return float("inf")
        total += err / spread if spread > 0 else (0.0 if err == 0 else float("inf"))
    return total


class Probe:
    """The model with chosen weight initializers turned into inputs, run on fixed feeds.

    With `parts` (key → the weight names one probe changes), a probe of a part runs only the nodes downstream of the
    layers reading those weights, from the tensors at that cut, cached by the reference run: the other nodes compute
    exactly what they computed for the reference."""

    def __init__(self, proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], weight_names: set[str],
                 parts: dict[int, set[str]] | None = None):
        probe = onnx.ModelProto()
        probe.CopyFrom(proto)
        graph = probe.graph
        self.weights: dict[str, np.ndarray] = {}
        kept = []
        for init in graph.initializer:
            if init.name in weight_names:
                value = numpy_helper.to_array(init)
                self.weights[init.name] = value
                graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, value.shape))
            else:
                kept.append(init)
        del graph.initializer[:]
        graph.initializer.extend(kept)
        self.feeds = feeds
        self.proto = probe
        self.outputs = [o.name for o in graph.output]
        nested = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node
                     for a in n.attribute)
        self.cuts = {} if nested else {key: downstream_cut(graph, names) for key, names in (parts or {}).items()}
        sources = {i.name for i in graph.input} | {t.name for t in graph.initializer}
        tapped = sorted(set().union(set(), *(c[1] for c in self.cuts.values())) - sources - set(self.outputs))
        graph.output.extend(onnx.ValueInfoProto(name=name) for name in tapped)
        self.session = cpu_session(probe)
        runs = [self.session.run(None, {**feed, **self.weights}) for feed in feeds]
        n = len(self.outputs)
        self.reference = [np.concatenate([r[i] for r in runs]) for i in range(n)]
        self.cached = [{**feed, **dict(zip(tapped, r[n:]))} for feed, r in zip(feeds, runs)]
        del graph.output[n:]
        self._suffixes: dict[int, tuple] = {}

    def run(self, replaced: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs over all feeds, concatenated per output, with `replaced` weights in place."""
        weights = {**self.weights, **{k: v.astype(self.weights[k].dtype) for k, v in replaced.items()}}
        runs = [self.session.run(self.outputs, {**feed, **weights}) for feed in self.feeds]
        return [np.concatenate([r[i] for r in runs]) for i in range(len(runs[0]))]

    def damage(self, replaced: dict[str, np.ndarray], part: int | None = None) -> float:
        """output_damage of the model with `replaced` weights against the unmodified model; with `part` (a key of
        `parts`), only the nodes downstream of that part's weights run."""
        if part is None or part not in self.cuts:
            return output_damage(self.reference, self.run(replaced))
        session, reads, indices = self._suffix(part)
        weights = {**self.weights, **{k: v.astype(self.weights[k].dtype) for k, v in replaced.items()}}
        runs = []
        for cached in self.cached:
            values = {**cached, **weights}
            runs.append(session.run(None, {name: values[name] for name in reads}))
        outputs = [np.concatenate([r[j] for r in runs]) for j in range(len(indices))]
        return output_damage([self.reference[i] for i in indices], outputs)

    def _suffix(self, part: int) -> tuple:
        if part not in self._suffixes:
            nodes, reads = self.cuts[part]
            graph = self.proto.graph
            produced = {o for n in nodes for o in n.output if o}
            indices = [i for i, name in enumerate(self.outputs) if name in produced]
            declared = {i.name: i for i in graph.input}
            sample = self.cached[0]
            inputs = [declared[name] if name in declared else onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(sample[name].dtype), ["batch", *sample[name].shape[1:]])
                for name in sorted(reads)]
            used = {name for n in nodes for name in n.input}
            suffix = onnx.helper.make_graph(nodes, "suffix", inputs, [graph.output[i] for i in indices],
                                            [t for t in graph.initializer if t.name in used])
            model = onnx.helper.make_model(suffix, opset_imports=self.proto.opset_import,
                                           ir_version=self.proto.ir_version, functions=self.proto.functions)
            self._suffixes[part] = (cpu_session(model), sorted(reads), indices)
        return self._suffixes[part]


def downstream_cut(graph: onnx.GraphProto, names: set[str]) -> tuple[list, set[str]]:
    """The nodes that depend on tensors `names` (graph order) and the tensors they read that none of them produce
    (initializers excluded)."""
    reached = set(names)
    nodes = []
    for node in graph.node:
        if any(x in reached for x in node.input):
            nodes.append(node)
            reached.update(o for o in node.output if o)
    constants = {t.name for t in graph.initializer}
    produced = {o for n in nodes for o in n.output if o}
    reads = {x for n in nodes for x in n.input if x and x not in produced and x not in constants}
    return nodes, reads


def block_damage(analysis, block: int, feeds: list[dict[str, np.ndarray]], reference: list[np.ndarray]) -> float:
    """output_damage of the model with residual block `block` bypassed."""
    session = cpu_session(zeroed_reference(analysis, Plan(dropped_blocks={block})))
    runs = [session.run(None, feed) for feed in feeds]
    return output_damage(reference, [np.concatenate([r[i] for r in runs]) for i in range(len(runs[0]))])


def zeroed_slices(analysis, group: int, removed_local: np.ndarray) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Per initializer read by a mixing layer: (axis, positions) holding the removed units of `group`."""
    units = analysis.groups[group].units[removed_local]
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for p in analysis.params:
        if p.role == "in":
            hit = np.nonzero(np.isin(p.units, units))[0]
            if len(hit):
                out.setdefault(p.init, []).append((p.axis, hit))
    return out


def zeroed_weights(analysis, weights: dict[str, np.ndarray], group: int, removed: np.ndarray) -> dict[str, np.ndarray]:
    """Copies of the initializers that `group`'s `removed` units touch, with those slices zeroed."""
    replaced = {}
    for init, slices in zeroed_slices(analysis, group, removed).items():
        value = weights[init].copy()
        for axis, hit in slices:
            index = [slice(None)] * value.ndim
            index[axis] = hit
            value[tuple(index)] = 0
        replaced[init] = value
    return replaced


def measure(analysis, groups: list[int], order: dict[int, np.ndarray], consumers: dict[int, list[Consumer]],
            counts: dict[int, list[int]], blocks: list[int], feeds: list[dict[str, np.ndarray]], refit: bool,
            progress: Callable[[str], None] | None = None) -> Sensitivity:
    """Damage of each group at each of its `counts` (removing the first units of `order[g]`) and of each block."""
    parts = {g: {p.init for p in _in_slices(analysis, g)} | {c.weight for c in consumers.get(g, [])} for g in groups}
    probe = Probe(analysis.proto, feeds, set().union(set(), *parts.values()), parts)
    result = Sensitivity()
    for step, g in enumerate(groups, start=1):
        if progress:
            progress(f"sensitivity: group {step}/{len(groups)}")
        damages = []
        for k in counts[g]:
            removed = np.sort(order[g][:k])
            replaced = zeroed_weights(analysis, probe.weights, g, removed)
            if refit:
                units = analysis.groups[g].units[removed]
                for c in consumers.get(g, []):
                    replaced[c.weight] = linear_to_weight(c, refit_linear(c, units), probe.weights[c.weight].shape)
            damages.append(probe.damage(replaced, g))
        result.counts[g] = np.asarray(counts[g], dtype=np.float64)
        result.damage[g] = np.maximum.accumulate(np.asarray(damages, dtype=np.float64))
    for step, b in enumerate(blocks, start=1):
        if progress:
            progress(f"sensitivity: block {step}/{len(blocks)}")
        result.blocks[b] = block_damage(analysis, b, feeds, probe.reference)
    return result


def _in_slices(analysis, group: int):
    return [p for p, _ in analysis.group_slices(group, roles=("in",))]


def probe_counts(analysis, group: int, options, rates=PROBE_RATES) -> list[int]:
    """Removed-unit counts to measure for `group`: the probe rates of its prunable units, within the floor."""
    g = analysis.groups[group]
    n_prunable = int(g.prunable.sum())
    most = max(0, min(n_prunable, g.size - max(options.min_channels, 1)))
    counts = sorted({min(most, max(1, int(round(r * n_prunable)))) for r in rates})
    return [k for k in counts if k > 0]

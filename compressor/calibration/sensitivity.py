"""Measured sensitivity: how far the model's outputs move on calibration images when one group is thinned or one
residual block is dropped.

A probe copy of the model takes the weights of every layer reading a probed group's channels as graph inputs, so one
ONNX Runtime session serves every measurement: thinning group g to k removed units feeds those layers' weights with
the removed channels zeroed (the verification reference's semantics) or, when the reconstruction step will run,
refitted by least squares on the remaining channels (what reconstruction will leave). Dropping a block runs the
original with that branch bypassed. The damage is the outputs' squared error relative to their variance, summed over
the float outputs, on a fixed subset of the calibration images (`calib_probe_images`, default 128).
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
    """The model with chosen weight initializers turned into inputs, run on fixed feeds."""

    def __init__(self, proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], weight_names: set[str]):
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
        self.session = cpu_session(probe)
        self.reference = self.run({})

    def run(self, replaced: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs over all feeds, concatenated per output, with `replaced` weights in place."""
        weights = {**self.weights, **{k: v.astype(self.weights[k].dtype) for k, v in replaced.items()}}
        runs = [self.session.run(None, {**feed, **weights}) for feed in self.feeds]
        return [np.concatenate([r[i] for r in runs]) for i in range(len(runs[0]))]

    def damage(self, replaced: dict[str, np.ndarray]) -> float:
        """output_damage of the model with `replaced` weights against the unmodified model."""
        return output_damage(self.reference, self.run(replaced))


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


def measure(analysis, groups: list[int], order: dict[int, np.ndarray], consumers: dict[int, list[Consumer]],
            counts: dict[int, list[int]], blocks: list[int], feeds: list[dict[str, np.ndarray]], refit: bool,
            progress: Callable[[str], None] | None = None) -> Sensitivity:
    """Damage of each group at each of its `counts` (removing the first units of `order[g]`) and of each block."""
    names = {p.init for g in groups for p in _in_slices(analysis, g)}
    probe = Probe(analysis.proto, feeds, names)
    result = Sensitivity()
    for step, g in enumerate(groups, start=1):
        if progress:
            progress(f"sensitivity: group {step}/{len(groups)}")
        damages = []
        for k in counts[g]:
            removed = np.sort(order[g][:k])
            replaced = {}
            for init, slices in zeroed_slices(analysis, g, removed).items():
                value = probe.weights[init].copy()
                for axis, hit in slices:
                    index = [slice(None)] * value.ndim
                    index[axis] = hit
                    value[tuple(index)] = 0
                replaced[init] = value
            if refit:
                units = analysis.groups[g].units[removed]
                for c in consumers.get(g, []):
                    replaced[c.weight] = linear_to_weight(c, refit_linear(c, units), probe.weights[c.weight].shape)
            damages.append(probe.damage(replaced))
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

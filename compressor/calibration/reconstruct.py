"""Reconstruction: after pruning, refit every linear layer that consumes pruned channels so that its outputs match
the original model's on calibration data (ridge least squares on the kept input channels).

Layers are refitted level by level in topological order: a level holds layers none of which feeds another, and each
level's inputs come from the pruned model with all earlier refits in place (errors do not compound), its targets
from the original model. Each level runs both models only from the activations cached at the previous cut
(compressor.calibration.segments) over the calibration set, one batch in memory, gathering sampled im2col rows into
per-layer Gram matrices (row_budget rows, float64); compressor.calibration.ridge solves them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from compressor.calibration.data import CalibrationSet
from compressor.calibration.layers import LinearLayer, features, initializer_value, linear_layer, sample_positions, targets
from compressor.calibration.ridge import GramStats, fit
from compressor.calibration.refit import write_layer
from compressor.calibration.residual import SkipTarget, compensated_target, find_skip
from compressor.calibration.segments import SegmentedRunner
from compressor.runtime.sessions import built_model, cpu_session

Progress = Callable[[str], None]
MAX_ROWS = 65536
MIN_ROWS = 32768
GRAM_WORK = 2 ** 34  # rows · D² multiply-adds per layer before the row budget shrinks (never below 2·D rows)
CACHE_BUDGET = 2 ** 30  # bytes of cut activations (both models): wider models refit on fewer samples
MIN_SAMPLES = 64
EXACT = 1e-4  # a layer whose output already matches the original this closely is left alone
CHECK_TOLERANCE = 1e-3  # the regression form must reproduce the layer's own output this closely
CHECK_FOLD_EVERY = 5


@dataclass
class LayerRefit:
    """What reconstruction did to one layer: the relative output errors (vs the original) before and after."""

    layer: LinearLayer
    level: int
    kept_outputs: np.ndarray
    original_outputs: int
    rows: int = 0
    error_before: float | None = None
    error_after: float | None = None
    alpha: float | None = None
    refit: bool = False
    reason: str = ""
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    target: str = "output"

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {"node": self.layer.node, "op": self.layer.op, "level": self.level, "rows": int(self.rows),
                "error_before": _round(self.error_before), "error_after": _round(self.error_after if self.refit
                                                                                 else self.error_before),
                "alpha": self.alpha, "refit": self.refit, "target": self.target, "reason": self.reason}


@dataclass
class Reconstruction:
    """The refitted model and the per-layer record."""

    model: onnx.ModelProto
    layers: list[LayerRefit] = field(default_factory=list)
    samples: int = 0

    @property
    def refits(self) -> list[LayerRefit]:
        """The layers whose weights changed."""
        return [r for r in self.layers if r.refit]


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6g}")


def row_budget(features_per_group: int) -> int:
    """Sampled rows per layer: 32 per feature, at least MIN_ROWS and at most MAX_ROWS, fewer (down to 2 per
    feature) where rows · D² would pass GRAM_WORK."""
    d = max(features_per_group, 1)
    rows = min(MAX_ROWS, max(MIN_ROWS, 32 * d))
    return int(max(2 * d, min(rows, GRAM_WORK // (d * d))))


def reconstruction_samples(analysis, count: int) -> int:
    """How many calibration samples the refit uses: all of them unless the cached cut activations would pass
    CACHE_BUDGET (estimated as four of the model's largest activations per sample: two models, a skip and a branch)."""
    sizes = [int(np.prod(shape[1:], dtype=np.int64)) for name, shape in analysis.view.shapes.items()
             if name not in analysis.view.constants and len(shape) > 1]
    per_sample = 4 * 4 * max(sizes, default=1)
    return int(min(count, max(MIN_SAMPLES, CACHE_BUDGET // max(per_sample, 1))))


def candidate_layers(analysis, plan, pruned: onnx.ModelProto) -> list[tuple[LinearLayer, np.ndarray, str]]:
    """(layer, kept output mask in original coordinates, original output name) for every linear layer of the pruned
    model that consumes removed channels or reads the skip input of a dropped block, in topological order.

    (Refitting every layer downstream of a change as well was measured worse on CIFAR ResNet-56: 78.8% / 66.0% top-1
    at 30% / 50% fewer MACs against 79.0% / 68.1%.)"""
    removed = analysis.removed_mask(plan)
    chosen = {p.node for p in analysis.params if p.role == "in" and removed[p.units].any()}
    chosen |= rewired_nodes(analysis, pruned)
    consumers: dict[str, int] = {}
    for node in pruned.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    found = []
    for node in pruned.graph.node:
        layer = linear_layer(pruned, node)
        original = analysis.view.by_name.get(node.name)
        if layer is None or original is None:
            continue
        if node.name not in chosen:
            continue
        if consumers.get(layer.weight, 0) > 1 or (layer.bias and consumers.get(layer.bias, 0) > 1):
            continue
        out_map = analysis.cmaps.get(original.output[0])
        keep = np.ones(0, dtype=bool) if out_map is None else ~removed[out_map.units]
        found.append((layer, keep, original.output[0]))
    return found


def rewired_nodes(analysis, pruned: onnx.ModelProto) -> set[str]:
    """Nodes of the pruned model whose activation inputs differ from the original's (dropped blocks bypassed)."""
    constants = set(analysis.view.constants) | {t.name for t in pruned.graph.initializer}
    rewired = set()
    for node in pruned.graph.node:
        original = analysis.view.by_name.get(node.name)
        activations = [i for i in node.input if i and i not in constants]
        if original is not None and activations != [i for i in original.input if i and i not in constants]:
            rewired.add(node.name)
    return rewired


def levels(pruned: onnx.ModelProto, layers: list[LinearLayer], depth: dict[str, int] | None = None) -> list[int]:
    """Level of each layer: one more than the deepest refitted layer upstream of it. `depth` (if given) receives,
    per tensor, the deepest level its value depends on."""
    index = {layer.node: i for i, layer in enumerate(layers)}
    depth = {} if depth is None else depth
    result = [0] * len(layers)
    for node in pruned.graph.node:
        deepest = max((depth.get(name, 0) for name in node.input), default=0)
        if node.name in index:
            deepest += 1
            result[index[node.name]] = deepest
        for out in node.output:
            depth[out] = deepest
    return result


def reconstruct(analysis, plan, pruned: onnx.ModelProto, calib: CalibrationSet, progress: Progress | None = None,
                batch_size: int | None = None, seed: int = 0, compensate: bool = True) -> Reconstruction:
    """Refit the layers of `pruned` that consume removed channels; returns a new model and the per-layer record.

    compensate: a layer feeding a residual Add through per-channel affine ops is fitted to the Add's original output
    (compressor.calibration.residual), so it also absorbs the error earlier pruning left on the skip."""
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    samples = reconstruction_samples(analysis, calib.count)
    if samples < calib.count:
        calib = calib.subset(np.sort(np.random.default_rng(seed).choice(calib.count, samples, replace=False)))
    found = candidate_layers(analysis, plan, model)
    depth: dict[str, int] = {}
    level_of = levels(model, [f[0] for f in found], depth)
    records = [LayerRefit(layer, level, np.nonzero(keep)[0], len(keep)) for (layer, keep, _), level in zip(found, level_of)]
    targets_of = {f[0].node: (f[1], f[2]) for f in found}
    skips = {}
    for record in records if compensate else []:
        skip = find_skip(model, analysis.proto, record.layer)
        if skip is not None and depth.get(skip.skip, 0) < record.level:
            skips[record.layer.node] = skip
    top = max(level_of, default=0)
    by_level = [[r for r in records if r.level == level] for level in range(1, top + 1)]
    pruned_schedule = [[name for r in batch for name in [r.layer.data] + _skip_names(skips, r, 0)]
                       for batch in by_level]
    original_schedule = [[name for r in batch for name in [targets_of[r.layer.node][1]] + _skip_names(skips, r, 1)]
                         for batch in by_level]
    with blas_threads(), SegmentedRunner(calib, pruned_schedule, batch_size) as pruned_runner, \
            SegmentedRunner(calib, original_schedule, batch_size) as original_runner:
        for k, batch in enumerate(by_level):
            if progress:
                progress(f"reconstruct: level {k + 1}/{top} ({', '.join(r.layer.node for r in batch[:3])}"
                         f"{', ...' if len(batch) > 3 else ''})")
            states = [_LayerState(r, model, targets_of[r.layer.node][0], calib.count, skips.get(r.layer.node))
                      for r in batch]
            rng = np.random.default_rng(seed + k)
            first = 0
            original_batches = original_runner.run_pass(k, analysis.proto)
            for pruned_values in pruned_runner.run_pass(k, model):
                original_values = next(original_batches)
                for state in states:
                    layer = state.record.layer
                    x = pruned_values[layer.data]
                    skip = state.skip
                    skip_values = (original_values[skip.skip_original], pruned_values[skip.skip]) if skip else None
                    state.gather(x, original_values[targets_of[layer.node][1]], first, rng, skip_values)
                first += len(x)
            for _ in original_batches:  # runs the pass to its end, where the next pass's cache is completed
                pass
            for state in states:
                state.finish()
                if state.record.refit:
                    write_layer(model, state.record.layer, state.record.weight, state.record.bias)
    return Reconstruction(model, records, calib.count)


def _skip_names(skips: dict, record: LayerRefit, which: int) -> list[str]:
    skip = skips.get(record.layer.node)
    return [] if skip is None else [skip.skip if which == 0 else skip.skip_original]


class _LayerState:
    """Streaming state of one layer while its level is being gathered."""

    def __init__(self, record: LayerRefit, model: onnx.ModelProto, keep: np.ndarray, calib_count: int,
                 skip: SkipTarget | None = None):
        layer = record.layer
        self.record, self.keep, self.skip = record, keep, skip
        record.target = "residual sum" if skip is not None else "output"
        self.node = next(n for n in model.graph.node if n.name == layer.node)
        self.weight = initializer_value(model, layer.weight)
        self.bias = initializer_value(model, layer.bias) if layer.bias else None
        self.m0 = layer.weight_matrix(self.weight.astype(np.float64))
        outputs = self.m0.shape[0] * self.m0.shape[2]
        self.b0 = layer.bias_vector(self.bias, outputs)
        self.w0 = np.concatenate([self.m0, self.b0.reshape(self.m0.shape[0], 1, -1)], axis=1)
        self.stats = GramStats(self.m0.shape[0], self.m0.shape[1], self.m0.shape[2])
        self.budget = row_budget(self.m0.shape[1])
        self.calib_count = calib_count
        self.checked = False
        self.failed = ""
        if not len(keep):
            record.original_outputs = outputs
            record.kept_outputs = np.arange(outputs)

    def gather(self, x: np.ndarray, y_original: np.ndarray, first_sample: int, rng: np.random.Generator,
               skip_values: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Add the sampled rows of one batch: features from the pruned model's input x, targets from the original
        (plus the skip's error when the layer feeds a residual Add: `skip_values` = original, pruned skip)."""
        if self.failed:
            return
        layer = self.record.layer
        axis = 1 if layer.op in ("Conv", "ConvTranspose", "Gemm") else y_original.ndim - 1
        if len(self.keep):
            if y_original.shape[axis] != len(self.keep):
                self.failed = f"the original output has {y_original.shape[axis]} channels, expected {len(self.keep)}"
                return
            y_original = np.compress(self.keep, y_original, axis=axis)
        if skip_values is not None:
            y_original = compensated_target(y_original, skip_values[0], skip_values[1], self.keep, self.skip.scale, axis)
            if y_original is None:
                self.failed = "the residual skip does not match the layer's output"
                return
        groups = self.m0.shape[0]
        per_position = int(np.prod(y_original.shape[2:] if layer.op.startswith("Conv") else y_original.shape[1:-1]))
        per_sample = max(1, -(-self.budget // max(self.calib_count, 1)))
        rows = sample_positions(y_original.shape, layer, min(per_sample, max(per_position, 1)), rng)
        feats = features(layer, self.node, x, tuple(self.weight.shape), y_original.shape, rows)
        if feats.shape[1:] != self.m0.shape[:2]:
            self.failed = f"features {feats.shape[1:]} do not match the weight {self.m0.shape[:2]}"
            return
        if not self.checked:
            self.checked = True
            if not self._reproduces(x, feats, rows, y_original.shape):
                return
        fold = ((first_sample + rows[:, 0]) % CHECK_FOLD_EVERY == CHECK_FOLD_EVERY - 1).astype(np.int64)
        self.stats.add(feats, targets(layer, y_original, rows, groups), fold)

    def _reproduces(self, x: np.ndarray, feats: np.ndarray, rows: np.ndarray, out_shape: tuple[int, ...]) -> bool:
        """Whether features @ W0 + b0 equals the layer's own output (ONNX Runtime) on this batch."""
        own = run_layer(self.node, x, self.weight, self.bias)
        if own.shape != tuple(out_shape):
            self.failed = f"the pruned layer's output {list(own.shape)} differs from the original's kept {list(out_shape)}"
            return False
        groups = self.m0.shape[0]
        expected = targets(self.record.layer, own, rows, groups)
        predicted = np.matmul(feats.transpose(1, 0, 2), self.m0).transpose(1, 0, 2) + self.b0.reshape(1, groups, -1)
        mismatch = np.linalg.norm(predicted - expected) / max(np.linalg.norm(expected), 1e-30)
        if mismatch > CHECK_TOLERANCE:
            self.failed = f"the regression form does not reproduce the layer (relative error {mismatch:.2g})"
            return False
        return True

    def finish(self) -> None:
        """Fit the layer; keep the refit only where it lowers the held-out output error."""
        record = self.record
        record.rows = int(self.stats.rows.sum())
        if self.failed:
            record.reason = self.failed
            return
        result = fit(self.stats, self.w0)
        record.error_before, record.alpha = result.error_before, result.alpha
        record.error_after = result.error_after
        if result.error_before <= EXACT:
            record.reason = "already matches the original"
            return
        if result.error_after >= result.error_before:
            record.reason = "the refit does not lower the held-out error"
            return
        matrix = result.matrix
        record.weight = record.layer.weight_from_matrix(matrix[:, :-1, :], self.weight)
        record.bias = matrix[:, -1, :].reshape(-1)
        record.refit = True


def blas_threads():
    """Limit BLAS to COMPRESSOR_BLAS_THREADS threads (default 1) while Gram matrices are built and solved.

    OpenBLAS threads spin while waiting; on a shared or busy machine several of them make the Gram products tens of
    times slower than one thread (measured 4x-70x on the 2-core development machine under load).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(int(os.environ.get("COMPRESSOR_BLAS_THREADS", "1")), "blas")


def run_layer(node: onnx.NodeProto, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The output of `node` alone on input `x` with the given weight and bias (ONNX Runtime)."""
    inits = [numpy_helper.from_array(weight, node.input[1])]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, node.input[2]))
    elem = onnx.helper.np_dtype_to_tensor_dtype(x.dtype)
    graph = onnx.helper.make_graph([node], "layer", [onnx.helper.make_tensor_value_info(node.input[0], elem, list(x.shape))],
                                   [onnx.ValueInfoProto(name=node.output[0])], inits)
    return cpu_session(built_model(graph)).run(None, {node.input[0]: x})[0]

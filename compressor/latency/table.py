"""The latency model of a network on one target: measured per-item tables plus a calibrated residual.

Model. The latency of the network under a plan is predicted as

    predicted_ms = scale · Σ_{items alive} T_item(kept widths of its groups) + offset_ms

where an item (micro.py) is one layer with its fused followers or one residual join, and is alive unless a block
containing it is dropped. T_item is measured in isolation as a micro-model, with the same ONNX Runtime session
options as `compress bench` (compressor.runtime.sessions.SessionRunner), at several kept widths, minus the cost of an empty
session run, and interpolated in between (grid.py).

Calibration. Isolated layers do not add up exactly to the network (kernel launches overlap on GPUs, fused and
unfused ops, layout reorders and output copies that a micro-model has and the network mostly does not, the ops no
item holds, the session's own overhead). So the network itself is measured: whole, with every droppable residual
branch removed (its skeleton: the direction block dropping moves in), and at the alignment probe's five widths (the
direction narrowing moves in; those of its widths that are multiples of the chosen alignment). `scale`,
`offset_ms` and a width exponent γ are fitted to those measurements by
least squares on relative errors (the whole network weighted FULL_WEIGHT times): γ raises each item's relative
cost, T_full · (T/T_full)^γ, because a micro-model's input/output work shrinks linearly with the widths while its
compute shrinks with their product, so isolated layers understate (typically on CPUs) or overstate the relative
savings of narrowing. The worst relative error of the fit is reported. With a single measurement (no blocks, no
probe) the residual is additive.

Widths. Candidate widths are multiples of an alignment chosen per target from measurements of the whole network
(`choose_alignment`): the smallest of 8, 16, 32 whose widths are not slower than the straight line through
64-aligned widths; 64 if none is (isolated layers cannot tell: a misaligned width mostly costs its neighbours).
The items' tables are refined level by level (grid.py: full width; sweeps at half and the narrowest width;
quarters; the cross grid), the most expensive items first, until the level limit or the profile budget is reached;
an item uses its finest complete level. With the closed loop on, the table's part of the profile budget leaves a
reserve for measuring whole candidates, estimated from the network's own timing (loop_budget.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, TYPE_CHECKING

import numpy as np
import onnx

from compressor.errors import CompressorError
from compressor.latency import paired
from compressor.latency.cache import LatencyCache, context_of
from compressor.latency.grid import GRID_LEVEL, MAX_GRID_DIMS, ItemTable, fit_fixed_share, level_points, level_widths
from compressor.latency.loop_budget import candidate_seconds, loop_measurements, loop_reserve_s, table_budget_s
from compressor.latency.micro import CostItem, find_items, micro_model, removed_units, structure_key
from compressor.latency.request import LatencyRequest, ProfileSettings
from compressor.latency.timed import timing_model

if TYPE_CHECKING:
    from compressor.engine.analysis import Analysis

ALIGNMENTS = (8, 16, 32)
PROBE_SPAN = 64
ALIGNMENT_TOLERANCE = 0.03
GAMMA_RANGE = (0.5, 3.0)
SCALE_RANGE = (0.1, 10.0)
FULL_WEIGHT = 4.0  # the whole network anchors --ratio budgets: fit it more tightly than the other points
Progress = Callable[[str], None]


# ------------------------------------------------------------------------------------------------------ measuring
def measure_ms(model: onnx.ModelProto, target, batch: int, settings: ProfileSettings, calibration: bool = False,
               input_shapes: dict | None = None) -> float:
    """Median latency (ms) of `model` on `target` through compressor.runtime.sessions.SessionRunner (the session options of
    `compress bench`): a warm-up, then as many timed runs as fill the settings' time per point, within limits."""
    from compressor.runtime.inputs import input_specs
    from compressor.runtime.sessions import SessionRunner

    runner = SessionRunner(model.SerializeToString(), target, input_specs(model, batch, input_shapes))
    first = runner.time_runs(max(settings.warmup, 1))
    return float(np.median(runner.time_runs(timed_runs(settings, float(np.median(first)), calibration))))


def timed_runs(settings: ProfileSettings, per_run_ms: float, calibration: bool = False) -> int:
    """How many timed runs measure_ms takes after its warm-up, for a model of `per_run_ms`: enough to fill the
    settings' time per point (per network for `calibration`), within their limits."""
    per_run = max(per_run_ms, 1e-3)
    if calibration:
        return int(np.clip(math.ceil(settings.calibration_seconds * 1000 / per_run), settings.calibration_runs,
                           10 * settings.calibration_runs))
    return int(np.clip(math.ceil(settings.seconds_per_point * 1000 / per_run), settings.min_runs, settings.max_runs))


def overhead_model() -> onnx.ModelProto:
    """The cheapest session run: one Relu on one number per sample. Its latency is subtracted from every
    micro-model's. The batch axis is dynamic, so it runs at the request's batch like everything else."""
    from onnx import TensorProto, helper

    from compressor.runtime.sessions import built_model

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "overhead",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])])
    return built_model(graph)


# ------------------------------------------------------------------------------------------------------ the model
@dataclass
class LatencyModel:
    """Everything the allocation and the report need: the item tables, alignment, calibration and statistics."""

    tables: list[ItemTable]
    alignment: int
    scale: float
    offset_ms: float
    full_ms: float
    skeleton_ms: float | None
    calibration: str
    info: dict = field(default_factory=dict)
    gamma: float = 1.0
    fit_error: float | None = None

    def items_ms(self, widths: dict[int, int], dropped: set[int] = frozenset()) -> float:
        """Σ net item milliseconds of the alive items at these widths."""
        return sum(t.at(widths) for t in self.tables if not (t.item.blocks & set(dropped)))

    def predict_ms(self, widths: dict[int, int], dropped: set[int] = frozenset()) -> float:
        """Predicted latency of the network with these kept widths and dropped blocks."""
        return self.scale * self.items_ms(widths, dropped) + self.offset_ms


# ------------------------------------------------------------------------------------------------------ profiling
class Profiler:
    """Times micro-models through the cache, keeps the time spent and the profile budget."""

    def __init__(self, analysis: Analysis, request: LatencyRequest, cache: LatencyCache, progress: Progress | None = None):
        self.analysis = analysis
        self.request = request
        self.cache = cache
        self.progress = progress
        self.started = time.perf_counter()
        self.measured = 0
        self.micro_measured = 0
        self.measure_seconds = 0.0
        self.skipped = 0
        self.failed: list[str] = []
        self.network_key = ""
        self.probe_points: list[tuple[int, dict[int, int], float]] = []  # (offset, widths, ms): the network probe
        self._overhead: float | None = None
        self.loop_reserve: dict | None = None
        budget, settings = request.profile_budget_s, request.settings
        # the closed loop (planner.py) measures whole candidates after the table: it keeps a share of the budget,
        # and a reserve for a few of them once the network's timing shows what one costs (keep_loop_reserve)
        self.budget_s = table_budget_s(budget, settings.table_share if settings.loop_iterations else 1.0, 0.0)

    def elapsed(self) -> float:
        """Seconds since profiling started."""
        return time.perf_counter() - self.started

    def affordable(self) -> bool:
        """Whether one more measurement fits in the profile budget (estimated from the ones so far)."""
        budget = self.budget_s
        if budget is None:
            return True
        estimate = self.measure_seconds / self.micro_measured if self.micro_measured else 0.0
        return self.elapsed() + estimate <= budget

    def raw_ms(self, model: onnx.ModelProto, key: str, what: str, calibration: bool = False,
               input_shapes: dict | None = None) -> float:
        """Cached or freshly measured milliseconds of `model` (whose cache key is `key`)."""
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        start = time.perf_counter()
        model = timing_model(model, self.request, whole=calibration, input_shapes=input_shapes)
        converted = time.perf_counter()
        ms = measure_ms(model, self.request.target, self.request.batch, self.request.settings, calibration, input_shapes)
        self.measured += 1
        extra = None
        if calibration:  # what converting and opening a network took: the loop reserve's estimate (keep_loop_reserve)
            settings = self.request.settings
            runs_s = (max(settings.warmup, 1) + timed_runs(settings, ms, calibration=True)) * ms / 1000
            extra = {"conversion_s": round(converted - start, 4),
                     "session_s": round(max(time.perf_counter() - converted - runs_s, 0.0), 4)}
        else:  # the per-measurement estimate of the budget check is about micro-models
            self.measure_seconds += time.perf_counter() - start
            self.micro_measured += 1
        self.cache.put(key, ms, what, extra)
        if self.progress and self.measured % 10 == 0:
            self.progress(f"profiling latency ({self.measured} measured)")
        return ms

    def keep_loop_reserve(self, network_key: str, full_ms: float) -> None:
        """Lower the table's budget so that the closed loop keeps time for a few whole-candidate measurements
        (loop_budget.py), each estimated from the whole network's timing: its conversion and session seconds, kept
        with its cache entry (an entry from before they were kept counts its runs only)."""
        settings, budget = self.request.settings, self.request.profile_budget_s
        if budget is None or not settings.loop_iterations:
            return
        entry = self.cache.entries.get(network_key, {})
        conversion_s, session_s = float(entry.get("conversion_s", 0.0)), float(entry.get("session_s", 0.0))
        measurements = loop_measurements(settings.loop_iterations, settings.aligned_baseline)
        one = candidate_seconds(conversion_s, session_s, full_ms, paired.runs_per_side(self.request))
        reserve = loop_reserve_s(one, conversion_s, measurements)
        self.budget_s = table_budget_s(budget, settings.table_share, reserve)
        self.loop_reserve = {"measurements": measurements, "candidate_s": round(one, 3), "reserve_s": round(reserve, 3),
                             "table_budget_s": round(self.budget_s, 3), "network_conversion_s": conversion_s,
                             "network_session_s": session_s, "estimated_from": (
                                 "the network's timing" if "session_s" in entry else "the network's runs only")}

    def overhead_ms(self) -> float:
        """Latency of an empty session run on this target."""
        if self._overhead is None:
            model = overhead_model()
            self._overhead = self.raw_ms(model, "overhead:" + structure_key(model), "empty session run")
        return self._overhead

    def item_ms(self, item: CostItem, widths: dict[int, int], optional: bool = False) -> float | None:
        """Net milliseconds of one copy of `item` at `widths`; None when optional and over the profile budget or
        when ONNX Runtime cannot run it (counted in `failed`)."""
        copies, pooled = self.request.copies, not self.request.target.on_gpu
        shapes_only = micro_model(self.analysis, item, widths, self.request.batch, weights=False, pooled=pooled)
        key = f"{structure_key(shapes_only)}:x{copies}"
        if optional and key not in self.cache.entries and not self.affordable():
            self.skipped += 1
            return None
        model = None if key in self.cache.entries else micro_model(self.analysis, item, widths, self.request.batch,
                                                                   copies, pooled=pooled)
        try:
            raw = self.raw_ms(model, key, f"{item.kind} {item.name} {sorted(widths.items())}")
        except CompressorError as exc:
            if optional:
                self.failed.append(f"{item.name} at {sorted(widths.items())}: {exc}")
                return None
            raise CompressorError(f"cannot time layer '{item.name}' on {self.request.target}: {exc}") from exc
        return max(raw - self.overhead_ms(), 0.0) / copies


def build_latency_model(analysis: Analysis, floors: dict[int, int], droppable_blocks: set[int], request: LatencyRequest,
                        round_to: int = 1, progress: Progress | None = None) -> LatencyModel:
    """Measure (or read from the cache) everything the latency model needs and calibrate it on the network.

    floors: the variable groups (whose widths the allocation may change), each with its narrowest allowed width.
    """
    variable_groups = set(floors)
    cache = LatencyCache(context_of(request.target, request.batch, request.timed_precision), request.cache_dir)
    profiler = Profiler(analysis, request, cache, progress)
    try:
        full_ms, skeleton_ms = _measure_network(profiler, droppable_blocks)
        items = find_items(analysis, variable_groups)
        sizes = {g: analysis.groups[g].size for g in variable_groups}
        full = {i.index: profiler.item_ms(i, {}) for i in items}
        if round_to > 1:
            alignment, probe = round_to, {"source": f"--round-to {round_to}"}
        else:
            alignment, probe = choose_alignment(profiler, sizes)
        tables = _refine(profiler, items, sizes, floors, full, alignment, request.settings.max_level)
    finally:
        cache.flush()
    points = [CalibrationPoint({}, frozenset(), full_ms, FULL_WEIGHT)]
    if skeleton_ms is not None:
        points.append(CalibrationPoint({}, frozenset(droppable_blocks), skeleton_ms))
    # probe widths off the chosen alignment carry a misalignment cost no allocation will pay: not fitted
    points += [CalibrationPoint(widths, frozenset(), ms) for offset, widths, ms in profiler.probe_points
               if offset % alignment == 0]
    model = calibrate(tables, points, full_ms, skeleton_ms)
    model.alignment = alignment
    levels = [t.level for t in tables if t.item.dims]
    model.info = {
        "items": len(tables), "layers": sum(t.item.kind == "layer" for t in tables),
        "joins": sum(t.item.kind == "join" for t in tables), "alignment": alignment, "alignment_probe": probe,
        "grid_levels": {str(lv): levels.count(lv) for lv in sorted(set(levels))},
        "fixed_share_prior": tables[0].fixed_share if tables else None,
        "measured": profiler.measured, "cache_hits": cache.hits, "skipped_over_budget": profiler.skipped,
        "failed": profiler.failed[:5],
        "profile_seconds": round(profiler.elapsed(), 2), "profile_budget_s": request.profile_budget_s,
        "loop_reserve": profiler.loop_reserve,
        "overhead_ms": profiler.overhead_ms(), "copies_per_micro_model": request.copies, "cache": str(cache.path),
        "context": cache.context,
    }
    return model


def _measure_network(profiler: Profiler, droppable: set[int]) -> tuple[float, float | None]:
    """Measured latency of the whole network and of its skeleton (every droppable block removed)."""
    from compressor.engine.plan import Plan
    from compressor.engine.surgery import apply_plan

    analysis = profiler.analysis
    shapes = analysis.input_shapes
    base = profiler.network_key = f"network:{structure_key(analysis.proto)}:{sorted((k, list(v)) for k, v in shapes.items())}"
    full_ms = profiler.raw_ms(analysis.proto, base, "whole network", calibration=True, input_shapes=shapes)
    profiler.keep_loop_reserve(base, full_ms)
    if not droppable:
        return full_ms, None
    key = f"{base}:drop{sorted(droppable)}"
    if key in profiler.cache.entries:
        return full_ms, profiler.cache.get(key)
    skeleton = apply_plan(analysis, Plan(dropped_blocks=set(droppable)))
    return full_ms, profiler.raw_ms(skeleton, key, "network without droppable blocks", calibration=True,
                                    input_shapes=shapes)


def choose_alignment(profiler: Profiler, sizes: dict[int, int]) -> tuple[int, dict]:
    """The smallest alignment in ALIGNMENTS whose widths cost the network no more than the straight line between
    64-aligned widths (within ALIGNMENT_TOLERANCE of its time).

    Measured on the whole network, not on isolated layers: every group of >= 128 channels is set to a 64-aligned
    width near half its size, minus 0, 8, 16, 32 and 64 channels. Only the network shows what a misaligned width
    costs its neighbours (e.g. ONNX Runtime's blocked NCHWc layout on AVX-512 CPUs, which a width that is not a
    multiple of 16 interrupts: reorders around the layer, and slower kernels), and the same offset applied to all
    groups keeps the MACs on the line.
    """
    from compressor.engine.plan import Plan
    from compressor.engine.surgery import apply_plan

    wide = {g: int(np.clip(round(size / 2 / PROBE_SPAN) * PROBE_SPAN, 2 * PROBE_SPAN, size // PROBE_SPAN * PROBE_SPAN))
            for g, size in sizes.items() if size >= 2 * PROBE_SPAN}
    if not wide:
        return ALIGNMENTS[0], {"source": "default: no group has 128 or more channels to probe"}
    analysis = profiler.analysis
    budget = profiler.budget_s
    offsets = (0, *ALIGNMENTS, PROBE_SPAN)
    times = []
    for offset in offsets:
        widths = {g: w - offset for g, w in wide.items()}
        key = f"{profiler.network_key}:widths:{structure_digest(sorted(widths.items()))}"
        if key not in profiler.cache.entries:
            if budget is not None and profiler.elapsed() >= budget:
                return ALIGNMENTS[0], {"source": "default: the profile budget ran out before the alignment probe"}
            removed = removed_units(analysis, widths)
            plan = Plan(removed={g: np.nonzero(removed[analysis.groups[g].units])[0] for g in widths})
            probe_model = apply_plan(analysis, plan)
        else:
            probe_model = None
        times.append(profiler.raw_ms(probe_model, key, f"network at 64-aligned widths minus {offset}", calibration=True,
                                     input_shapes=analysis.input_shapes))
    top_ms, low_ms = times[0], times[-1]
    relative, chosen = {}, PROBE_SPAN
    for o, alignment in enumerate(ALIGNMENTS, start=1):
        line = top_ms + (low_ms - top_ms) * alignment / PROBE_SPAN
        relative[str(alignment)] = round(float(times[o] / line) if line > 0 else 1.0, 4)
        if chosen == PROBE_SPAN and times[o] <= line + ALIGNMENT_TOLERANCE * top_ms:
            chosen = alignment
    profiler.probe_points = [(offset, {g: w - offset for g, w in wide.items()}, ms) for offset, ms in zip(offsets, times)]
    return chosen, {"source": "measured on the network", "groups": len(wide), "ms_by_offset": dict(zip(map(str, offsets), times)),
                    "time_vs_64_aligned_line": relative, "tolerance": ALIGNMENT_TOLERANCE}


def structure_digest(value) -> str:
    """A short stable hash of a repr-able value."""
    import hashlib

    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def _refine(profiler: Profiler, items: list[CostItem], sizes: dict[int, int], floors: dict[int, int],
            full: dict[int, float], alignment: int, max_level: int) -> list[ItemTable]:
    """Measure the items level by level (most expensive first) and keep each item's finest complete level."""
    def widths(item: CostItem, level: int) -> list[list[int]]:
        return [level_widths(sizes[g], floors[g], alignment, level) for g in item.dims]

    known = {i.index: {tuple(sizes[g] for g in i.dims): full[i.index]} for i in items}
    levels = {i.index: 0 for i in items}
    order = sorted(items, key=lambda i: -full[i.index])
    for level in range(1, max_level + 1):
        for item in order:
            if not item.dims or levels[item.index] != level - 1 or (level >= GRID_LEVEL and len(item.dims) > MAX_GRID_DIMS):
                continue
            complete = True
            for point in level_points(tuple(sizes[g] for g in item.dims), widths(item, level), level):
                if point not in known[item.index]:
                    ms = profiler.item_ms(item, dict(zip(item.dims, point)), optional=True)
                    if ms is None:
                        complete = False
                        break
                    known[item.index][point] = ms
            if complete:
                levels[item.index] = level
    tables = [ItemTable.from_points(item, widths(item, levels[item.index]), levels[item.index], known[item.index])
              for item in items]
    share = fit_fixed_share(tables)
    for t in tables:
        t.fixed_share = 1.0 if share is None else share
    return tables


@dataclass(frozen=True)
class CalibrationPoint:
    """A measurement of the network: kept widths (missing groups full), dropped blocks, milliseconds, weight."""

    widths: dict
    dropped: frozenset
    ms: float
    weight: float = 1.0


def calibrate(tables: list[ItemTable], points: list[CalibrationPoint], full_ms: float,
              skeleton_ms: float | None) -> LatencyModel:
    """Fit scale, offset and width exponent to the network measurements (see the module docstring)."""
    model = LatencyModel(tables, ALIGNMENTS[0], 1.0, full_ms - sum(t.full_ms for t in tables), full_ms, skeleton_ms,
                         "additive (one measurement)")
    if len(points) < 2:
        return model
    gammas = np.arange(GAMMA_RANGE[0], GAMMA_RANGE[1] + 1e-9, 0.05) if len(points) > 2 else np.array([1.0])
    measured = np.array([p.ms for p in points])
    weights = np.array([p.weight for p in points]) / measured**2  # relative errors
    best = None
    for gamma in gammas:
        for t in tables:
            t.gamma = float(gamma)
        sums = np.array([model.items_ms(p.widths, p.dropped) for p in points])
        design = np.stack([sums, np.ones_like(sums)], axis=1)
        lhs = design.T @ (design * weights[:, None])
        if abs(np.linalg.det(lhs)) < 1e-12 * max(1.0, float(np.abs(lhs).max()) ** 2):
            continue
        scale, offset = np.linalg.solve(lhs, design.T @ (weights * measured))
        if not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
            continue
        errors = (scale * sums + offset - measured) / measured
        score = float((weights * measured**2 * errors**2).sum())
        if best is None or score < best[0]:
            best = (score, float(gamma), float(scale), float(offset), float(np.abs(errors).max()))
    if best is None:
        for t in tables:
            t.gamma = 1.0
        return model
    _, gamma, scale, offset, worst = best
    for t in tables:
        t.gamma = gamma
    model.scale, model.offset_ms, model.gamma = scale, offset, gamma
    model.calibration = f"least squares over {len(points)} network measurements (worst error {worst:.1%})"
    model.fit_error = worst
    return model

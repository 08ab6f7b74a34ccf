"""Calibrated planning: the method's scores refined by data (importance.py), and removed units per group plus dropped
blocks chosen by measured sensitivity (sensitivity.py, allocation.py) to meet the MAC/param target.

Method options (`--method-option KEY=VALUE`), all optional:
- `calib_importance`: obs (default) | energy | act | off (the method's own scores);
- `calib_blend`: α in [0, 1], the weight of the data score against the method's (default 1);
- `calib_allocation`: sensitivity (default) | method (the method's own allocation, with the refined scores);
- `calib_probe_images`: calibration images the sensitivity is measured on (default: 128, fewer, down to 8, where
  the probe runs would exceed PROBE_MAC_BUDGET multiply-accumulates: a ResNet-50 at 224×224 gets 8).

A method option that makes the method itself data-aware (DATA_AWARE_OPTIONS: graph-rw `rw_features=calib`, whose
random walk runs on calibration feature maps) implies calib_importance=off and calib_allocation=method, so the
method's data-aware scores and its own allocation decide; given explicitly, those two keys still win (ablations).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from compressor.calibration.allocation import CostModel, allocate_by_sensitivity
from compressor.calibration.importance import DATA_SCORES, accumulate_grams, find_consumers, group_data_scores, refine
from compressor.calibration.sensitivity import Sensitivity, measure, probe_counts
from compressor.calibration.taps import declared_batch, stream_tensors
from compressor.errors import CompressorError
from compressor.latency.importance import MeasuredImportance, method_scores
from compressor.engine.plan import (Plan, allocate, baseline_value, kept_count, plan_from_counts, prunable_groups,
                             target_value)

R_MAX = 0.9
ALLOCATIONS = ("sensitivity", "method")
CALIBRATION_OPTIONS = ("calib_importance", "calib_blend", "calib_allocation", "calib_probe_images")  # -O keys read here
_CACHE: dict[tuple, tuple] = {}
_CACHE_SIZE = 8
PROBE_IMAGES = 128
MIN_PROBE_IMAGES = 8
PROBE_MAC_BUDGET = 2e12  # probe runs × images × model MACs (CIFAR ResNet-56: 1.75e12 at 128 images)
_ALIVE: list = []
DATA_AWARE_OPTIONS = {("rw_features", "calib")}  # (key, value) of method options that make a method read the data


@dataclass
class CalibratedSettings:
    """The calib_* method options."""

    importance: str = "obs"
    blend: float = 1.0
    allocation: str = "sensitivity"
    probe_images: int | None = None


def parse_settings(extra: dict | None) -> CalibratedSettings:
    """calib_* keys of PlanOptions.extra ('-' and '_' interchangeable); a bad value raises CompressorError."""
    s = CalibratedSettings()
    if data_aware_option(extra):
        s.importance, s.allocation = "off", "method"
    for raw_key, value in (extra or {}).items():
        key = str(raw_key).replace("-", "_")
        if key == "calib_importance":
            if str(value) not in DATA_SCORES + ("off",):
                raise CompressorError(f"calib_importance must be one of {', '.join(DATA_SCORES)}, off; got '{value}'")
            s.importance = str(value)
        elif key == "calib_blend":
            s.blend = _number(key, value, 0.0, 1.0)
        elif key == "calib_allocation":
            if str(value) not in ALLOCATIONS:
                raise CompressorError(f"calib_allocation must be one of {', '.join(ALLOCATIONS)}; got '{value}'")
            s.allocation = str(value)
        elif key == "calib_probe_images":
            s.probe_images = int(_number(key, value, 1, 1e9))
        elif key.startswith("calib_"):
            raise CompressorError(f"unknown calibration option '{raw_key}' (calib_importance, calib_blend, "
                                  "calib_allocation, calib_probe_images)")
    return s


def data_aware_option(extra: dict | None) -> str | None:
    """'key=value' of the method option in `extra` that makes the method read the calibration data, or None."""
    keys = {str(k).replace("-", "_"): str(v).strip().lower() for k, v in (extra or {}).items()}
    return next((f"{key}={value}" for key, value in sorted(DATA_AWARE_OPTIONS) if keys.get(key) == value), None)


def _number(key: str, value, lo: float, hi: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CompressorError(f"{key} must be a number, got '{value}'") from None
    if not lo <= number <= hi:
        raise CompressorError(f"{key} must be in [{lo:g}, {hi:g}], got {value}")
    return number


def calibrated_plan(analysis, method: str, options, calib, refit: bool = True, progress=None) -> Plan:
    """The plan of `method` with data: refined unit scores, and an allocation by measured sensitivity that meets
    options.ratio of options.target with the least predicted damage. `refit`: the reconstruction step will run
    (the sensitivity is then measured with the consumers refitted)."""
    settings = parse_settings(options.extra)
    groups = prunable_groups(analysis, options)
    droppable = sorted({b.index for b in analysis.blocks} - analysis.excluded_blocks(options.exclude))
    if not groups and not droppable:
        raise CompressorError("nothing prunable: every channel is blocked (graph outputs, unsupported ops or --exclude)")
    scores, notes = refined_scores(analysis, method, options, calib, settings, groups, progress)
    if settings.allocation == "method":
        plan = _method_allocation(analysis, method, options, scores)
        plan.notes += notes
        return plan
    sensitivity = measure_sensitivity(analysis, method, options, calib, settings, scores, groups, droppable, refit,
                                      progress)
    plan = sensitivity_plan(analysis, options, scores, sensitivity, groups, droppable)
    plan.notes += notes
    return plan


def refined_scores(analysis, method, options, calib, settings: CalibratedSettings, groups, progress=None):
    """Per group: the method's scores refined by the data score (or the method's alone for importance=off)."""
    base, note = method_scores(method, analysis, options, groups)
    notes = [note] if note else []
    if settings.importance == "off":
        aware = data_aware_option(options.extra)
        if aware:
            notes.append(f"importance: {method}'s own scores from calibration feature maps ({aware}, "
                         f"{calib.count} samples)")
        return base, notes
    key = ("data", _fingerprint(analysis, calib), settings.importance, tuple(groups))
    if key not in _CACHE:
        consumers = calibration_consumers(analysis, calib, groups, progress)
        _remember(key, {g: group_data_scores(analysis.groups[g].units, analysis.groups[g].prunable, consumers[g],
                                             settings.importance) for g in groups})
    data = _CACHE[key]
    scores = {g: refine(base[g], data[g], settings.blend) for g in groups}
    notes.append(f"calibrated importance: {settings.importance} data scores (blend {settings.blend:g}) "
                 f"on {calib.count} calibration samples")
    return scores, notes


def calibration_consumers(analysis, calib, groups, progress=None):
    """The supported consumers of each group with their calibration Grams (cached per model and data)."""
    key = ("consumers", _fingerprint(analysis, calib), tuple(groups))
    if key not in _CACHE:
        consumers = find_consumers(analysis, groups)
        unique = list({id(c): c for cs in consumers.values() for c in cs}.values())
        stream = lambda proto, data, names, consume, size: stream_tensors(  # noqa: E731
            proto, data, names, consume, size, progress, "calibration statistics")
        # calibration-sized batches even where the model fixes its batch (TapSession runs those in chunks): the
        # Grams sample MAX_POSITIONS_PER_BATCH positions per batch, per image only where the batch is one image
        accumulate_grams(analysis.proto, unique, calib, stream, batch_size=max(1, int(calib.options.batch or 32)))
        _remember(key, consumers)
    return _CACHE[key]


def measure_sensitivity(analysis, method, options, calib, settings, scores, groups, droppable, refit, progress=None
                        ) -> Sensitivity:
    """Damage per group at the probe rates (removing the lowest-scored units first) and per droppable block."""
    ranking = hashlib.sha1(b"".join(np.asarray(scores[g], dtype=np.float64).tobytes() for g in groups)).hexdigest()
    key = ("sensitivity", _fingerprint(analysis, calib), ranking, settings.probe_images, options.min_channels,
           tuple(groups), tuple(droppable), refit)
    if key not in _CACHE:
        order = {g: removal_order(analysis, g, scores[g]) for g in groups}
        consumers = calibration_consumers(analysis, calib, groups, progress) if refit else {}
        counts = {g: probe_counts(analysis, g, options) for g in groups}
        images = settings.probe_images or probe_images(analysis, sum(map(len, counts.values())) + len(droppable))
        probe = calib.subset(np.arange(min(images, calib.count)))
        feeds = list(probe.batches(_batch(analysis, calib)))
        _remember(key, measure(analysis, groups, order, consumers, counts, droppable, feeds, refit, progress))
    return _CACHE[key]


def probe_images(analysis, runs: int) -> int:
    """Images per probe run: PROBE_IMAGES, fewer (not under MIN_PROBE_IMAGES) where `runs` runs of the model would
    exceed PROBE_MAC_BUDGET."""
    affordable = int(PROBE_MAC_BUDGET / max(runs * analysis.macs, 1))
    return int(np.clip(affordable, MIN_PROBE_IMAGES, PROBE_IMAGES))


def sensitivity_plan(analysis, options, scores, sensitivity: Sensitivity, groups, droppable) -> Plan:
    """The allocation by measured sensitivity as a Plan (with group_info: removed count and predicted damage)."""
    order = {g: removal_order(analysis, g, scores[g]) for g in groups}
    cost = CostModel(analysis, order, options.target, droppable)
    candidates = {g: allowed_counts(analysis, g, options) for g in groups}
    internal = {b: internal_groups(analysis, b, groups) for b in droppable}
    base = baseline_value(analysis, options.target)
    allocation = allocate_by_sensitivity(cost, sensitivity, candidates, internal, base * (1.0 - options.ratio))
    keep = {g: analysis.groups[g].size - k for g, k in allocation.removed.items() if k > 0}
    plan = plan_from_counts(analysis, scores, keep)
    plan.dropped_blocks = set(allocation.dropped)
    for g in groups:
        plan.group_info.setdefault(g, {}).update(
            {"calib_removed": int(allocation.removed.get(g, 0)),
             "calib_damage": float(sensitivity.group_damage(g, allocation.removed.get(g, 0)))})
    reached = 1.0 - target_value(analysis, plan, options.target) / base
    plan.notes.append(f"calibrated allocation: {len(keep)} groups thinned, {len(plan.dropped_blocks)} blocks dropped, "
                      f"predicted output damage {allocation.damage:.4g}")
    if reached < options.ratio - 0.02:
        plan.notes.append(f"reached {reached:.3f} of the requested {options.ratio:.3f} {options.target} reduction")
    return plan


def removal_order(analysis, g: int, scores: np.ndarray) -> np.ndarray:
    """Prunable units of group g, lowest score first (ties by index), as plan_from_counts removes them."""
    candidates = np.nonzero(analysis.groups[g].prunable)[0]
    return candidates[np.lexsort((candidates, np.asarray(scores)[candidates]))]


def allowed_counts(analysis, g: int, options) -> np.ndarray:
    """Removed counts the allocation may choose for group g: 0, and those whose kept width respects R_MAX,
    --min-channels and --round-to."""
    group = analysis.groups[g]
    n_prunable = int(group.prunable.sum())
    counts = {0}
    for k in range(1, n_prunable + 1):
        keep = kept_count(group.size, k / group.size, options.min_channels, options.round_to)
        keep = max(keep, group.size - n_prunable, group.size - int(np.floor(R_MAX * n_prunable + 1e-9)))
        counts.add(group.size - keep)
    return np.array(sorted(counts), dtype=np.int64)


def internal_groups(analysis, block: int, groups) -> tuple[int, ...]:
    """Groups all of whose producers lie inside the block's branch."""
    nodes = set(analysis.blocks[block].nodes)
    return tuple(g for g in groups if analysis.groups[g].producers and
                 all(p in nodes for p in analysis.groups[g].producers))


def _method_allocation(analysis, method, options, scores) -> Plan:
    """The method's own allocation with the refined scores: graph-rw's layer rates, otherwise one uniform rate."""
    if method == "graph-rw":
        from compressor.methods import graph_rw

        opts = graph_rw.parse_graph_rw_options(options.extra)
        if opts.layer_rates == "rmt":
            notes: list[str] = []
            _, lis = graph_rw.score_groups(analysis, sorted(scores), opts, options.calibration, notes)
            weights = graph_rw.layer_weights_from_lis(lis)
            plan = allocate(analysis, scores, options, layer_weights=weights, r_min=opts.r_min, r_max=opts.r_max)
            plan.notes += notes
            return plan
    return allocate(analysis, scores, options)


def _batch(analysis, calib) -> int:
    return declared_batch(analysis.proto) or max(1, int(getattr(calib.options, "batch", 64) or 64))


def _fingerprint(analysis, calib) -> tuple:
    """The model's digest and the calibration samples' identity (source, chosen indices, preprocessing)."""
    if not any(c is calib for c in _ALIVE):
        _ALIVE.append(calib)
    digest = hashlib.sha1(analysis.proto.SerializeToString(deterministic=True)).hexdigest()
    source = tuple(id(a) for a in calib.arrays.values()) if calib.arrays is not None else tuple(map(str, calib.images))
    picked = hashlib.sha1(np.asarray(calib.indices).tobytes()).hexdigest()
    return digest, hash(source), picked, repr(calib.options)


def _remember(key, value) -> None:
    """Cache `value`; keys hold id(calib), so the set is kept alive beside its entries (ids are never reused)."""
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
        _ALIVE[:] = _ALIVE[-_CACHE_SIZE:]
    _CACHE[key] = value


def measured_importance(analysis, method: str, options, calib, refit: bool = True, progress=None):
    """For `--target latency` with calibration data: refined unit scores and the measured damage of every group
    width and every droppable block, as the latency allocation's values (compressor/latency/importance.py)."""
    settings = parse_settings(options.extra)
    groups = prunable_groups(analysis, options)
    droppable = sorted({b.index for b in analysis.blocks} - analysis.excluded_blocks(options.exclude))
    scores, _ = refined_scores(analysis, method, options, calib, settings, groups, progress)
    sensitivity = measure_sensitivity(analysis, method, options, calib, settings, scores, groups, droppable, refit,
                                      progress)
    return MeasuredImportance(scores, sensitivity.group_damage, dict(sensitivity.blocks))

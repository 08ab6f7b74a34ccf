"""Plans (which channel units and blocks to remove) and the allocators that turn scores into plans."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from compressor.errors import CompressorError

if TYPE_CHECKING:
    from compressor.engine.analysis import Analysis

TARGETS = ("macs", "params")
MAX_RATE = 0.9  # at most 90% of a group's prunable channels go (every allocator, MAC- or latency-targeted)


@dataclass
class PlanOptions:
    """What the user asked for: fraction `ratio` of `target` removed, and the constraints on how."""

    ratio: float | None = 0.5
    target: str = "macs"
    round_to: int = 1
    min_channels: int = 1
    exclude: tuple[str, ...] = ()
    seed: int = 0
    extra: dict = field(default_factory=dict)
    # calibration samples (a CalibrationSet) for methods that read data (graph-rw rw_features=calib); compress sets
    # it when it is given calibration data
    calibration: object = field(default=None, repr=False, compare=False)

    def validate(self, needs_ratio: bool = True) -> None:
        """Raise CompressorError for out-of-range options."""
        if needs_ratio and (self.ratio is None or not 0.0 < self.ratio < 1.0):
            raise CompressorError(f"--ratio must be in (0, 1), got {self.ratio}")
        if self.target not in TARGETS:
            raise CompressorError(f"--target must be one of {', '.join(TARGETS)}, got '{self.target}'")
        if self.round_to < 1:
            raise CompressorError(f"--round-to must be at least 1, got {self.round_to}")
        if self.min_channels < 1:
            raise CompressorError(f"--min-channels must be at least 1, got {self.min_channels}")


@dataclass
class Plan:
    """Removed unit indices per group (local to the group) and dropped block indices."""

    removed: dict[int, np.ndarray] = field(default_factory=dict)
    dropped_blocks: set[int] = field(default_factory=set)
    group_info: dict[int, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def is_empty(self) -> bool:
        """Whether the plan removes nothing."""
        return not self.dropped_blocks and not any(len(v) for v in self.removed.values())


def target_value(analysis: Analysis, plan: Plan, target: str) -> int:
    """The plan's remaining MACs or params."""
    macs, params = analysis.cost(plan)
    return macs if target == "macs" else params


def baseline_value(analysis: Analysis, target: str) -> int:
    """The unpruned model's MACs or params."""
    return analysis.macs if target == "macs" else analysis.params_total


def kept_count(n: int, rate: float, min_channels: int, round_to: int) -> int:
    """How many of n units to keep at pruning rate `rate`, with the minimum and the rounding applied."""
    keep = n - int(np.floor(rate * n + 1e-9))
    if round_to > 1 and n >= round_to:
        keep = int(min(n, np.ceil(keep / round_to) * round_to))
    return int(min(n, max(keep, min(min_channels, n), 1)))


def prunable_groups(analysis: Analysis, options: PlanOptions) -> list[int]:
    """Indices of groups with at least one prunable unit that no --exclude pattern protects."""
    excluded = analysis.excluded_groups(options.exclude)
    return [g.index for g in analysis.groups if g.prunable.any() and g.index not in excluded]


def plan_from_counts(analysis: Analysis, scores: dict[int, np.ndarray], keep: dict[int, int]) -> Plan:
    """Remove, in each group, the lowest-scored prunable units until `keep[g]` units remain."""
    plan = Plan()
    for g, count in keep.items():
        group = analysis.groups[g]
        n_remove = group.size - count
        if n_remove <= 0:
            continue
        candidates = np.nonzero(group.prunable)[0]
        order = candidates[np.lexsort((candidates, scores[g][candidates]))]
        plan.removed[g] = np.sort(order[: min(n_remove, len(order))])
    return ensure_nonempty_tensors(analysis, plan, scores)


def ensure_nonempty_tensors(analysis: Analysis, plan: Plan, scores: dict[int, np.ndarray]) -> Plan:
    """Give back the best-scored unit of any tensor the plan would empty completely."""
    def score(unit: int) -> float:
        group = analysis.unit_group[unit]
        return float(scores[group][analysis.unit_local[unit]]) if group in scores else 0.0

    removed = analysis.removed_mask(plan)
    for units in analysis.tensor_units():
        if len(units) and removed[units].all():
            best = max(units.tolist(), key=score)
            g, i = analysis.unit_group[best], analysis.unit_local[best]
            plan.removed[g] = plan.removed[g][plan.removed[g] != i]
            removed[best] = False
    return plan


def layer_rates(weights: dict[int, float], strength: float, r_min: float = 0.0, r_max: float = MAX_RATE
                ) -> dict[int, float]:
    """Per-layer pruning rates r_g = clip(s · w_g, r_min, r_max) for strength s."""
    return {g: float(np.clip(strength * w, r_min, r_max)) for g, w in weights.items()}


def allocate(analysis: Analysis, scores: dict[int, np.ndarray], options: PlanOptions, layer_weights: dict[int, float] | None = None,
             r_min: float = 0.0, r_max: float = MAX_RATE) -> Plan:
    """Per-group rates r_g = clip(s·w_g, r_min, r_max), with s found by bisection to meet options.ratio.

    Within a group the lowest-scored prunable units go first. Returns the plan whose cost reduction is closest
    to the target, with a note when the model cannot reach it.
    """
    groups = [g for g in prunable_groups(analysis, options) if g in scores]
    if not groups:
        raise CompressorError("nothing prunable: every channel is blocked (graph outputs, unsupported ops or --exclude)")
    weights = {g: float((layer_weights or {}).get(g, 1.0)) for g in groups}
    base = baseline_value(analysis, options.target)
    goal = base * (1.0 - options.ratio)

    def plan_for(strength: float) -> Plan:
        keep = {}
        for g, rate in layer_rates(weights, strength, r_min, r_max).items():
            n_prunable = int(analysis.groups[g].prunable.sum())
            size = analysis.groups[g].size
            count = kept_count(size, rate * n_prunable / size, options.min_channels, options.round_to)
            keep[g] = max(count, size - n_prunable)
        return plan_from_counts(analysis, scores, keep)

    positive = [w for w in weights.values() if w > 0]
    top = max(r_max, 1e-6) / max(min(positive), 1e-6) if positive else max(r_max, 1e-6)
    lo, hi = 0.0, top
    best, best_err = None, np.inf
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        plan = plan_for(mid)
        value = target_value(analysis, plan, options.target)
        err = abs(value - goal)
        if err < best_err:
            best, best_err = plan, err
        if value > goal:
            lo = mid
        else:
            hi = mid
    floor_plan = plan_for(top)
    floor_value = target_value(analysis, floor_plan, options.target)
    if floor_value > goal and abs(floor_value - goal) <= best_err:
        best = floor_plan
    reached = 1.0 - target_value(analysis, best, options.target) / base
    if reached < options.ratio - 0.02:
        best.notes.append(
            f"reached {reached:.3f} of the requested {options.ratio:.3f} {options.target} reduction: "
            f"the prunable groups are exhausted at rate {r_max} (blocked channels, --min-channels, --exclude)"
        )
    return best


def allocate_global(analysis: Analysis, scores: dict[int, np.ndarray], options: PlanOptions, r_max: float = MAX_RATE
                    ) -> Plan:
    """Remove units in one global order of `scores` (comparable across groups) until the target is met."""
    groups = [g for g in prunable_groups(analysis, options) if g in scores]
    if not groups:
        raise CompressorError("nothing prunable: every channel is blocked (graph outputs, unsupported ops or --exclude)")
    entries = [(float(scores[g][i]), g, int(i)) for g in groups for i in np.nonzero(analysis.groups[g].prunable)[0]]
    entries.sort()
    base = baseline_value(analysis, options.target)
    goal = base * (1.0 - options.ratio)
    caps = {g: analysis.groups[g].size - kept_count(analysis.groups[g].size, r_max, options.min_channels, 1) for g in groups}

    def plan_for(count: int) -> Plan:
        taken: dict[int, list[int]] = {}
        for _, g, i in entries[:count]:
            if len(taken.setdefault(g, [])) < caps[g]:
                taken[g].append(i)
        keep = {}
        for g in groups:
            size = analysis.groups[g].size
            keep[g] = kept_count(size, len(taken.get(g, [])) / size, options.min_channels, options.round_to)
        return plan_from_counts(analysis, scores, keep)

    lo, hi = 0, len(entries)
    while lo < hi:
        mid = (lo + hi) // 2
        if target_value(analysis, plan_for(mid), options.target) > goal:
            lo = mid + 1
        else:
            hi = mid
    best = plan_for(lo)
    if lo > 0:
        prev = plan_for(lo - 1)
        if abs(target_value(analysis, prev, options.target) - goal) < abs(target_value(analysis, best, options.target) - goal):
            best = prev
    reached = 1.0 - target_value(analysis, best, options.target) / base
    if reached < options.ratio - 0.02:
        best.notes.append(f"reached {reached:.3f} of the requested {options.ratio:.3f} {options.target} reduction")
    return best

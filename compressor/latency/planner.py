"""`--target latency`: from an analysis, a method's scores and a latency budget to a Plan.

The method supplies importance (importance.py), the latency model supplies cost (table.py), the allocation
(allocate.py) chooses aligned widths per group and dropped blocks; the plan keeps, in each group, the best-scored
units, exactly as the MAC-targeted allocators do. The method option `macs_ratio` (`-O macs_ratio=0.5`) also asks
for at least that fraction of the MACs removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compressor.errors import CompressorError
from compressor.latency.allocate import BlockChoice, GroupChoice, ItemCost, allocate_latency
from compressor.latency.importance import kept_value, method_scores, unit_values
from compressor.latency.request import LatencyRequest
from compressor.latency.table import LatencyModel, build_latency_model
from compressor.plan import Plan, kept_count, plan_from_counts, prunable_groups

R_MAX = 0.9  # at most 90% of a group's channels go, as in the MAC-targeted allocators


@dataclass
class LatencyPlan:
    """The plan, the latency model it was chosen with, and the report section (`info`)."""

    plan: Plan
    model: LatencyModel
    budget_ms: float
    predicted_ms: float
    info: dict = field(default_factory=dict)


def plan_for_latency(analysis, method: str, options, request: LatencyRequest, progress=None) -> LatencyPlan:
    """Plan the compression of `analysis` so that its predicted latency on request.target meets the budget."""
    variable = set(prunable_groups(analysis, options))
    droppable = {b.index for b in analysis.blocks} - analysis.excluded_blocks(options.exclude)
    if not variable and not droppable:
        raise CompressorError("nothing prunable: every channel is blocked (graph outputs, unsupported ops or --exclude)")
    macs_ratio = _macs_ratio(options.extra)
    scores, score_note = method_scores(method, analysis, options, sorted(variable))
    floors = {g: _floor(analysis.groups[g], options.min_channels) for g in variable}
    model = build_latency_model(analysis, floors, droppable, request, options.round_to, progress)
    budget = request.latency_ms if request.latency_ms is not None else (1.0 - request.ratio) * model.full_ms
    if budget >= model.full_ms:
        raise CompressorError(f"the model already meets the latency budget on {request.target} at batch {request.batch}: "
                              f"measured {model.full_ms:.4g} ms <= {budget:.4g} ms")
    groups = _group_choices(analysis, floors, scores, model.alignment)
    candidates = {g: c.widths for g, c in groups.items()}
    items = [ItemCost(t.item.dims, t.item.blocks, t.dense([candidates[d] for d in t.item.dims]),
                      item_macs(analysis, t.item, [candidates[d] for d in t.item.dims])) for t in model.tables]
    macs_budget = None
    if macs_ratio is not None:
        other_macs = analysis.macs - sum(float(i.macs[tuple(-1 for _ in i.dims)]) for i in items)
        macs_budget = (1.0 - macs_ratio) * analysis.macs - other_macs
    blocks = {b: BlockChoice(b, _internal_groups(analysis, b, model, variable)) for b in sorted(droppable)}
    allocation = allocate_latency(groups, items, blocks, (budget - model.offset_ms) / model.scale, macs_budget)
    dead = {g for b in allocation.dropped for g in blocks[b].internal}
    keep = {g: w for g, w in allocation.widths.items() if g not in dead and w < analysis.groups[g].size}
    plan = plan_from_counts(analysis, scores, keep)
    plan.dropped_blocks = set(allocation.dropped)
    widths = {g: analysis.groups[g].size - len(plan.removed.get(g, ())) for g in variable}
    predicted = model.predict_ms(widths, plan.dropped_blocks)
    if plan.is_empty():
        raise CompressorError(f"no pruning saves latency on {request.target} at batch {request.batch} under the "
                              f"measured latency model (measured {model.full_ms:.4g} ms, budget {budget:.4g} ms)")
    info = _report_section(request, model, budget, predicted, allocation, method, score_note)
    info["macs_ratio"] = macs_ratio
    plan.notes.append(f"latency on {request.target} batch {request.batch}: measured {model.full_ms:.4g} ms, budget "
                      f"{budget:.4g} ms, predicted {predicted:.4g} ms (alignment {model.alignment}, "
                      f"{model.info['measured']} timed, {model.info['cache_hits']} from the cache)")
    if score_note:
        plan.notes.append(score_note)
    if not allocation.met:
        plan.notes.append(f"the latency budget{' or the MAC cap' if macs_ratio else ''} is out of reach under the latency "
                          f"model: every saving taken, predicted {predicted:.4g} ms for a budget of {budget:.4g} ms")
    if model.info["skipped_over_budget"]:
        plan.notes.append(f"--profile-budget reached: {model.info['skipped_over_budget']} measurements skipped, "
                          f"some layers use a coarser width grid")
    if model.info["failed"]:
        plan.notes.append(f"some layer widths could not be timed on {request.target} (e.g. {model.info['failed'][0]}); "
                          "those layers use a coarser table")
    return LatencyPlan(plan, model, budget, predicted, info)


def _macs_ratio(extra: dict) -> float | None:
    raw = extra.get("macs_ratio")
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise CompressorError(f"macs_ratio must be a fraction in (0, 1), got '{raw}'")
    return value


def item_macs(analysis, item, candidates: list) -> np.ndarray:
    """MACs of an item at every combination of candidate widths of its dims: each MAC term scales with the kept
    fraction of its input and of its output units (the engine's own cost model, Analysis.cost)."""
    shape = [len(c) for c in candidates]
    total = np.zeros(shape)
    names = set(item.nodes)
    for term in analysis.mac_terms:
        if term.node not in names or not term.macs:
            continue
        value = np.full(shape, float(term.macs))
        for units in (term.in_units, term.out_units):
            if units is None or not len(units):
                continue
            owners = np.array([analysis.unit_group.get(int(u), -1) for u in units])
            fraction = np.full(shape, float(np.isin(owners, item.dims, invert=True).sum()))
            for axis, (g, widths) in enumerate(zip(item.dims, candidates)):
                count = int((owners == g).sum())
                if count:
                    along = np.asarray(widths, dtype=np.float64) * count / analysis.groups[g].size
                    fraction = fraction + along.reshape([-1 if a == axis else 1 for a in range(len(shape))])
            value = value * fraction / len(units)
        total += value
    return total


def _floor(group, min_channels: int) -> int:
    """The narrowest width a group may keep: R_MAX, --min-channels and its blocked units."""
    return max(kept_count(group.size, R_MAX, min_channels, 1), int((~group.prunable).sum()), 1)


def _group_choices(analysis, floors: dict[int, int], scores: dict[int, np.ndarray], alignment: int
                   ) -> dict[int, GroupChoice]:
    """Candidate widths per group (multiples of the alignment from the floor up, and the full width)."""
    choices = {}
    for g in sorted(floors):
        group = analysis.groups[g]
        widths = np.array([w for w in range(alignment, group.size, alignment) if w >= floors[g]] + [group.size])
        values = kept_value(unit_values(scores[g]), group.prunable, widths)
        choices[g] = GroupChoice(g, widths, values)
    return choices


def _internal_groups(analysis, block: int, model: LatencyModel, variable: set[int]) -> tuple[int, ...]:
    """Variable groups produced inside the block's branch and read by no item outside it."""
    nodes = set(analysis.blocks[block].nodes)
    internal = []
    for g in sorted(variable):
        users = [t.item for t in model.tables if g in t.item.dims]
        producers = analysis.groups[g].producers
        if users and producers and all(block in u.blocks for u in users) and all(p in nodes for p in producers):
            internal.append(g)
    return tuple(internal)


def _report_section(request: LatencyRequest, model: LatencyModel, budget: float, predicted: float, allocation,
                    method: str, score_note: str | None) -> dict:
    return {
        **request.to_dict(),
        "budget_ms": budget,
        "measured_original_ms": model.full_ms,
        "predicted_ms": predicted,
        "predicted_speedup": model.full_ms / predicted if predicted > 0 else None,
        "budget_met_by_prediction": bool(predicted <= budget * (1 + 1e-6)),
        "importance_kept": allocation.kept_value / allocation.total_value if allocation.total_value else 1.0,
        "importance": {"method": method, "note": score_note},
        "calibration": {"kind": model.calibration, "scale": model.scale, "offset_ms": model.offset_ms,
                        "skeleton_ms": model.skeleton_ms, "width_exponent": model.gamma,
                        "worst_fit_error": model.fit_error},
        "table": model.info,
        "moves": len(allocation.moves),
    }

"""`--target latency`: from an analysis, a method's scores and a latency budget to a Plan.

The method supplies importance (importance.py), the latency model supplies cost (table.py), the allocation
(allocate.py) chooses aligned widths per group and dropped blocks; the plan keeps, in each group, the best-scored
units, exactly as the MAC-targeted allocators do. The method option `macs_ratio` (`-O macs_ratio=0.5`) also asks
for at least that fraction of the MACs removed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from compressor.errors import CompressorError
from compressor.latency import paired
from compressor.latency.result import LatencyPlan
from compressor.latency.allocate import BlockChoice, GroupChoice, ItemCost, allocate_latency
from compressor.latency.baseline import BaselineOutcome, measure_aligned_baseline, same_plan
from compressor.latency.importance import MeasuredImportance, kept_value, method_scores, unit_values
from compressor.latency.paired import PairMeasurement
from compressor.latency.request import LatencyRequest
from compressor.latency.table import LatencyModel, build_latency_model
from compressor.engine.plan import MAX_RATE, Plan, kept_count, plan_from_counts, prunable_groups

if TYPE_CHECKING:
    from compressor.engine.analysis import Analysis

LOOP_AIM = 0.97  # the closed loop aims a little under the budget (timing noise) ...
LOOP_ACCEPT = 0.92  # ... and stops at a candidate measuring between this fraction of the budget and the budget
LOOP_STEP = 0.7  # one correction moves the allocation budget by at most this factor (down) or its inverse (up)
LOOP_MARGIN = 0.1  # once the budget is bracketed, the next allocation budget stays this share off either end
MEASURE_SLACK = 0.9  # a whole measurement starts when this share of its estimated time is left of --profile-budget
LOOP_REACH_STEP = 0.85  # two slow candidates this far apart in budget judge whether the budget is in reach at all
LATENCY_OPTIONS = ("macs_ratio", "block_value")  # the --method-option keys this planner reads
BLOCK_VALUE_FACTOR = 0.5  # default importance of a dropped residual branch relative to its channels (importance.py)


@dataclass
class _Candidate:
    plan: Plan
    allocation: object
    predicted_ms: float
    internal_budget_ms: float
    corrected_fraction: float
    measured: PairMeasurement | None = None
    seconds: float = 0.0


def plan_for_latency(analysis: Analysis, method: str, options, request: LatencyRequest, progress=None,
                     measured: MeasuredImportance | None = None) -> LatencyPlan:
    """Plan the compression of `analysis` so that its latency on request.target meets the budget.

    Open loop (settings.loop_iterations == 0): the plan whose predicted latency meets the budget. Closed loop (the
    default): the budget is a fraction of the original's latency (1 − ratio, or latency_ms over the original as
    measured beside each candidate), and each candidate is built and measured against the original on the target,
    side by side (paired.measure_pair, a paired ratio). The budget handed to the allocation is corrected, damped and
    bounded (`_next_allocation_budget`), until a candidate measures within [LOOP_ACCEPT, 1] of the budget, for at
    most loop_iterations candidates and within the profile budget; `_choose` picks the result (`measured`: see
    importance.MeasuredImportance).
    """
    check_batch(analysis, request.batch)
    variable = set(prunable_groups(analysis, options))
    droppable = {b.index for b in analysis.blocks} - analysis.excluded_blocks(options.exclude)
    if not variable and not droppable:
        raise CompressorError("nothing prunable: every channel is blocked (graph outputs, unsupported ops or --exclude)")
    macs_ratio = _macs_ratio(options.extra)
    block_factor = _block_value_factor(options.extra)
    scores, score_note = method_scores(method, analysis, options, sorted(variable))
    scores = {g: measured.scores.get(g, s) for g, s in scores.items()} if measured else scores
    floors = {g: _floor(analysis.groups[g], options.min_channels) for g in variable}
    started = time.perf_counter()
    model = build_latency_model(analysis, floors, droppable, request, options.round_to, progress)
    budget = request.latency_ms if request.latency_ms is not None else (1.0 - request.ratio) * model.full_ms
    if budget >= model.full_ms:
        raise CompressorError(f"the model already meets the latency budget on {request.target} at batch {request.batch}: "
                              f"measured {model.full_ms:.4g} ms <= {budget:.4g} ms")
    groups = _group_choices(analysis, floors, scores, model.alignment, measured)
    candidates = {g: c.widths for g, c in groups.items()}
    items = [ItemCost(t.item.dims, t.item.blocks, t.dense([candidates[d] for d in t.item.dims]),
                      item_macs(analysis, t.item, [candidates[d] for d in t.item.dims])) for t in model.tables]
    macs_budget = None
    if macs_ratio is not None:
        other_macs = analysis.macs - sum(float(i.macs[tuple(-1 for _ in i.dims)]) for i in items)
        macs_budget = (1.0 - macs_ratio) * analysis.macs - other_macs
    blocks = {b: BlockChoice(b, i, measured.block_factor(b, i, block_factor) if measured else block_factor)
              for b, i in ((b, _internal_groups(analysis, b, model, variable)) for b in sorted(droppable))}

    def candidate(internal_ms: float, corrected_fraction: float | None = None) -> _Candidate:
        allocation = allocate_latency(groups, items, blocks, (internal_ms - model.offset_ms) / model.scale, macs_budget)
        dead = {g for b in allocation.dropped for g in blocks[b].internal}
        keep = {g: w for g, w in allocation.widths.items() if g not in dead and w < analysis.groups[g].size}
        plan = plan_from_counts(analysis, scores, keep)
        plan.dropped_blocks = set(allocation.dropped)
        widths = {g: analysis.groups[g].size - len(plan.removed.get(g, ())) for g in variable}
        predicted = model.predict_ms(widths, plan.dropped_blocks)
        fraction = predicted / model.full_ms if corrected_fraction is None else corrected_fraction
        return _Candidate(plan, allocation, predicted, internal_ms, fraction)

    first = candidate(budget)
    if first.plan.is_empty():
        raise CompressorError(f"no pruning saves latency on {request.target} at batch {request.batch} under the "
                              f"measured latency model (measured {model.full_ms:.4g} ms, budget {budget:.4g} ms)")
    remaining = None if request.profile_budget_s is None else request.profile_budget_s - (time.perf_counter() - started)
    tried = _closed_loop(analysis, model, candidate, first, budget, request, remaining, progress)
    chosen, choice_note = _choose(tried, budget, model.full_ms, request)
    remaining = None if request.profile_budget_s is None else request.profile_budget_s - (time.perf_counter() - started)
    baseline = _aligned_baseline(analysis, method, options, model, chosen, tried, budget, request, remaining, progress)
    if baseline is not None and baseline.wins:
        widths = {g: analysis.groups[g].size - len(baseline.plan.removed.get(g, ())) for g in variable}
        predicted = model.predict_ms(widths, baseline.plan.dropped_blocks)
        chosen = _Candidate(baseline.plan, chosen.allocation, predicted, chosen.internal_budget_ms,
                            predicted / model.full_ms, baseline.measured)
    plan, allocation, predicted = chosen.plan, chosen.allocation, chosen.predicted_ms
    info = _report_section(request, model, budget, predicted, allocation, method, score_note)
    info["macs_ratio"] = macs_ratio
    info["block_value_factor"] = block_factor
    info["closed_loop"] = _loop_report(tried, chosen, model.full_ms)
    info["aligned_baseline"] = baseline.to_dict() if baseline is not None else None
    plan.notes.append(f"latency on {request.target} batch {request.batch}: measured {model.full_ms:.4g} ms, budget "
                      f"{budget:.4g} ms, predicted {predicted:.4g} ms (alignment {model.alignment}, "
                      f"{model.info['measured']} timed, {model.info['cache_hits']} from the cache)")
    if len(tried) > 1 or tried[0].measured is not None:
        wanted = _wanted(tried, budget, model.full_ms, request)
        plan.notes.append(f"closed loop: {len(tried)} candidate(s) measured on {request.target}, chosen the one at "
                          f"{chosen.measured.fraction:.3f} of the original's latency (budget {wanted:.3f})"
                          if chosen.measured else "closed loop: no measurement")
        if choice_note:
            plan.notes.append(choice_note)
    if baseline is not None:
        plan.notes.append(baseline.note(analysis.macs))
    if score_note:
        plan.notes.append(score_note)
    if not allocation.met:
        plan.notes.append(f"the latency budget{' or the MAC cap' if macs_ratio else ''} is out of reach under the latency "
                          f"model: every saving taken, predicted {predicted:.4g} ms for a budget of {budget:.4g} ms")
    if model.info["skipped_over_budget"]:
        reserve = model.info.get("loop_reserve")
        kept = (f" (the table kept to {reserve['table_budget_s']:.3g} s, {reserve['reserve_s']:.3g} s left for "
                f"measuring {reserve['measurements']} whole candidates)" if reserve else "")
        plan.notes.append(f"--profile-budget reached: {model.info['skipped_over_budget']} measurements skipped, "
                          f"some layers use a coarser width grid{kept}")
    if model.info["failed"]:
        plan.notes.append(f"some layer widths could not be timed on {request.target} (e.g. {model.info['failed'][0]}); "
                          "those layers use a coarser table")
    return LatencyPlan(plan, model, budget, predicted, info, None if request.latency_ms is not None else request.ratio,
                       chosen.corrected_fraction, chosen.measured)


def _closed_loop(analysis: Analysis, model: LatencyModel, candidate, first: _Candidate, budget: float, request: LatencyRequest,
                 remaining_s: float | None, progress) -> list[_Candidate]:
    """Measure candidates and correct the allocation's budget until one measures within the window under the budget.

    Stops at a candidate inside [LOOP_ACCEPT, 1] of the budget, after loop_iterations candidates, when the profile
    budget would run out, or when the correction has nothing new to try (see _next_allocation_budget)."""
    from compressor.engine.surgery import apply_plan

    iterations = request.settings.loop_iterations
    tried = [first]
    if iterations <= 0:
        return tried
    current = first
    while True:
        start = time.perf_counter()
        if progress:
            progress(f"measuring candidate {len(tried)} on {request.target}")
        compressed = apply_plan(analysis, current.plan)
        current.measured = paired.measure_pair(analysis.proto, compressed, request, analysis.input_shapes)
        current.seconds = time.perf_counter() - start
        if remaining_s is not None:
            remaining_s -= current.seconds
        wanted = _wanted(tried, budget, model.full_ms, request)
        if LOOP_ACCEPT * wanted <= current.measured.fraction <= wanted or len(tried) >= iterations:
            break
        keep = current.seconds * (2 if request.settings.aligned_baseline else 1)  # the baseline must fit after it
        if remaining_s is not None and remaining_s < MEASURE_SLACK * keep:
            break
        internal = _next_allocation_budget(tried, model, wanted)
        if internal is None or any(abs(internal - t.internal_budget_ms) <= 1e-3 * t.internal_budget_ms for t in tried):
            break
        nxt = candidate(internal)
        nxt.corrected_fraction = _measured_relation(tried, model, wanted * LOOP_AIM)[0](nxt.predicted_ms)
        if any(same_plan(nxt.plan, t.plan) for t in tried):
            break
        tried.append(nxt)
        current = nxt
    return tried


def _aligned_baseline(analysis: Analysis, method: str, options, model: LatencyModel, chosen: _Candidate,
                      tried: list[_Candidate], budget: float, request: LatencyRequest, remaining_s: float | None,
                      progress) -> BaselineOutcome | None:
    """The aligned MAC baseline judged against the choice (closed loop only, within the profile budget)."""
    if not request.settings.aligned_baseline or chosen.measured is None or (
            remaining_s is not None and remaining_s < MEASURE_SLACK * chosen.seconds):
        return None
    wanted = _wanted(tried, budget, model.full_ms, request)
    return measure_aligned_baseline(analysis, method, options, model.alignment, chosen.plan, chosen.measured.fraction,
                                    wanted, request, progress)


def _wanted(tried: list[_Candidate], budget: float, full_ms: float, request: LatencyRequest) -> float:
    """The budget as a fraction of the original's latency: 1 − ratio for --ratio; for --latency-ms, over the median
    of the original's latencies measured beside the candidates so far (one moment's timing is too noisy)."""
    if request.latency_ms is not None:
        return request.latency_ms / float(np.median([t.measured.before_ms for t in tried if t.measured is not None]))
    return budget / full_ms


def _next_allocation_budget(tried: list[_Candidate], model: LatencyModel, wanted: float) -> float | None:
    """The allocation budget (latency model ms) of the next candidate, aiming at LOOP_AIM · wanted; None: stop.

    Candidates measuring over the budget ("slow") bound it from above, those under the window ("fast") from below.
    Bracketed (both): linear interpolation of the measured fraction between the nearest slow and the nearest fast
    candidate, kept LOOP_MARGIN of the gap off either end. Otherwise the measured/predicted relation
    (_measured_relation), damped: at most a factor LOOP_STEP below the nearest slow candidate's budget, or 1/LOOP_STEP
    above the nearest fast one's. A launch-bound target, whose latency barely moves with the MACs, gives nearly equal
    noisy measurements and a secant near flat, which undamped would send the budget to zero (everything removed).
    Returns None when the measurements contradict each other (a fast candidate with a larger budget than a slow one)
    or show the budget out of reach (_out_of_reach).
    """
    measured = [t for t in tried if t.measured is not None]
    aim = wanted * LOOP_AIM
    slow = [t for t in measured if t.measured.fraction > wanted]
    fast = [t for t in measured if t.measured.fraction < LOOP_ACCEPT * wanted]
    upper = min(slow, key=lambda t: t.internal_budget_ms) if slow else None
    lower = max(fast, key=lambda t: t.internal_budget_ms) if fast else None
    if upper and lower:
        hi, lo = upper.internal_budget_ms, lower.internal_budget_ms
        if lo >= hi:
            return None
        m_hi, m_lo = upper.measured.fraction, lower.measured.fraction
        x = lo + (aim - m_lo) * (hi - lo) / (m_hi - m_lo)
        return float(np.clip(x, lo + LOOP_MARGIN * (hi - lo), hi - LOOP_MARGIN * (hi - lo)))
    if not upper and not lower:
        return None
    estimate = _measured_relation(tried, model, aim)[1](aim)
    if upper:
        hi = upper.internal_budget_ms
        if _out_of_reach(slow, aim):
            return None
        if estimate is None or estimate >= hi:
            estimate = hi * aim / upper.measured.fraction
        return max(estimate, LOOP_STEP * hi)
    lo = lower.internal_budget_ms
    if estimate is None or estimate <= lo:
        estimate = lo * aim / max(lower.measured.fraction, 1e-9)
    return min(estimate, lo / LOOP_STEP, model.full_ms)


def _out_of_reach(slow: list[_Candidate], aim: float) -> bool:
    """True when the two slow candidates with the smallest allocation budgets, at least a factor LOOP_REACH_STEP
    apart (closer ones differ by little more than timing noise), draw a line that reaches `aim` only at a budget
    of 0 ms or less: the target does not get faster with what the latency model removes (launch-bound)."""
    if len(slow) < 2:
        return False
    low, high = sorted(slow, key=lambda t: t.internal_budget_ms)[:2]
    if low.internal_budget_ms > LOOP_REACH_STEP * high.internal_budget_ms:
        return False
    gained = high.measured.fraction - low.measured.fraction
    if gained <= 0:
        return True
    slope = gained / (high.internal_budget_ms - low.internal_budget_ms)
    return low.internal_budget_ms - (low.measured.fraction - aim) / slope <= 0


def _measured_relation(tried: list[_Candidate], model: LatencyModel, aim: float):
    """(to_fraction, to_predicted): the measured fraction of the original's latency as a function of the latency
    model's predicted ms, and its inverse clamped to predictions the allocation can reach.

    Through the origin and the measured candidate nearest to `aim` with one point (m ∝ p); with more, the secant
    through the two measured candidates nearest to `aim` when it rises, else the former."""
    points = sorted(((t.predicted_ms, t.measured.fraction) for t in tried if t.measured),
                    key=lambda pm: abs(pm[1] - aim))
    p0, m0 = points[0]
    slope = m0 / p0 if p0 > 0 else None
    if len(points) > 1:
        p1, m1 = points[1]
        if abs(p1 - p0) > 1e-12 and (m1 - m0) / (p1 - p0) > 0:
            slope = (m1 - m0) / (p1 - p0)

    def to_fraction(p: float) -> float:
        return m0 + (p - p0) * slope if slope else p / model.full_ms

    def to_predicted(m: float) -> float | None:
        if not slope:
            return None
        return float(min(max(p0 + (m - m0) / slope, 1e-6 * model.full_ms), model.full_ms))

    return to_fraction, to_predicted


def _choose(tried: list[_Candidate], budget: float, full_ms: float, request: LatencyRequest
            ) -> tuple[_Candidate, str | None]:
    """(candidate, note): the measured candidate to keep, and a report note when it is not inside the window.

    1. inside [LOOP_ACCEPT, 1] of the budget: the one keeping the most importance;
    2. else over the budget by at most the window's width (LOOP_ACCEPT·budget .. budget): the closest from above;
    3. else the one nearest the window (relative distance), which may miss the budget or remove more than asked.
    Never the fastest for its own sake: a candidate far under the window removed more than the budget called for.
    Without measurements, the only candidate."""
    measured = [t for t in tried if t.measured is not None]
    if not measured:
        return tried[0], None

    w = _wanted(measured, budget, full_ms, request)

    def fraction(t: _Candidate) -> float:
        return t.measured.fraction

    inside = [t for t in measured if LOOP_ACCEPT * w <= fraction(t) <= w * (1 + 1e-9)]
    if inside:
        return max(inside, key=lambda t: (t.allocation.kept_value, fraction(t))), None
    near_above = [t for t in measured if w < fraction(t) <= w * (2 - LOOP_ACCEPT)]
    if near_above:
        best = min(near_above, key=fraction)
        return best, (f"no candidate of the closed loop met the measured latency budget ({w:.3f} of the "
                      f"original's); kept the closest from above at {fraction(best):.3f}")

    def distance(t: _Candidate) -> float:
        return (fraction(t) - w) / w if fraction(t) > w else (LOOP_ACCEPT * w - fraction(t)) / w

    best = min(measured, key=distance)
    side = "misses the budget" if fraction(best) > w else "removes more than the budget asked"
    return best, (f"no candidate of the closed loop measured within {LOOP_ACCEPT:.2f}-1 of the latency budget "
                  f"({w:.3f} of the original's); kept the nearest, at {fraction(best):.3f}, which {side}")


def _loop_report(tried: list[_Candidate], chosen: _Candidate, full_ms: float) -> list[dict]:
    return [{"allocation_budget_ms": t.internal_budget_ms, "model_predicted_ms": t.predicted_ms,
             "predicted_fraction": t.corrected_fraction,
             "measured_fraction": t.measured.fraction if t.measured else None,
             "measured_before_ms": t.measured.before_ms if t.measured else None,
             "measured_after_ms": t.measured.after_ms if t.measured else None,
             "blocks_dropped": len(t.plan.dropped_blocks), "importance_kept": (
                 t.allocation.kept_value / t.allocation.total_value if t.allocation.total_value else 1.0),
             "seconds": round(t.seconds, 2), "chosen": t is chosen} for t in tried]


def check_batch(analysis: Analysis, batch: int) -> None:
    """CompressorError (one line, before any profiling) when an input has a fixed batch size other than `batch`.

    The model is not adapted: a fixed batch axis usually comes with batch-sized constants elsewhere in the graph
    (Reshape targets, Expand shapes), and a latency measured on a rewritten copy would not be the one deployed.
    """
    from compressor.runtime.inputs import graph_inputs

    for inp in graph_inputs(analysis.proto):
        dims = inp.type.tensor_type.shape.dim
        fixed = dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
        if fixed is not None and fixed != batch:
            raise CompressorError(f"--batch {batch}: input '{inp.name}' has a fixed batch size of {fixed}; export the "
                                  f"model with a dynamic batch axis to profile it at batch {batch}, or use --batch {fixed}")


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


def item_macs(analysis: Analysis, item, candidates: list) -> np.ndarray:
    """MACs of an item at every combination of candidate widths of its dims: each MAC term scales with the kept
    fraction of its input and of its output units (the engine's own cost model, Analysis.cost)."""
    shape = [len(c) for c in candidates]
    total = np.zeros(shape)
    names = set(item.nodes)

    def kept(units: np.ndarray) -> np.ndarray:
        """Kept units at every width combination: fixed units, plus each dim's share at its candidate width."""
        owners = np.array([analysis.unit_group.get(int(u), -1) for u in units])
        count_kept = np.full(shape, float(np.isin(owners, item.dims, invert=True).sum()))
        for axis, (g, widths) in enumerate(zip(item.dims, candidates)):
            count = int((owners == g).sum())
            if count:
                along = np.asarray(widths, dtype=np.float64) * count / analysis.groups[g].size
                count_kept = count_kept + along.reshape([-1 if a == axis else 1 for a in range(len(shape))])
        return count_kept

    for term in analysis.mac_terms:
        if term.node in names and term.macs:
            total += term.scaled(kept)
    return total


def _block_value_factor(extra: dict) -> float:
    raw = extra.get("block_value", BLOCK_VALUE_FACTOR)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise CompressorError(f"block_value must be a number in [0, 1], got '{raw}'")
    return value


def _floor(group, min_channels: int) -> int:
    """The narrowest width a group may keep: MAX_RATE, --min-channels and its blocked units."""
    return max(kept_count(group.size, MAX_RATE, min_channels, 1), int((~group.prunable).sum()), 1)


def _group_choices(analysis: Analysis, floors: dict[int, int], scores: dict[int, np.ndarray], alignment: int,
                   measured: MeasuredImportance | None = None) -> dict[int, GroupChoice]:
    """Candidate widths per group (multiples of the alignment from the floor up, and the full width) and values."""
    choices = {}
    for g in sorted(floors):
        group = analysis.groups[g]
        widths = np.array([w for w in range(alignment, group.size, alignment) if w >= floors[g]] + [group.size])
        values = measured.values(g, group.size, widths) if measured else kept_value(unit_values(scores[g]), group.prunable, widths)
        choices[g] = GroupChoice(g, widths, values)
    return choices


def _internal_groups(analysis: Analysis, block: int, model: LatencyModel, variable: set[int]) -> tuple[int, ...]:
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
        **request.to_dict(), "budget_ms": budget, "measured_original_ms": model.full_ms, "predicted_ms": predicted,
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

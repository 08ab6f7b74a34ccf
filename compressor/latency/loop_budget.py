"""How much of --profile-budget the latency table may spend, so that the closed loop can still measure candidates.

With the closed loop on, the table (table.py) is followed by whole-candidate measurements (planner.py: each candidate
and then the aligned MAC baseline, paired.measure_pair). One such measurement can be expensive relative to the
budget (an int8 candidate is quantized before it is timed: seconds on ResNet-50), so a fixed share of the budget
may leave the loop time for one candidate only. The table therefore keeps back a reserve of LOOP_RESERVE
measurements, estimated from the whole network's own timing, which the profiler takes first:

    table budget = max(min(table_share · S, S − reserve), TABLE_FLOOR_SHARE · S)   (never above table_share · S)
"""

from __future__ import annotations

LOOP_RESERVE = 3  # whole-candidate measurements kept for the loop: two candidates and the aligned MAC baseline
TABLE_FLOOR_SHARE = 0.1  # the table always gets at least this share of the budget (the rest: a coarser width grid)


def loop_measurements(loop_iterations: int, aligned_baseline: bool) -> int:
    """Whole-candidate measurements to reserve: LOOP_RESERVE, or fewer when the loop and the baseline take fewer."""
    if loop_iterations <= 0:
        return 0
    return min(LOOP_RESERVE, loop_iterations + int(aligned_baseline))


def candidate_seconds(conversion_s: float, session_s: float, network_ms: float, runs_per_side: int) -> float:
    """Estimated wall seconds of one side-by-side measurement of a candidate against the original.

    conversion_s: what converting the original network to the timed precision took (a candidate, smaller, takes at
    most as long; 0 for fp32); session_s: what opening its session took, beyond its timed runs; network_ms: the
    original's latency; runs_per_side: warm-up plus timed runs of each model (paired.runs_per_side). Both models
    are counted at the original's latency, so the estimate is an upper bound for a faster candidate.
    """
    return conversion_s + 2.0 * session_s + 2.0 * runs_per_side * network_ms / 1000.0


def loop_reserve_s(candidate_s: float, conversion_s: float, measurements: int) -> float:
    """Seconds to keep for `measurements` whole-candidate measurements of `candidate_s` each, plus one conversion of
    the original (the table's own network conversions usually push it out of timed.py's memory); 0 for none."""
    if measurements <= 0:
        return 0.0
    return measurements * max(candidate_s, 0.0) + max(conversion_s, 0.0)


def table_budget_s(profile_budget_s: float | None, table_share: float, reserve_s: float) -> float | None:
    """The seconds the latency table may use of `profile_budget_s` (None: unbounded, as the profile budget):
    its share, less what the reserve needs, never below TABLE_FLOOR_SHARE of the budget nor above its share."""
    if profile_budget_s is None:
        return None
    share = table_share * profile_budget_s
    floor = min(TABLE_FLOOR_SHARE, table_share) * profile_budget_s
    return max(min(share, profile_budget_s - reserve_s), floor)

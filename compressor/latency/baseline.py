"""The simple baseline a latency-aware plan must not lose to: MAC-targeted pruning at the probed alignment.

After the closed loop has chosen its candidate, the method's own MAC-targeted plan that removes the same MACs, with
widths rounded to the alignment the latency table probed (`--round-to` = alignment), is built and measured beside
the original like every candidate. Of the two, the planner keeps the least-pruned one that meets the measured
budget (more MACs kept; at equal MACs the faster); when neither meets it, the faster one. On targets where
uniform aligned widths run faster than what the latency model picked (CPUs at the same MACs, issue 14), the
baseline wins; elsewhere the latency-aware plan stays.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from compressor import methods
from compressor.engine.plan import Plan
from compressor.latency import paired
from compressor.latency.paired import PairMeasurement
from compressor.latency.request import LatencyRequest

SAME_MACS = 0.01  # MAC counts within this share of each other count as equal


@dataclass
class BaselineOutcome:
    """The aligned MAC baseline, its measurement, and whether it replaces the latency-aware choice."""

    plan: Plan
    alignment: int
    macs_kept: float
    measured: PairMeasurement
    latency_macs_kept: float  # the latency-aware choice it was judged against
    latency_fraction: float
    wins: bool
    reason: str

    def to_dict(self) -> dict:
        """JSON-ready form for the report's latency section."""
        return {"round_to": self.alignment, "macs_kept": self.macs_kept, "measured_fraction": self.measured.fraction,
                "latency_aware_macs_kept": self.latency_macs_kept, "latency_aware_fraction": self.latency_fraction,
                "chosen": self.wins, "reason": self.reason}

    def note(self, total_macs: float) -> str:
        """One line for the report's notes."""
        return (f"aligned MAC baseline (round-to {self.alignment}, {self.macs_kept / total_macs:.3f} of the MACs) "
                f"measured {self.measured.fraction:.3f} of the original's latency vs {self.latency_fraction:.3f} for "
                f"the latency-aware plan ({self.latency_macs_kept / total_macs:.3f} of the MACs): kept "
                f"{'the baseline' if self.wins else 'the latency-aware plan'} ({self.reason})")


def aligned_mac_plan(analysis, method: str, options, alignment: int, macs_kept: float) -> Plan | None:
    """The method's MAC-targeted plan keeping `macs_kept` of the MACs with widths multiples of `alignment`; None when
    that removes nothing."""
    ratio = 1.0 - macs_kept / analysis.macs if analysis.macs else 0.0
    if not 0.0 < ratio < 1.0:
        return None
    mac_options = replace(options, ratio=ratio, target="macs", round_to=max(options.round_to, alignment))
    plan = methods.get(method).plan(analysis, mac_options)
    return None if plan.is_empty() else plan


def prefer_baseline(chosen_fraction: float, chosen_macs: float, base_fraction: float, base_macs: float,
                    wanted: float) -> tuple[bool, str]:
    """(baseline wins, why): the least-pruned plan that meets the budget `wanted` (a fraction of the original's
    latency), at equal MACs the faster; when neither meets it, the faster."""
    chosen_meets, base_meets = chosen_fraction <= wanted, base_fraction <= wanted
    if chosen_meets != base_meets:
        return base_meets, "only it meets the budget" if base_meets else "only the latency-aware plan meets the budget"
    if chosen_meets and abs(base_macs - chosen_macs) > SAME_MACS * max(base_macs, chosen_macs):
        wins = base_macs > chosen_macs
        return wins, "both meet the budget; it keeps more MACs" if wins else \
            "both meet the budget; the latency-aware plan keeps more MACs"
    wins = base_fraction < chosen_fraction
    return wins, "it is faster at the same MACs" if wins else "the latency-aware plan is at least as fast"


def same_plan(a: Plan, b: Plan) -> bool:
    """Whether two plans drop the same blocks and remove the same number of channels from every group."""
    return a.dropped_blocks == b.dropped_blocks and {g: len(v) for g, v in a.removed.items() if len(v)} == {
        g: len(v) for g, v in b.removed.items() if len(v)}


def measure_aligned_baseline(analysis, method: str, options, alignment: int, chosen: Plan, chosen_fraction: float,
                             wanted: float, request: LatencyRequest, progress=None) -> BaselineOutcome | None:
    """Build the aligned MAC baseline at the MACs `chosen` keeps, measure it beside the original (paired, as every
    candidate) and judge it against `chosen` (measured at `chosen_fraction` of the original's latency); None when it
    is the same plan or removes nothing."""
    from compressor.engine.surgery import apply_plan

    chosen_macs = analysis.cost(chosen)[0]
    plan = aligned_mac_plan(analysis, method, options, alignment, chosen_macs)
    if plan is None or same_plan(plan, chosen):
        return None
    if progress:
        progress(f"measuring the aligned MAC baseline on {request.target}")
    measured = paired.measure_pair(analysis.proto, apply_plan(analysis, plan), request, analysis.input_shapes)
    macs = analysis.cost(plan)[0]
    wins, reason = prefer_baseline(chosen_fraction, chosen_macs, measured.fraction, macs, wanted)
    return BaselineOutcome(plan, alignment, macs, measured, chosen_macs, chosen_fraction, wins, reason)

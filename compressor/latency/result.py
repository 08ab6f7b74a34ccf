"""The outcome of latency planning: the chosen plan, its latency model, and what the report says about it."""

from __future__ import annotations

from dataclasses import dataclass, field

from compressor.engine.plan import Plan
from compressor.latency.paired import PairMeasurement
from compressor.latency.table import LatencyModel


@dataclass
class LatencyPlan:
    """The chosen plan, the latency model it was chosen with, and the report section (`info`).

    budget_ms: the requested budget in the latency model's milliseconds (anchored on the original measured when
    the table was built); predicted_ms: the latency model's own prediction for the plan (no loop correction);
    predicted_fraction: the prediction as a fraction of the original's latency, corrected by the closed loop's
    earlier measurements; measured: the closed loop's measurement of this plan against the original (None when
    the loop was off); ratio: the requested --ratio (None for --latency-ms).
    """

    plan: Plan
    model: LatencyModel
    budget_ms: float
    predicted_ms: float
    info: dict = field(default_factory=dict)
    ratio: float | None = None
    predicted_fraction: float = 1.0
    measured: PairMeasurement | None = None

"""Measure a candidate against the original on the target, side by side with the prediction.

Both models are timed in interleaved rounds (A B A B ...) by compressor.runtime.bench.run_benchmark, in this process, with
the session options of `compress bench` (`measure_pair`). The candidate's latency is judged as a *paired ratio*: the
median over rounds of (candidate's round median / original's round median), so a machine that drifts between rounds
(launch-bound GPU models at batch 1 move by 30% from one moment to the next) moves both models of a round alike.
The planner's closed loop (planner.py) measures every candidate it tries this way; `check_latency` reports the
measurement of the chosen one (or takes it afresh when the loop was off). Predictions are compared as fractions of
the original's latency measured in the same benchmark, which separates a wrong latency model from a machine that got
slower or faster since the table was built:

    predicted_ms = predicted fraction of the original · original measured now
    predictor_error = (predicted_ms − measured) / measured       flagged above 10%

The predicted fraction is the latency model's, corrected by the loop's earlier measurements (made before the chosen
candidate was measured, so the error is a real prediction error); the uncorrected model's error is reported too.
"""

from __future__ import annotations

import onnx

from compressor.latency import paired
from compressor.latency.paired import PairMeasurement
from compressor.latency.request import LatencyRequest
from compressor.latency.result import LatencyPlan

ERROR_FLAG = 0.10
def check_fields(planned: LatencyPlan, measured: PairMeasurement, predicted_fraction: float) -> dict:
    """The report fields comparing the prediction for `planned` with its measurement."""
    before, after = measured.before_ms, measured.after_ms
    full = planned.model.full_ms
    predicted = predicted_fraction * before
    model_fraction = planned.predicted_ms / full if full > 0 else 1.0
    error = (predicted - after) / after if after > 0 else None
    budget = planned.budget_ms if planned.ratio is None else (1.0 - planned.ratio) * before
    return {
        "measured_before_ms": before,
        "measured_after_ms": after,
        "measured_speedup": before / after if after > 0 else None,
        "measured_fraction": measured.fraction,  # paired: the median of the per-round ratios
        "budget_ms": budget,
        "predicted_ms": predicted,
        "predictor_error": error,
        "model_predicted_ms": planned.predicted_ms,  # "predicted_ms" above is corrected by the closed loop
        "model_predictor_error": (model_fraction * before - after) / after if after > 0 else None,
        "flagged": bool(error is not None and abs(error) > ERROR_FLAG),
        "budget_met_measured": bool(after <= budget if planned.ratio is None else
                                    measured.fraction <= 1.0 - planned.ratio + 1e-9),
        "check_runs": measured.runs,
    }


def check_latency(original: onnx.ModelProto, result: onnx.ModelProto, planned: LatencyPlan, request: LatencyRequest,
                  input_shapes: dict | None = None, warmup: int | None = None, runs: int | None = None) -> dict:
    """Measured latency of original and result on the request's target and batch, with the predictor error.

    Reuses the closed loop's measurement of the chosen plan when there is one. Returns the fields added to the
    report's `latency` section; `flagged` is True when |error| > 10%.
    """
    if planned.measured is not None:
        return check_fields(planned, planned.measured, planned.predicted_fraction)
    measured = paired.measure_pair(original, result, request, input_shapes, warmup, runs)
    return check_fields(planned, measured, planned.predicted_fraction)


def flag_note(check: dict) -> str | None:
    """A report note when the predictor error is above 10%, else None."""
    if not check.get("flagged"):
        return None
    return (f"latency predictor error {check['predictor_error']:+.1%} exceeds {ERROR_FLAG:.0%}: predicted "
            f"{check['predicted_ms']:.4g} ms, measured {check['measured_after_ms']:.4g} ms (the latency model alone: "
            f"{check['model_predictor_error']:+.1%})")

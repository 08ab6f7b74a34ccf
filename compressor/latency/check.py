"""Measure a candidate against the original on the target, side by side with the prediction.

Both models are timed in interleaved rounds (A B A B ...) by compressor.bench.run_benchmark, in this process, with
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

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from compressor.deploy.fp16 import to_fp16
from compressor.latency.request import LatencyRequest

if TYPE_CHECKING:
    from compressor.latency.planner import LatencyPlan

ERROR_FLAG = 0.10
CHECK_WARMUP = {"gpu": 50, "cpu": 3}
CHECK_RUNS = {"gpu": 300, "cpu": 20}
CHECK_ROUNDS = {"gpu": 10, "cpu": 5}


@dataclass(frozen=True)
class PairMeasurement:
    """p50 milliseconds of the original and a candidate, timed in the same interleaved benchmark, and the
    candidate/original ratio of every round (empty when unknown)."""

    before_ms: float
    after_ms: float
    runs: int
    round_ratios: tuple[float, ...] = ()

    @property
    def fraction(self) -> float:
        """Candidate latency as a fraction of the original's: the median of the per-round ratios (paired), else
        the ratio of the p50s."""
        if self.round_ratios:
            return float(np.median(self.round_ratios))
        return self.after_ms / self.before_ms if self.before_ms > 0 else 1.0


def measure_pair(original: onnx.ModelProto, candidate: onnx.ModelProto, request: LatencyRequest,
                 input_shapes: dict | None = None, warmup: int | None = None, runs: int | None = None
                 ) -> PairMeasurement:
    """Time original and candidate on the request's target and batch (interleaved rounds, bench session options),
    both converted to the request's precision (fp16: fp32 inputs and outputs, as deployed)."""
    from compressor.bench import run_benchmark

    if request.precision == "fp16":
        original, candidate = to_fp16(original), to_fp16(candidate)

    kind = "gpu" if request.target.on_gpu else "cpu"
    warmup = request.settings.check_warmup if warmup is None else warmup
    runs = request.settings.check_runs if runs is None else runs
    report = run_benchmark([original, candidate], [request.target], [request.batch],
                           warmup=CHECK_WARMUP[kind] if warmup is None else warmup,
                           runs=CHECK_RUNS[kind] if runs is None else runs, rounds=CHECK_ROUNDS[kind],
                           input_shapes=input_shapes, isolate=False, names=["original", "compressed"], with_cost=False,
                           memory=False, environment=False)
    before, after = sorted(report.measurements, key=lambda m: m.model_index)
    ratios = tuple(a / b for a, b in zip(after.round_medians_ms, before.round_medians_ms) if b > 0)
    return PairMeasurement(before.p50_ms, after.p50_ms, before.runs, ratios)


def check_fields(planned: "LatencyPlan", measured: PairMeasurement, predicted_fraction: float) -> dict:
    """The report fields comparing the prediction for `planned` with its measurement."""
    before, after = measured.before_ms, measured.after_ms
    full = planned.model.full_ms
    predicted = predicted_fraction * before
    model_fraction = planned.model_predicted_ms / full if full > 0 else 1.0
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
        "model_predicted_ms": planned.model_predicted_ms,
        "model_predictor_error": (model_fraction * before - after) / after if after > 0 else None,
        # kept for reports made before the closed loop: the uncorrected model rescaled to the original's latency now
        "predictor_error_rescaled": (model_fraction * before - after) / after if after > 0 else None,
        "flagged": bool(error is not None and abs(error) > ERROR_FLAG),
        "budget_met_measured": bool(after <= budget if planned.ratio is None else
                                    measured.fraction <= 1.0 - planned.ratio + 1e-9),
        "check_runs": measured.runs,
    }


def check_latency(original: onnx.ModelProto, result: onnx.ModelProto, planned: "LatencyPlan", request: LatencyRequest,
                  input_shapes: dict | None = None, warmup: int | None = None, runs: int | None = None) -> dict:
    """Measured latency of original and result on the request's target and batch, with the predictor error.

    Reuses the closed loop's measurement of the chosen plan when there is one. Returns the fields added to the
    report's `latency` section; `flagged` is True when |error| > 10%.
    """
    if planned.measured is not None:
        return check_fields(planned, planned.measured, planned.predicted_fraction)
    measured = measure_pair(original, result, request, input_shapes, warmup, runs)
    return check_fields(planned, measured, planned.predicted_fraction)


def flag_note(check: dict) -> str | None:
    """A report note when the predictor error is above 10%, else None."""
    if not check.get("flagged"):
        return None
    return (f"latency predictor error {check['predictor_error']:+.1%} exceeds {ERROR_FLAG:.0%}: predicted "
            f"{check['predicted_ms']:.4g} ms, measured {check['measured_after_ms']:.4g} ms (the latency model alone: "
            f"{check['model_predictor_error']:+.1%})")

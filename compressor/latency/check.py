"""After surgery: measure the original and the result on the target, side by side with the prediction.

Both models are timed in interleaved rounds (A B A B ...) by compressor.bench.run_benchmark, in this process, with
the session options of `compress bench`. The predictor error is (predicted − measured) / measured for the result;
it is flagged above 10%. Because the prediction is anchored on the original's latency when the table was built
(possibly an earlier run, from the cache), the report also gives the error after rescaling the prediction by the
original's latency now, which separates a wrong model from a machine that got slower or faster.
"""

from __future__ import annotations

import onnx

from compressor.latency.planner import LatencyPlan
from compressor.latency.request import LatencyRequest

ERROR_FLAG = 0.10
CHECK_WARMUP = {"gpu": 20, "cpu": 3}
CHECK_RUNS = {"gpu": 200, "cpu": 20}


def check_latency(original: onnx.ModelProto, result: onnx.ModelProto, planned: LatencyPlan, request: LatencyRequest,
                  input_shapes: dict | None = None, warmup: int | None = None, runs: int | None = None) -> dict:
    """Measured latency of original and result on the request's target and batch, with the predictor error.

    Returns the fields added to the report's `latency` section; `flagged` is True when |error| > 10%.
    """
    from compressor.bench import run_benchmark

    kind = "gpu" if request.target.on_gpu else "cpu"
    warmup = request.settings.check_warmup if warmup is None else warmup
    runs = request.settings.check_runs if runs is None else runs
    report = run_benchmark([original, result], [request.target], [request.batch],
                           warmup=CHECK_WARMUP[kind] if warmup is None else warmup,
                           runs=CHECK_RUNS[kind] if runs is None else runs, rounds=5, input_shapes=input_shapes,
                           isolate=False, names=["original", "compressed"], with_cost=False, memory=False,
                           environment=False)
    before, after = (m.p50_ms for m in sorted(report.measurements, key=lambda m: m.model_index))
    predicted = planned.predicted_ms
    error = (predicted - after) / after if after > 0 else None
    rescaled = predicted * before / planned.model.full_ms if planned.model.full_ms > 0 else predicted
    rescaled_error = (rescaled - after) / after if after > 0 else None
    return {
        "measured_before_ms": before,
        "measured_after_ms": after,
        "measured_speedup": before / after if after > 0 else None,
        "predicted_ms": predicted,
        "predictor_error": error,
        "predictor_error_rescaled": rescaled_error,
        "flagged": bool(error is not None and abs(error) > ERROR_FLAG),
        "budget_met_measured": bool(after <= planned.budget_ms),
        "check_runs": report.measurements[0].runs,
    }


def flag_note(check: dict) -> str | None:
    """A report note when the predictor error is above 10%, else None."""
    if not check.get("flagged"):
        return None
    return (f"latency predictor error {check['predictor_error']:+.1%} exceeds {ERROR_FLAG:.0%}: predicted "
            f"{check['predicted_ms']:.4g} ms, measured {check['measured_after_ms']:.4g} ms (rescaled to the original's "
            f"latency now: {check['predictor_error_rescaled']:+.1%})")

"""Time a candidate against the original on the target, side by side: the paired ratio the closed loop and the
latency check judge by (see check.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from compressor.latency.request import LatencyRequest
from compressor.latency.timed import timing_model

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


def check_counts(request: LatencyRequest, warmup: int | None = None, runs: int | None = None) -> tuple[int, int]:
    """(warm-up runs, timed runs) of each model in a side-by-side measurement: the arguments, else the request's
    settings (check_warmup, check_runs), else the target kind's defaults (CHECK_WARMUP, CHECK_RUNS)."""
    kind = "gpu" if request.target.on_gpu else "cpu"
    warmup = request.settings.check_warmup if warmup is None else warmup
    runs = request.settings.check_runs if runs is None else runs
    return (CHECK_WARMUP[kind] if warmup is None else warmup, CHECK_RUNS[kind] if runs is None else runs)


def runs_per_side(request: LatencyRequest) -> int:
    """Session runs of each model (warm-up and timed) in one side-by-side measurement with the default counts."""
    return sum(check_counts(request))


def measure_pair(original: onnx.ModelProto, candidate: onnx.ModelProto, request: LatencyRequest,
                 input_shapes: dict | None = None, warmup: int | None = None, runs: int | None = None
                 ) -> PairMeasurement:
    """Time original and candidate on the request's target and batch (interleaved rounds, bench session options),
    both converted to the request's precision as deployed (timed.py)."""
    from compressor.runtime.bench import run_benchmark  # only a measuring run loads the benchmark runner

    original, candidate = (timing_model(m, request, whole=True, input_shapes=input_shapes) for m in (original, candidate))

    warmup, runs = check_counts(request, warmup, runs)
    report = run_benchmark([original, candidate], [request.target], [request.batch], warmup=warmup, runs=runs,
                           rounds=CHECK_ROUNDS["gpu" if request.target.on_gpu else "cpu"],
                           input_shapes=input_shapes, isolate=False, names=["original", "compressed"], with_cost=False,
                           memory=False, environment=False)
    before, after = sorted(report.measurements, key=lambda m: m.model_index)
    ratios = tuple(a / b for a, b in zip(after.round_medians_ms, before.round_medians_ms) if b > 0)
    return PairMeasurement(before.p50_ms, after.p50_ms, before.runs, ratios)

"""Verification at the save boundary: ONNX checker, shape inference and an ONNX Runtime comparison."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from compressor.errors import VerificationError, first_line
from compressor.engine.shapes import with_fixed_inputs
from compressor.runtime.inputs import random_inputs
from compressor.runtime.sessions import cpu_session

ATOL = 1e-4
RTOL = 1e-4


@dataclass
class VerificationResult:
    """Max abs output differences of the result against the zeroed reference and against the original."""

    max_abs_diff_vs_reference: float
    max_abs_diff_vs_original: float
    tolerance: float
    passed: bool


def check_model(proto: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> None:
    """Run the full ONNX checker and strict shape inference (under the analysis input shapes)."""
    try:
        onnx.checker.check_model(proto, full_check=False)
        onnx.shape_inference.infer_shapes(with_fixed_inputs(proto, input_shapes), check_type=True, strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - checker and inference raise several types
        raise VerificationError(f"the compressed model fails the ONNX checker: {first_line(exc)}") from exc


def run_outputs(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Outputs of `proto` on each feed dict (ONNX Runtime CPU)."""
    session = cpu_session(proto)
    return [session.run(None, feed) for feed in feeds]


def max_abs_diff(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> float:
    """Largest absolute elementwise difference over all runs and outputs."""
    worst = 0.0
    for outs_a, outs_b in zip(a, b):
        for x, y in zip(outs_a, outs_b):
            if x.shape != y.shape:
                return float("inf")
            if x.size:
                worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
    return worst


def compare_outputs(reference: list[list[np.ndarray]], actual: list[list[np.ndarray]]) -> tuple[float, float]:
    """(max abs difference, tolerance) of `actual` against `reference` over all runs and outputs; the tolerance is
    ATOL + RTOL · max|reference|. The one output comparison of the package (verification, export checks)."""
    scale = max((float(np.max(np.abs(o))) for outs in reference for o in outs if o.size), default=1.0)
    return max_abs_diff(actual, reference), ATOL + RTOL * scale


def verify(original: onnx.ModelProto, reference: onnx.ModelProto | None, result: onnx.ModelProto,
           input_shapes: dict[str, list[int]], seeds: tuple[int, ...] = (0, 1)) -> VerificationResult:
    """Check `result` and compare it on seeded inputs with `reference` (None: the original is the reference)."""
    check_model(result, input_shapes)
    feeds = [random_inputs(original, input_shapes, seed) for seed in seeds]
    out_original = run_outputs(original, feeds)
    out_reference = out_original if reference is None else run_outputs(reference, feeds)
    out_result = run_outputs(result, feeds)
    vs_reference, tolerance = compare_outputs(out_reference, out_result)
    vs_original = max_abs_diff(out_result, out_original)
    return VerificationResult(vs_reference, vs_original, tolerance, bool(vs_reference <= tolerance))

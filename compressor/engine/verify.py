"""Verification at the save boundary: ONNX checker, shape inference and an ONNX Runtime comparison.

The comparison (see the README, "Verification"):
- the result and its reference run on the same inputs in ONNX Runtime CPU under the same settings: graph
  optimizations off (ORT_DISABLE_ALL) for both, so no fusion of one side changes its rounding. float64 is not an
  option: ONNX Runtime's CPU provider has no double Conv kernel;
- each output is judged on its own scale: relative error = max|result - reference| / max|reference| over all
  inputs, with no absolute floor;
- the tolerance of each output is max(RTOL, NOISE_FACTOR x the model's own float32 noise), the noise being the
  same relative error between two roundings of the reference itself (ORT_ENABLE_ALL fuses and reorders what
  ORT_DISABLE_ALL computes as written). Removing exact zeros reorders float32 sums much as fusion does, so a
  correct result stays within a few times that noise on deep, badly conditioned models too, while a wrong slice
  changes a whole channel's contribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import onnx

from compressor.engine.shapes import shapes_only
from compressor.errors import CompressorError, VerificationError, first_line
from compressor.runtime.inputs import ONNX_TO_NUMPY, random_inputs
from compressor.runtime.sessions import cpu_session

RTOL = 1e-4
NOISE_FACTOR = 10.0
SEEDS = (0, 1)


@dataclass
class OutputCheck:
    """One graph output: its scale, its relative error against the reference, the noise and the tolerance."""

    name: str
    scale: float
    relative_error: float
    noise: float
    tolerance: float

    @property
    def passed(self) -> bool:
        """Within tolerance (NaN never passes)."""
        return bool(self.relative_error <= self.tolerance)


@dataclass
class VerificationResult:
    """Relative output errors of the result against its reference (judged) and against the original (informative).

    relative_error_vs_reference / relative_tolerance / runtime_noise are those of the output closest to failing.
    """

    relative_error_vs_reference: float
    relative_error_vs_original: float
    relative_tolerance: float
    runtime_noise: float
    passed: bool
    inputs: dict = field(default_factory=dict)
    outputs: list[OutputCheck] = field(default_factory=list)


def check_model(proto: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> None:
    """Run the full ONNX checker and strict shape inference (under the analysis input shapes)."""
    try:
        onnx.checker.check_model(proto, full_check=False)
        onnx.shape_inference.infer_shapes(shapes_only(proto, input_shapes), check_type=True, strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - checker and inference raise several types
        raise VerificationError(f"the compressed model fails the ONNX checker: {first_line(exc)}") from exc


def run_outputs(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                optimization: str = "disable") -> list[list[np.ndarray]]:
    """Outputs of `proto` on each feed dict (ONNX Runtime CPU at the given graph optimization level)."""
    session = cpu_session(proto, optimization=optimization)
    try:
        return [session.run(None, feed) for feed in feeds]
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise CompressorError(f"ONNX Runtime cannot run the verification inputs: {first_line(exc)}") from exc


def relative_errors(result: list[list[np.ndarray]], reference: list[list[np.ndarray]]) -> list[tuple[float, float]]:
    """Per output: (scale, relative error), scale = max|reference| over all runs, error = max|result - reference| /
    scale. A zero output must match exactly; a NaN where the reference has none is an infinite error.
    The one output comparison of the package (verification here, export checks in training/export.py)."""
    pairs = []
    for k in range(len(reference[0]) if reference else 0):
        worst, scale = 0.0, 0.0
        for outs_a, outs_b in zip(result, reference):
            a, b = np.asarray(outs_a[k], dtype=np.float64), np.asarray(outs_b[k], dtype=np.float64)
            if a.shape != b.shape:
                worst = np.inf
                continue
            if not b.size:
                continue
            both_nan = np.isnan(a) & np.isnan(b)
            diff = np.where(both_nan, 0.0, np.abs(a - b))
            worst = max(worst, float(np.max(np.where(np.isnan(diff), np.inf, diff))))
            finite = np.abs(b[np.isfinite(b)])
            scale = max(scale, float(finite.max()) if finite.size else 0.0)
        pairs.append((scale, worst / scale if scale > 0 else (0.0 if worst == 0 else np.inf)))
    return pairs


def caller_feeds(proto: onnx.ModelProto, inputs: Iterable[Mapping[str, object]] | None) -> list[dict[str, np.ndarray]]:
    """The caller's verification inputs as feed dicts of arrays of the model's input types (one per item)."""
    if inputs is None:
        return []
    names = {i.name: ONNX_TO_NUMPY.get(i.type.tensor_type.elem_type) for i in proto.graph.input}
    feeds = []
    for item in inputs:
        if not isinstance(item, Mapping):
            raise CompressorError("verification inputs must be dicts of input name -> array")
        missing, unknown = set(names) - set(item), set(item) - set(names)
        if missing or unknown:
            raise CompressorError(f"verification inputs must name exactly the model inputs ({', '.join(sorted(names))})"
                                  f"; missing: {', '.join(sorted(missing)) or '-'}, unknown: {', '.join(sorted(unknown)) or '-'}")
        feeds.append({name: np.asarray(value, dtype=names[name]) for name, value in item.items()})
    return feeds


def verify(original: onnx.ModelProto, reference: onnx.ModelProto | None, result: onnx.ModelProto,
           input_shapes: dict[str, list[int]], seeds: tuple[int, ...] = SEEDS,
           inputs: Iterable[Mapping[str, object]] | None = None) -> VerificationResult:
    """Check `result` and compare it with `reference` (None: the original is the reference) on seeded random inputs
    plus the caller's `inputs` (an iterable of {input name: array} dicts, e.g. real images), as described above."""
    check_model(result, input_shapes)
    extra = caller_feeds(original, inputs)
    feeds = [random_inputs(original, input_shapes, seed) for seed in seeds] + extra
    reference = original if reference is None else reference
    out_original = run_outputs(original, feeds)
    out_reference = out_original if reference is original else run_outputs(reference, feeds)
    out_fused = run_outputs(reference, feeds, optimization="all")
    out_result = run_outputs(result, feeds)
    names = [o.name for o in result.graph.output]
    checks = []
    for name, (scale, error), (_, noise) in zip(names, relative_errors(out_result, out_reference),
                                                relative_errors(out_fused, out_reference)):
        tolerance = max(RTOL, NOISE_FACTOR * noise) if np.isfinite(noise) else RTOL
        checks.append(OutputCheck(name, scale, error, noise, tolerance))
    vs_original = max((e for _, e in relative_errors(out_result, out_original)), default=0.0)
    worst = max(checks, key=lambda c: c.relative_error / c.tolerance if np.isfinite(c.relative_error) else np.inf,
                default=OutputCheck("", 0.0, 0.0, 0.0, RTOL))
    passed = all(c.passed for c in checks)
    return VerificationResult(worst.relative_error, vs_original, worst.tolerance, worst.noise, passed,
                              {"seeded_random": len(seeds), "caller": len(extra)}, checks)

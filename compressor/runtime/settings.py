"""Session settings `compress bench --tune` chooses between: the candidates per target, the check that a setting
still computes the model, and the choice of the fastest setting that passes.

Candidates (`candidate_settings`): on CUDA the target as given (ORT's defaults: TF32 on, NCHW kernels, no CUDA
graph), `prefer_nhwc=1`, a CUDA graph, and both; `strict_fp32` adds `use_tf32=0` to every candidate (the default
included) instead of accepting TF32. TensorRT: without and with its CUDA graph. CPU: the CPU execution provider has
no provider option, and the threads are the target itself (cpu:T), so the default is the only candidate: it is
kept, unchecked, and the report says so.

The check (`check_setting`), each output judged on its own scale:
- fp32 models: against the model's own reference, ONNX Runtime CPU with graph optimizations off on the same inputs,
  by the save-boundary rule (compressor.engine.verify): relative error = max|y - y_ref| / max|y_ref|, tolerance =
  max(RTOL, NOISE_FACTOR x noise). The noise is the larger of the CPU's own float32 noise (all optimizations vs
  none) and the error of the target's *default* setting: TF32 is ORT's default on CUDA, so the default defines the
  rounding the user already accepts, and another setting passes when it stays within ten times that.
- fp16 and int8 models: against their own outputs under the default setting on the target, by the precision
  stage's rule (compressor.deploy.agreement: ||y - y_default|| / ||y_default||) within the precision's documented
  limit (compressor.deploy.precision.LIMITS: 0.01 for fp16, 0.25 for int8).
A setting whose session cannot be created (e.g. a CUDA graph the model's ops cannot be captured in) fails too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from compressor.runtime.targets import Target

DEFAULT = "default"


@dataclass(frozen=True)
class SessionSetting:
    """One candidate: the target with its provider options, whether a CUDA graph is replayed, and its name in
    reports (`default`, `prefer_nhwc=1`, `cuda graph`, `prefer_nhwc=1 + cuda graph`)."""

    target: Target
    cuda_graph: bool = False
    name: str = DEFAULT

    @property
    def is_default(self) -> bool:
        """True for the target as given, without a CUDA graph."""
        return self.name == DEFAULT


def candidate_settings(target: Target, strict_fp32: bool = False) -> list[SessionSetting]:
    """The settings to time on `target`, the default first (see the module docstring)."""
    base = target
    if strict_fp32 and target.kind == "cuda":
        base = _with_option(target, "use_tf32", "0")
    if base.kind == "cpu":
        return [SessionSetting(base)]
    candidates = [SessionSetting(base)]
    if base.kind == "cuda" and dict(base.options).get("prefer_nhwc") != "1":
        candidates.append(SessionSetting(_with_option(base, "prefer_nhwc", "1"), name="prefer_nhwc=1"))
    candidates += [SessionSetting(c.target, True, "cuda graph" if c.is_default else f"{c.name} + cuda graph")
                   for c in list(candidates)]
    return candidates


def _with_option(target: Target, key: str, value: str) -> Target:
    options = dict(target.options)
    options[key] = value
    return replace(target, options=tuple(options.items()))


@dataclass
class SettingCheck:
    """A setting's outputs against the reference: the worst output's relative error and tolerance."""

    reference: str  # what the outputs were compared with
    relative_error: float
    tolerance: float
    passed: bool
    per_output: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"reference": self.reference, "relative_error": self.relative_error, "tolerance": self.tolerance,
                "passed": self.passed, "per_output": self.per_output}


def fp32_reference(model: str, feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[float]]:
    """The model's own reference outputs (ONNX Runtime CPU, optimizations off) and, per output, the CPU's float32
    noise (all optimizations against none), both by the save-boundary rule."""
    from compressor.engine.verify import relative_errors, run_outputs

    import onnx

    proto = onnx.load(model)
    reference = run_outputs(proto, [feeds])
    fused = run_outputs(proto, [feeds], optimization="all")
    return reference[0], [error for _, error in relative_errors(fused, reference)]


def check_fp32(outputs: list[np.ndarray], reference: list[np.ndarray], noise: list[float],
               default_outputs: list[np.ndarray] | None) -> SettingCheck:
    """An fp32 model's outputs under one setting against its CPU reference (module docstring: the tolerance follows
    the larger of the CPU noise and the default setting's own error)."""
    from compressor.engine.verify import NOISE_FACTOR, RTOL, relative_errors

    errors = relative_errors([outputs], [reference])
    default_errors = relative_errors([default_outputs], [reference]) if default_outputs is not None else None
    per_output = []
    for k, (scale, error) in enumerate(errors):
        floor = [noise[k]] + ([default_errors[k][1]] if default_errors else [])
        finite = [f for f in floor if np.isfinite(f)]
        tolerance = max([RTOL] + [NOISE_FACTOR * f for f in finite])
        per_output.append({"index": k, "scale": scale, "relative_error": error, "tolerance": tolerance,
                           "passed": bool(error <= tolerance)})
    return _summary("the model on ONNX Runtime CPU, optimizations off (save-boundary rule)", per_output)


def check_reduced(outputs: list[np.ndarray], default_outputs: list[np.ndarray], precision: str) -> SettingCheck:
    """An fp16/int8 model's outputs under one setting against its own default-setting outputs, within the
    precision's documented relative error limit."""
    from compressor.deploy.agreement import relative_error
    from compressor.deploy.precision import LIMITS

    limit = LIMITS[precision][0]
    per_output = []
    for k, (value, reference) in enumerate(zip(outputs, default_outputs)):
        error = relative_error(np.asarray(value, np.float64), np.asarray(reference, np.float64))
        per_output.append({"index": k, "relative_error": error, "tolerance": limit, "passed": bool(error <= limit)})
    return _summary(f"the {precision} model under the default setting ({precision} limit)", per_output)


def _summary(reference: str, per_output: list[dict[str, Any]]) -> SettingCheck:
    worst = max(per_output, key=lambda o: o["relative_error"] / o["tolerance"] if np.isfinite(o["relative_error"])
                else np.inf, default={"relative_error": 0.0, "tolerance": 0.0})
    return SettingCheck(reference, float(worst["relative_error"]), float(worst["tolerance"]),
                        all(o["passed"] for o in per_output), per_output)


@dataclass
class CandidateResult:
    """One model under one setting: its p50 (None when it could not run), its check (None: the only candidate,
    nothing to compare), why it failed, and whether it was chosen."""

    setting: SessionSetting
    p50_ms: float | None
    check: SettingCheck | None = None
    failure: str | None = None
    chosen: bool = False

    @property
    def passed(self) -> bool:
        """Ran, and its outputs passed the check (or it is the only candidate)."""
        return self.failure is None and self.p50_ms is not None and (self.check is None or self.check.passed)


def choose_setting(results: list[CandidateResult]) -> CandidateResult | None:
    """Mark and return the fastest candidate (lowest p50) that passed; None when none did."""
    passing = [r for r in results if r.passed]
    if not passing:
        return None
    best = min(passing, key=lambda r: r.p50_ms)
    for r in results:
        r.chosen = r is best
    return best

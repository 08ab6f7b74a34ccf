"""The library entry points: `compress` (load → analyze → plan → surgery → verify) and `inspect`."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from compressor import methods
from compressor.engine.analysis import Analysis, analyze
from compressor.engine.cost import ModelCost, view_cost
from compressor.deploy.precision import PrecisionOptions, check_precision_request, convert_precision
from compressor.calibration.pipeline import calibration_report, open_calibration, reference_with_refits, split_held_out
from compressor.calibration.planning import CALIBRATION_OPTIONS, calibrated_plan, measured_importance
from compressor.calibration.reconstruct import reconstruct as refit_layers
from compressor.errors import CompressorError, VerificationError
from compressor.files import write_model
from compressor.engine.graph import GraphView
from compressor.latency import LATENCY_OPTIONS, LatencyRequest, check_latency, flag_note, plan_for_latency, resolve_request
from compressor.latency.request import in_precision
from compressor.engine.plan import Plan, PlanOptions
from compressor.engine.shapes import infer_shapes
from compressor.engine.surgery import apply_plan, zeroed_reference
from compressor.engine.verify import check_model, verify

Progress = Callable[[str], None]
VERIFY_CALIB_SAMPLES = 4  # calibration samples verification adds to its seeded inputs


@dataclass
class CompressResult:
    """The compressed model, its report and the plan that produced it."""

    model: onnx.ModelProto
    report: dict
    plan: Plan
    analysis: Analysis
    timings: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model atomically (temp file, then rename); large models get an external data file."""
        return save_model(self.model, path)


def save_model(proto: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write `proto` to `path` atomically; nothing is left behind on failure."""
    return write_model(proto, path)


@contextmanager
def _stage(timings: dict[str, float], name: str, progress: Progress | None):
    if progress:
        progress(name)
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 4)


def _cost_of(proto: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> ModelCost:
    return view_cost(GraphView(proto, infer_shapes(proto, input_shapes)))


def compress_options(ratio: float | None = 0.5, *, target: str = "macs", round_to: int = 1, min_channels: int = 1,
                     exclude=(), seed: int = 0, method_options: dict | None = None, device: str | None = None,
                     batch: int | None = None, latency_ms: float | None = None, profile_budget: float | None = None
                     ) -> tuple[PlanOptions, LatencyRequest | None]:
    """The plan options and (for target="latency") the validated latency request, from the CLI's spelling: remove
    `ratio` of `target` (macs, params or latency); latency: measured on `device` (cuda[:N] or cpu:T) at `batch`,
    or meet `latency_ms` (which wins over ratio), profiling for at most `profile_budget` seconds."""
    latency = resolve_request(target, ratio, device, batch, latency_ms, profile_budget)
    options = PlanOptions(ratio, target, round_to, min_channels, tuple(exclude or ()), seed, dict(method_options or {}))
    return options, latency


def compress(model, method: str = "l1", ratio: float | None = 0.5, *, options: PlanOptions | None = None,
             latency: LatencyRequest | None = None, input_shapes: dict[str, list[int]] | None = None,
             verify: bool = True, inputs=None, progress: Progress | None = None, precision: str = "fp32",
             precision_calib=None, precision_options: PrecisionOptions | None = None, calib=None, calib_options=None,
             reconstruct: bool | None = None, **keywords) -> CompressResult:
    """Compress `model` (a path or an onnx.ModelProto) with a registered method.

    What to remove comes as `options` (PlanOptions) and, for target="latency", `latency` (a LatencyRequest), as
    the CLI builds them with `compress_options`; or, for short calls, as `ratio` and compress_options' keywords
    (target, round_to, min_channels, exclude, seed, method_options, device, batch, latency_ms, profile_budget).
    Raises CompressorError on bad input and VerificationError when the result does not match its reference.
    With a latency request the method supplies the importance, compressor.latency the cost, and the report's
    "latency" section holds predicted vs measured latency. `inputs` (optional): an iterable of {input name: array}
    dicts, e.g. real images, on which verification compares the result with its reference in addition to the
    seeded random inputs.
    precision="fp16"|"int8" converts the verified fp32 result (compressor.deploy.precision) and reports its agreement
    with fp32 on `precision_calib` (a .npy/.npz path, a calibration set or a list of feed dicts; default: `inputs`),
    which int8 needs for its activation ranges; with a latency request, latency is measured in that precision.
    `calib` (an image folder, a .npy or .npz path, or a CalibrationSet; read with `calib_options`, a
    CalibrationOptions) is calibration data: the plan is calibrated (compressor.calibration.planning), `reconstruct`
    (default: on with calib) refits the layers consuming removed channels, int8 takes its ranges from it unless
    `precision_calib` is given, and the report's "calibration" section holds per-layer errors and the held-out
    agreement with the original.
    """
    start = time.perf_counter()
    timings: dict[str, float] = {}
    entry = methods.get(method)
    if inputs is not None and iter(inputs) is inputs:  # a one-shot iterator serves verification and precision
        inputs = list(inputs)
    precision_calib = inputs if precision_calib is None else precision_calib
    check_precision_request(precision, precision_calib is not None or calib is not None)
    if reconstruct and calib is None:
        raise CompressorError("--reconstruct needs calibration data (--calib)")
    if options is None:
        try:
            options, latency = compress_options(ratio, **keywords)
        except TypeError as exc:
            raise CompressorError(f"compress: {exc}") from exc
    elif keywords:
        raise CompressorError(f"compress: give options= or keywords ({', '.join(sorted(keywords))}), not both")
    methods.check_options(method, options.extra, (LATENCY_OPTIONS if latency is not None else ())
                          + (CALIBRATION_OPTIONS if calib is not None else ()))
    latency = in_precision(latency, precision, precision_options)
    if latency is None:
        options.validate(needs_ratio=entry.needs_ratio)
    else:
        replace(options, target="macs").validate(needs_ratio=latency.latency_ms is None)
    with _stage(timings, "analyze", progress):
        analysis = analyze(model, input_shapes)
    original_bytes = analysis.proto.ByteSize()
    calib_set = calib_fit = calib_held = None
    if calib is not None:
        with _stage(timings, "calibration data", progress):
            calib_set = open_calibration(calib, analysis, calib_options)
            calib_fit, calib_held = split_held_out(calib_set)
            options = replace(options, calibration=calib_fit)  # for methods that read data (graph-rw rw_features=calib)
            if inputs is None:  # verification also runs on a few real samples, held out when there are any
                inputs = list(islice((calib_held or calib_fit).batches(1), VERIFY_CALIB_SAMPLES))
    with _stage(timings, "plan", progress):
        calibrated = calib_fit is not None and not entry.exact
        measured = measured_importance(analysis, method, options, calib_fit, reconstruct is not False, progress) \
            if calibrated and latency is not None else None
        planned = None if latency is None else plan_for_latency(analysis, method, options, latency, progress, measured)
        if planned is None and calibrated:
            plan = calibrated_plan(analysis, method, options, calib_fit, reconstruct is not False, progress)
        else:
            plan = entry.plan(analysis, options) if planned is None else planned.plan
    if plan.is_empty() and not entry.exact:
        raise CompressorError("nothing prunable: the plan removes no channel and no block")
    with _stage(timings, "surgery", progress):
        result = apply_plan(analysis, plan)
    pruned, reconstruction = result, None
    if calib_set is not None and reconstruct is not False:
        with _stage(timings, "reconstruct", progress):
            reconstruction = refit_layers(analysis, plan, pruned, calib_fit, progress)
            result = reconstruction.model
    verification = None
    if verify:
        with _stage(timings, "verify", progress):
            exact = entry.exact and not (reconstruction and reconstruction.refits)
            reference = None if exact else reference_with_refits(zeroed_reference(analysis, plan), analysis, plan,
                                                                 reconstruction)
            verification = _run_verification(analysis, reference, result, inputs)
    else:
        with _stage(timings, "check", progress):
            check_model(result, analysis.input_shapes)
    with _stage(timings, "report", progress):
        after = _cost_of(result, analysis.input_shapes)
        report = build_report(analysis, plan, options, method, after, original_bytes, result.ByteSize(), verification)
    if calib_set is not None:
        with _stage(timings, "calibration report", progress):
            report["calibration"] = calibration_report(calib_set, calib_fit, calib_held, calib, analysis.proto, pruned,
                                                       reconstruction)
    if planned is not None:
        with _stage(timings, "latency check", progress):
            report["latency"] = {**planned.info, **check_latency(analysis.proto, result, planned, latency,
                                                                 analysis.input_shapes)}
            report["notes"] += [n for n in [flag_note(report["latency"])] if n]
    if precision != "fp32":
        with _stage(timings, f"precision {precision}", progress):
            stage_options = replace(precision_options or PrecisionOptions(), input_shapes=analysis.input_shapes)
            precision_data = calib_fit if precision_calib is None else precision_calib
            result, report["precision"] = convert_precision(result, precision, precision_data, stage_options)
        report["bytes_after"] = result.ByteSize()
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["stage_seconds"] = timings
    return CompressResult(result, report, plan, analysis, timings)


def _run_verification(analysis: Analysis, reference, result, inputs=None):
    outcome = verify(analysis.proto, reference, result, analysis.input_shapes, inputs=inputs)
    if not outcome.passed:
        raise VerificationError(
            f"verification failed: relative error {outcome.relative_error_vs_reference:.3g} against the reference "
            f"exceeds the tolerance {outcome.relative_tolerance:.3g} (float32 noise of this model "
            f"{outcome.runtime_noise:.2g}); nothing written (this is a bug: please report the model)"
        )
    return outcome


def build_report(analysis: Analysis, plan: Plan, options: PlanOptions, method: str, after: ModelCost,
                 bytes_before: int, bytes_after: int, verification) -> dict:
    """The JSON-ready report of one compression."""
    groups = []
    for group in analysis.groups:
        removed = plan.removed.get(group.index, np.zeros(0, dtype=np.int64))
        entry = {
            "name": group.name,
            "channels_before": group.size,
            "channels_after": group.size - len(removed),
            "prunable": int(group.prunable.sum()),
        }
        entry.update({k: _jsonable(v) for k, v in plan.group_info.get(group.index, {}).items()})
        groups.append(entry)
    macs_planned, params_planned = analysis.cost(plan)
    return {
        "method": method,
        "ratio": options.ratio,
        "target": options.target,
        "round_to": options.round_to,
        "min_channels": options.min_channels,
        "exclude": list(options.exclude),
        "seed": options.seed,
        "method_options": {k: _jsonable(v) for k, v in options.extra.items()},
        "input_shapes": analysis.input_shapes,
        "macs_before": analysis.macs,
        "macs_after": after.macs,
        "macs_planned": macs_planned,
        "macs_reduction": round(1 - after.macs / analysis.macs, 6) if analysis.macs else 0.0,
        "params_before": analysis.params_total,
        "params_after": after.params,
        "params_planned": params_planned,
        "params_reduction": round(1 - after.params / analysis.params_total, 6) if analysis.params_total else 0.0,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "verified": verification.passed if verification else False,
        "relative_error_vs_reference": verification.relative_error_vs_reference if verification else None,
        "relative_tolerance": verification.relative_tolerance if verification else None,
        "runtime_noise": verification.runtime_noise if verification else None,
        "relative_error_vs_original": verification.relative_error_vs_original if verification else None,
        "verification_inputs": verification.inputs if verification else None,
        "verification_outputs": [vars(c) for c in verification.outputs] if verification else [],
        "groups_total": len(analysis.groups),
        "groups_pruned": sum(1 for g in groups if g["channels_after"] < g["channels_before"]),
        "groups": groups,
        "blocks_total": len(analysis.blocks),
        "blocks_removed": [analysis.blocks[b].name for b in sorted(plan.dropped_blocks)],
        "notes": list(plan.notes),
        "layers": [vars(layer) for layer in after.layers],
    }


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class Inspection:
    """What `compress inspect` shows: groups, blocks and the per-layer cost table."""

    analysis: Analysis
    cost: ModelCost

    def to_dict(self) -> dict:
        """JSON-ready form."""
        a = self.analysis
        return {
            "macs": self.cost.macs,
            "params": self.cost.params,
            "groups": [
                {"index": g.index, "name": g.name, "channels": g.size, "prunable": int(g.prunable.sum()),
                 "producers": g.producers, "blocked_reason": g.blocked_reason}
                for g in a.groups
            ],
            "blocks": [{"index": b.index, "name": b.name, "join": b.join, "nodes": len(b.nodes), "macs": b.macs,
                        "zero": b.zero} for b in a.blocks],
            "layers": [vars(layer) for layer in self.cost.layers],
        }


def inspect(model, input_shapes: dict[str, list[int]] | None = None) -> Inspection:
    """Analyze a model (path or ModelProto) without changing it."""
    analysis = analyze(model, input_shapes)
    return Inspection(analysis, view_cost(analysis.view))

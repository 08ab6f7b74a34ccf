"""What a latency-targeted compression asks for: device, batch, budget, profiling limits; validated up front."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from compressor.errors import CompressorError

if TYPE_CHECKING:
    from compressor.deploy.precision import PrecisionOptions

LATENCY_TARGET = "latency"
LATENCY_PRECISIONS = ("fp32", "fp16", "int8")
INT8_TYPE_TAGS = {"uint8": "u8", "int8": "s8"}


@dataclass(frozen=True)
class ProfileSettings:
    """How each micro-model and the whole model are timed (medians of timed runs after a warm-up).

    The number of timed runs adapts to the layer: enough to fill about `seconds_per_point` of timing, between
    `min_runs` and `max_runs`. `max_level` bounds the table refinement (see grid.py). The whole network
    is timed for about `calibration_seconds` (`calibration_runs` to 10x as many runs). The closed loop of the
    planner measures up to `loop_iterations` candidate networks against the original (`check_warmup`/`check_runs`),
    then, with `aligned_baseline`, the method's MAC-targeted plan at the probed alignment and the same MACs
    (baseline.py), kept instead when it is the better of the two.
    """

    warmup: int = 3
    min_runs: int = 5
    max_runs: int = 40
    seconds_per_point: float = 0.15
    calibration_runs: int = 10
    calibration_seconds: float = 1.0
    max_level: int = 3
    loop_iterations: int = 4  # candidates the closed loop measures at most (0: plan from the latency model alone)
    table_share: float = 0.75  # with the loop on, the most of --profile-budget the table may use (loop_budget.py)
    check_warmup: int | None = None  # each side-by-side measurement (None: 50 on GPUs, 3 on CPUs) ...
    check_runs: int | None = None  # ... (None: 300 on GPUs in 10 rounds, 20 on CPUs in 5; check.py)
    aligned_baseline: bool = True  # the closed loop also measures the aligned MAC baseline and keeps it when better


@dataclass(frozen=True)
class LatencyRequest:
    """A validated `--target latency` request.

    target: a compressor.runtime.targets.Target (cuda:N or cpu:T); batch: the deployed batch size; ratio: fraction of the
    measured latency to remove, or latency_ms: an absolute budget (which wins when both are given);
    profile_budget_s: a bound on profiling time (None: no bound) — the network, its skeleton and every layer at
    full width are always timed, the alignment probe and the width sweeps only while the budget lasts (layers left
    unswept follow a prior fitted on the others); cache_dir: where the latency table is cached (None:
    $COMPRESSOR_CACHE/latency or ~/.cache/compressor/latency).
    """

    target: object
    batch: int = 1
    ratio: float | None = 0.5
    latency_ms: float | None = None
    profile_budget_s: float | None = None
    cache_dir: str | os.PathLike | None = None
    settings: ProfileSettings = field(default_factory=ProfileSettings)
    precision: str = "fp32"  # fp16, int8: tables, network and candidates are timed as converted models (timed.py)
    conversion: PrecisionOptions | None = None  # fp16, int8: the product's conversion settings (None: the defaults)

    @property
    def copies(self) -> int:
        """Side-by-side copies per micro-model: 3 on GPUs at small batches, where a layer's kernel overlaps the
        next launch inside a network and a lone kernel would be timed with its launch in series; else 1."""
        return 3 if self.target.on_gpu and self.batch <= 4 else 1

    def conversion_options(self) -> PrecisionOptions:
        """The fp16 or int8 conversion settings the timed models are converted with (the product's)."""
        from compressor.deploy.precision import PrecisionOptions

        return self.conversion or PrecisionOptions()

    @property
    def timed_precision(self) -> str:
        """The precision the models are timed in, with the settings that change the timed models (int8: activation
        and weight types, per-channel; fp16: fp16 I/O, op types kept fp32; both: exclusions): part of the latency
        cache's context. Default fp16 settings read plain "fp16"."""
        if self.precision not in ("fp16", "int8"):
            return self.precision
        options = self.conversion_options()
        if self.precision == "fp16":
            label = "fp16" + ("" if options.keep_io_types else "-fp16io")
            label += f"-fp32ops-{','.join(sorted(set(options.fp32_ops)))}" if options.fp32_ops else ""
        else:
            tags = (INT8_TYPE_TAGS.get(options.activation_type, options.activation_type),
                    INT8_TYPE_TAGS.get(options.weight_type, options.weight_type))
            label = f"int8-{''.join(tags)}-{'per-channel' if options.per_channel else 'per-tensor'}"
        return label + (f"-exclude-{','.join(options.exclude)}" if options.exclude else "")

    def to_dict(self) -> dict:
        """JSON-ready form for reports."""
        return {"device": self.target.label, "batch": self.batch, "ratio": None if self.latency_ms else self.ratio,
                "latency_ms": self.latency_ms, "profile_budget_s": self.profile_budget_s, "precision": self.precision,
                "timed_as": self.timed_precision}


def resolve_request(target: str, ratio: float | None, device: str | None, batch: int | None, latency_ms: float | None,
                    profile_budget: float | None, cache_dir=None, settings: ProfileSettings | None = None
                    ) -> LatencyRequest | None:
    """The LatencyRequest for target 'latency' (None for other targets); CompressorError for bad or misplaced
    options. device defaults to cuda when this onnxruntime has it, else cpu:1; batch defaults to 1."""
    from compressor.runtime.targets import check_provider_available, default_targets, parse_target

    from compressor.engine.plan import TARGETS

    if target not in (*TARGETS, LATENCY_TARGET):
        raise CompressorError(f"--target must be one of {', '.join((*TARGETS, LATENCY_TARGET))}, got '{target}'")
    given = [name for name, value in (("--device", device), ("--batch", batch), ("--latency-ms", latency_ms),
                                      ("--profile-budget", profile_budget)) if value is not None]
    if target != LATENCY_TARGET:
        if given:
            raise CompressorError(f"{', '.join(given)} only apply with --target latency (got --target {target})")
        return None
    parsed = parse_target(device) if device is not None else default_targets()[0]
    if parsed.kind not in ("cuda", "cpu"):
        raise CompressorError(f"--target latency profiles on cuda[:N] or cpu:T, not '{parsed.label}'")
    check_provider_available(parsed)
    batch = 1 if batch is None else batch
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise CompressorError(f"--batch must be a positive integer, got {batch}")
    if latency_ms is not None:
        if not isinstance(latency_ms, (int, float)) or not math.isfinite(latency_ms) or latency_ms <= 0:
            raise CompressorError(f"--latency-ms must be a positive number of milliseconds, got {latency_ms}")
    elif ratio is None or not 0.0 < ratio < 1.0:
        raise CompressorError(f"--target latency needs --ratio in (0, 1) or --latency-ms, got ratio {ratio}")
    if profile_budget is not None and (not math.isfinite(profile_budget) or profile_budget <= 0):
        raise CompressorError(f"--profile-budget must be a positive number of seconds, got {profile_budget}")
    return LatencyRequest(parsed, batch, ratio, None if latency_ms is None else float(latency_ms),
                          None if profile_budget is None else float(profile_budget), cache_dir,
                          settings or ProfileSettings())


def in_precision(request: LatencyRequest | None, precision: str, conversion: PrecisionOptions | None = None
                 ) -> LatencyRequest | None:
    """The request for a model deployed in `precision` (its latency tables, network and candidates are timed in
    it, converted with `conversion`, the product's settings); CompressorError for int8 on a GPU."""
    if request is None:
        return request
    if precision not in LATENCY_PRECISIONS:
        raise CompressorError(f"--target latency measures {', '.join(LATENCY_PRECISIONS)} models, not {precision}")
    if precision == "int8" and request.target.on_gpu:
        raise CompressorError(f"--target latency --precision int8 times int8 models on cpu:T only, not "
                              f"{request.target.label}: ONNX Runtime's CUDA execution provider does not run QDQ int8 "
                              "convolutions fast (use --device cpu:T, or --precision fp16 on cuda)")
    return replace(request, precision=precision, conversion=conversion if precision != "fp32" else None)

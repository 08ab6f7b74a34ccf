"""Where a model runs: cpu:T, cuda[:N] or tensorrt[:N], and whether this onnxruntime build can run it there."""

from __future__ import annotations

import re
from dataclasses import dataclass

from compressor.errors import CompressorError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
# Where IOBinding keeps inputs and outputs; CPU sessions take numpy feeds, as a deployed CPU service would.
IO_DEVICE = {"cuda": "cuda", "tensorrt": "cuda"}

_TARGET_PATTERN = re.compile(r"^(cpu|cuda|tensorrt)(?::(\d+))?$")
# Execution provider options a target may set (`cuda,prefer_nhwc=1,use_tf32=0`); CUDA graphs have --cuda-graph.
PROVIDER_OPTIONS = {
    "cuda": {"prefer_nhwc", "use_tf32", "cudnn_conv_algo_search", "cudnn_conv_use_max_workspace",
             "cudnn_conv1d_pad_to_nc1d", "do_copy_in_default_stream"},
    "tensorrt": {"trt_fp16_enable", "trt_int8_enable", "trt_engine_cache_enable", "trt_engine_cache_path",
                 "trt_builder_optimization_level", "trt_max_workspace_size"},
    "cpu": set(),
}


@dataclass(frozen=True)
class Target:
    """Where a model runs: `kind` cpu|cuda|tensorrt, the GPU `device_id`, or the CPU intra-op `threads`, and the
    provider `options` that differ from the defaults (they are part of the label, so one run can compare them)."""

    kind: str
    device_id: int = 0
    threads: int | None = None
    options: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        """Canonical spelling, e.g. cuda:0, cpu:4, tensorrt:0, cuda:0,prefer_nhwc=1."""
        base = f"cpu:{self.threads}" if self.kind == "cpu" else f"{self.kind}:{self.device_id}"
        return ",".join([base, *(f"{key}={value}" for key, value in self.options)])

    @property
    def provider(self) -> str:
        """The ONNX Runtime execution provider that must run the model's nodes."""
        return PROVIDERS[self.kind]

    @property
    def on_gpu(self) -> bool:
        """True for cuda and tensorrt targets."""
        return self.kind != "cpu"

    def __str__(self) -> str:
        return self.label


def parse_target(text: str) -> Target:
    """Parse `cuda`, `cuda:N`, `cpu:T` (T >= 1 intra-op threads), `tensorrt` or `tensorrt:N` into a Target, with
    optional provider options after commas: `cuda,prefer_nhwc=1,use_tf32=0`."""
    spelled, *settings = [part.strip() for part in str(text).strip().split(",")]
    match = _TARGET_PATTERN.match(spelled.lower())
    if not match:
        raise CompressorError(f"bad target '{text}': use cuda, cuda:N, cpu:T (T threads, e.g. cpu:1) or tensorrt")
    kind, number = match.group(1), match.group(2)
    options = []
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or key not in PROVIDER_OPTIONS[kind]:
            allowed = ", ".join(sorted(PROVIDER_OPTIONS[kind])) or "none"
            raise CompressorError(f"bad target option '{setting}' for {kind} (KEY=VALUE with KEY one of: {allowed})")
        options.append((key, value))
    if kind == "cpu":
        if number is None or int(number) < 1:
            raise CompressorError(f"bad target '{text}': a CPU target needs a thread count of at least 1, e.g. cpu:1 or cpu:4")
        return Target("cpu", threads=int(number))
    return Target(kind, device_id=int(number or 0), options=tuple(options))


def default_targets() -> list[Target]:
    """[cuda:0] when this onnxruntime has the CUDA provider, else [cpu:1]."""
    import onnxruntime as ort

    return [Target("cuda")] if PROVIDERS["cuda"] in ort.get_available_providers() else [Target("cpu", threads=1)]


def check_provider_available(target: Target) -> None:
    """Raise a CompressorError when this onnxruntime build lacks the provider the target needs."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if target.provider not in available:
        hint = " (install onnxruntime-gpu instead of onnxruntime)" if target.on_gpu else ""
        raise CompressorError(
            f"target {target}: {target.provider} is not available in onnxruntime {ort.__version__}{hint}; "
            f"available: {', '.join(available)}"
        )


def checked_targets(texts: list[str]) -> list[Target]:
    """Parse target strings and check this onnxruntime build can run each one (before any work starts)."""
    targets = [parse_target(t) for t in texts]
    for target in targets:
        check_provider_available(target)
    return targets

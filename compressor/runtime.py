"""ONNX Runtime sessions for verification and shape probing (CPU execution provider)."""

from __future__ import annotations

import onnx

from compressor.errors import CompressorError


def cpu_session(proto: onnx.ModelProto, threads: int = 0, optimization: str = "basic"):
    """An ONNX Runtime CPU session for an in-memory model; `optimization` is ORT's graph optimization level:
    "disable", "basic" or "all"."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise CompressorError(
            "onnxruntime is not installed: pip install 'compressor[cpu]' (or '[gpu]' for onnxruntime-gpu)"
        ) from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options.graph_optimization_level = levels[optimization]
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CompressorError(f"ONNX Runtime cannot load the model: {first}") from exc

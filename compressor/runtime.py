"""ONNX Runtime sessions for verification and shape probing (CPU execution provider)."""

from __future__ import annotations

import onnx

from compressor.errors import CompressorError


def cpu_session(proto: onnx.ModelProto, threads: int = 0, spinning: bool = True):
    """An ONNX Runtime CPU session for an in-memory model (spinning=False: idle threads sleep, for busy machines)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise CompressorError(
            "onnxruntime is not installed: pip install 'compressor[cpu]' (or '[gpu]' for onnxruntime-gpu)"
        ) from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CompressorError(f"ONNX Runtime cannot load the model: {first}") from exc

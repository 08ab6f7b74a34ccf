"""compressor: ONNX-native structured compression for convolutional networks.

    import compressor
    result = compressor.compress("model.onnx", method="l1", ratio=0.5)
    result.save("model.slim.onnx"); print(result.report["macs_after"])

Stages and folders: engine/ (load → analyze → plan → surgery → verify), methods/, latency/, runtime/ (ONNX
Runtime), training/ (PyTorch); see compressor/README.md.
"""

from compressor.api import CompressResult, Inspection, compress, inspect, save_model
from compressor.errors import CompressorError, VerificationError

__all__ = ["CompressResult", "CompressorError", "Inspection", "VerificationError", "compress", "inspect", "save_model"]
__version__ = "0.1.0"

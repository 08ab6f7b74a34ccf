"""Calibration: data loading, activation taps, data-aware planning and layer reconstruction (issue 15).

Nothing here imports torch: calibration runs on ONNX Runtime and NumPy (images are decoded with Pillow).
"""

from compressor.calibration.data import CalibrationOptions, CalibrationSet, load_calibration
from compressor.calibration.taps import TapSession, prefix_model, stream_tensors

__all__ = ["CalibrationOptions", "CalibrationSet", "TapSession", "load_calibration", "prefix_model", "stream_tensors"]

"""Deployment: reduced precision after compression and Triton model repositories.

- `precision.convert_precision(proto, precision, calib_batches, options)`: the last stage of `compress` — fp16
  (ONNX Runtime's float16 converter) or int8 QDQ (onnxruntime.quantization), compared with the fp32 model on real or
  seeded inputs, refused above a documented error threshold.
- `triton_repo.write_triton_repository(model, repo, ...)`: a validated Triton model repository (config.pbtxt checked
  with Triton's own protobuf), written atomically and loaded back with ONNX Runtime.
"""

from compressor.deploy.precision import PRECISIONS, PrecisionOptions, convert_precision, model_precision

__all__ = ["PRECISIONS", "PrecisionOptions", "convert_precision", "model_precision"]

"""How close compressed models stay to the original on held-out calibration samples: top-1 agreement and relative
logit error of the first graph output."""

from __future__ import annotations

import numpy as np
import onnx

from compressor.calibration.data import CalibrationSet
from compressor.calibration.taps import TapSession


def first_outputs(proto: onnx.ModelProto, samples: CalibrationSet, batch_size: int | None = None) -> np.ndarray:
    """The first graph output of `proto` over `samples`, concatenated (one session, released afterwards)."""
    session = TapSession(proto, [proto.graph.output[0].name])
    return np.concatenate([session.run(feed)[session.names[0]] for feed in samples.batches(batch_size)])


def agreement(original: onnx.ModelProto, models: dict[str, onnx.ModelProto], held_out: CalibrationSet,
              batch_size: int | None = None) -> dict:
    """Per named model: top-1 agreement with the original (argmax of the last axis of the first output, when it has
    more than one class) and relative error ‖y − y_original‖ / ‖y_original‖, over `held_out`. The models run one
    after the other, so one session's memory is held at a time."""
    y = first_outputs(original, held_out, batch_size).astype(np.float64)
    classes = y.shape[-1] if y.ndim >= 2 else 0
    result = {"samples": held_out.count, "output": original.graph.output[0].name}
    norm = max(float(np.sum(y ** 2)), 1e-30)
    for key, proto in models.items():
        out = first_outputs(proto, held_out, batch_size).astype(np.float64)
        top1 = None
        if classes > 1:
            top1 = round(float(np.mean(out.reshape(-1, classes).argmax(axis=1) == y.reshape(-1, classes).argmax(axis=1))), 6)
        result[key] = {"top1_agreement": top1,
                       "relative_error": float(f"{np.sqrt(float(np.sum((out - y) ** 2)) / norm):.6g}")}
    return result

"""How close compressed models stay to the original on held-out calibration samples: top-1 agreement and relative
logit error of the first graph output."""

from __future__ import annotations

import numpy as np
import onnx

from compressor.calibration.data import CalibrationSet
from compressor.calibration.taps import TapSession


def agreement(original: onnx.ModelProto, models: dict[str, onnx.ModelProto], held_out: CalibrationSet,
              batch_size: int | None = None) -> dict:
    """Per named model: top-1 agreement with the original (argmax of the last axis of the first output, when it has
    more than one class) and relative error ‖y − y_original‖ / ‖y_original‖, over `held_out`."""
    name = original.graph.output[0].name
    reference = TapSession(original, [name])
    sessions = {key: TapSession(proto, [proto.graph.output[0].name]) for key, proto in models.items()}
    agree = {key: 0 for key in models}
    diff = {key: 0.0 for key in models}
    norm = 0.0
    total = 0
    classes = 0
    for feed in held_out.batches(batch_size):
        y = reference.run(feed)[name].astype(np.float64)
        norm += float(np.sum(y ** 2))
        classes = y.shape[-1] if y.ndim >= 2 else 0
        rows = y.reshape(-1, classes) if classes > 1 else None
        total += len(rows) if rows is not None else 0
        for key, session in sessions.items():
            out = session.run(feed)[session.names[0]].astype(np.float64)
            diff[key] += float(np.sum((out - y) ** 2))
            if rows is not None:
                agree[key] += int(np.sum(out.reshape(-1, classes).argmax(axis=1) == rows.argmax(axis=1)))
    result = {"samples": held_out.count, "output": name}
    for key in models:
        result[key] = {
            "top1_agreement": round(agree[key] / total, 6) if total else None,
            "relative_error": float(f"{np.sqrt(diff[key] / max(norm, 1e-30)):.6g}"),
        }
    return result

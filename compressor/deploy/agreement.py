"""How far a reduced-precision model strays from its fp32 model: relative output error and top-1 agreement.

Both models run with ONNX Runtime on the CPU with all graph optimizations (the int8 QDQ fusions included, as a
deployment runs them) on the same feeds. For every output, the relative error is ||y - y_fp32|| / ||y_fp32|| over
all compared samples (Frobenius norms, so it is relative to the output's own scale); outputs shaped [N, C] with
C >= 2 (logits, probabilities) also get the fraction of samples whose arg-max class is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx

from compressor.runtime.sessions import cpu_session


@dataclass
class Agreement:
    """The comparison of a converted model with its fp32 model on `samples` samples."""

    samples: int
    inputs: str  # "calibration" (real inputs) or "seeded random"
    relative_error: dict[str, float] = field(default_factory=dict)
    top1_agreement: dict[str, float] = field(default_factory=dict)

    @property
    def worst_relative_error(self) -> float:
        """The largest relative error over all outputs."""
        return max(self.relative_error.values(), default=0.0)

    @property
    def worst_top1_agreement(self) -> float | None:
        """The smallest top-1 agreement over the classification outputs (None when there is none)."""
        return min(self.top1_agreement.values(), default=None)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"samples": self.samples, "inputs": self.inputs, "relative_error": self.relative_error,
                "top1_agreement": self.top1_agreement, "worst_relative_error": self.worst_relative_error,
                "worst_top1_agreement": self.worst_top1_agreement}


def compare_models(reference: onnx.ModelProto, converted: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]],
                   inputs: str) -> Agreement:
    """Run both models on every feed and measure the relative output error and top-1 agreement per output."""
    ref_session = cpu_session(reference, optimization="all")
    new_session = cpu_session(converted, optimization="all")
    names = [o.name for o in ref_session.get_outputs()]
    ref_out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    new_out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    new_types = {i.name: np.float16 if i.type == "tensor(float16)" else None for i in new_session.get_inputs()}
    samples = 0
    for feed in feeds:
        cast = {k: v.astype(new_types[k]) if new_types.get(k) else v for k, v in feed.items()}  # fp16 inputs
        for name, a, b in zip(names, ref_session.run(names, feed), new_session.run(names, cast)):
            ref_out[name].append(np.asarray(a, dtype=np.float64))
            new_out[name].append(np.asarray(b, dtype=np.float64))
        samples += len(next(iter(feed.values())))
    result = Agreement(samples=samples, inputs=inputs)
    for name in names:
        ref, new = np.concatenate([a.reshape(len(a), -1) if a.ndim else a.reshape(1, 1) for a in ref_out[name]]), \
            np.concatenate([b.reshape(len(b), -1) if b.ndim else b.reshape(1, 1) for b in new_out[name]])
        result.relative_error[name] = relative_error(new, ref)
        if ref_out[name][0].ndim == 2 and ref.shape[1] >= 2:
            result.top1_agreement[name] = float(np.mean(ref.argmax(axis=1) == new.argmax(axis=1)))
    return result


def relative_error(values: np.ndarray, reference: np.ndarray) -> float:
    """||values - reference|| / ||reference|| (inf for mismatched shapes or non-finite values; 0 for two zeros)."""
    if values.shape != reference.shape or not np.all(np.isfinite(values)):
        return float("inf")
    scale = float(np.linalg.norm(reference))
    diff = float(np.linalg.norm(values - reference))
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))

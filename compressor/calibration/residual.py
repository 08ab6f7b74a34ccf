"""Residual compensation: a layer whose output reaches a residual Add through per-channel affine ops (BatchNorm,
Mul/Div/Add/Sub by constants) is refitted to make the Add's output match the original, not only its own output.

With z = a·y + b added to a skip s, matching z_pruned + s_pruned to z_original + s_original asks the layer for
y_original + (s_original − s_pruned) / a: the branch also absorbs what earlier pruning did to the skip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from compressor.calibration.layers import LinearLayer, initializer_value
from compressor.engine.graph import attr

AFFINE_CONSTANT_OPS = ("Mul", "Div", "Add", "Sub")


@dataclass
class SkipTarget:
    """The skip input of the residual Add a layer feeds (names in the pruned and the original model) and the
    per-channel factor from the layer's output to the Add."""

    skip: str
    skip_original: str
    scale: np.ndarray


def find_skip(model: onnx.ModelProto, original: onnx.ModelProto, layer: LinearLayer) -> SkipTarget | None:
    """The SkipTarget of `layer` in the pruned `model`, or None when its output does not reach an Add that way."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    tensor, scale = layer.output, np.ones(1)
    for _ in range(8):
        users = consumers.get(tensor, [])
        if len(users) != 1 or tensor in outputs:
            return None
        node = users[0]
        others = [i for i in node.input if i and i != tensor]
        if node.op_type == "BatchNormalization" and node.input[0] == tensor and all(i in inits for i in others):
            gamma, var = initializer_value(model, node.input[1]), initializer_value(model, node.input[4])
            scale = scale * (gamma / np.sqrt(var + attr(node, "epsilon", 1e-5))).astype(np.float64)
        elif node.op_type in AFFINE_CONSTANT_OPS and len(others) == 1 and others[0] in inits:
            if node.op_type in ("Mul", "Div"):
                factor = initializer_value(model, others[0]).astype(np.float64).reshape(-1)
                if node.op_type == "Div" and node.input[1] != others[0] or not np.all(factor):
                    return None
                scale = scale * (factor if node.op_type == "Mul" else 1.0 / factor)
            elif node.op_type == "Sub" and node.input[0] != tensor:
                return None
        elif node.op_type == "Add" and len(others) == 1 and others[0] not in inits:
            return _skip_target(original, node, others[0], scale)
        else:
            return None
        tensor = node.output[0]
    return None


def _skip_target(original: onnx.ModelProto, add: onnx.NodeProto, skip: str, scale: np.ndarray) -> SkipTarget | None:
    twin = next((n for n in original.graph.node if n.name == add.name and n.op_type == "Add"), None)
    if twin is None:
        return None
    slot = list(add.input).index(skip)
    if np.any(np.abs(scale) < 1e-6 * max(float(np.max(np.abs(scale))), 1e-30)):
        return None
    return SkipTarget(skip, twin.input[slot], scale)


def compensated_target(y_original: np.ndarray, skip_original: np.ndarray, skip_pruned: np.ndarray,
                       keep: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray | None:
    """y_original + (skip_original − skip_pruned) / scale on the kept channels (None when shapes disagree)."""
    if len(keep):
        skip_original = np.compress(keep, skip_original, axis=axis)
    if skip_original.shape != skip_pruned.shape or skip_original.shape != y_original.shape:
        return None
    if scale.size not in (1, y_original.shape[axis]):
        return None
    shape = [1] * y_original.ndim
    shape[axis] = -1
    factor = scale.reshape(shape) if scale.size > 1 else scale.reshape([1] * y_original.ndim)
    return y_original + (skip_original.astype(np.float64) - skip_pruned) / factor

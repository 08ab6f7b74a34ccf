"""Channel feature maps over calibration data: one vector per channel unit, for methods that build their graph on
activations instead of weights (graph-rw `rw_features=calib`).

A unit's feature map is what the layers consuming it read: for every supported mixing layer reading the group
(dense Conv, Gemm, MatMul: calibration/importance.find_consumers, the same consumers the data scores use), the
unit's channel(s) of that layer's input tensor, at seeded sampled positions (a Conv's rows are (image, y, x)
positions, a Gemm's rows are images), over the calibration images. The vectors of all the group's consumers are
concatenated, so a residual-stream unit is described at every depth it is read. The total length per unit is bounded
by `dim` (split evenly over the consumers), so the graph's cost does not grow with the data.

Centring: every (consumer, channel slot) block is centred on its mean over the sampled rows. A constant part of an
activation is not information the next layer needs from that channel (a bias absorbs it: the reconstruction and the
fine-tune both can), and post-ReLU activations share a large positive mean that would otherwise make every channel
"explain" every other. A channel that is constant over the data (a dead ReLU) becomes a zero vector: no edges.
Scaling to unit norm is left to the caller (graph-rw's scale-invariant regression): the channels' scales are arbitrary
after BatchNorm folding (the next layer's weights compensate), and regression edges scale as ‖x_i‖/‖x_j‖.

Nothing here imports torch; the model runs in ONNX Runtime through calibration/taps.stream_tensors.
"""

from __future__ import annotations

import numpy as np

from compressor.calibration.importance import Consumer, find_consumers
from compressor.calibration.taps import stream_tensors

FEATURE_DIM = 2048  # values per unit, over all the group's consumers
_LAST: list = []  # one cached result: (key, analysis, calib, features); the objects are held so ids stay unique


def consumer_columns(c: Consumer) -> np.ndarray:
    """The unit of every column of the consumer's input seen as rows × columns (see input_rows)."""
    if c.kind == "conv":
        kh, kw = c.conv["kernel"]
        return c.feature_unit[:: kh * kw]
    return c.feature_unit


def input_rows(x: np.ndarray, c: Consumer) -> np.ndarray:
    """The consumer's input as a 2-D [rows, columns] array: Conv (N, C, H, W) → (N·H·W, C); Gemm → (N, features);
    MatMul → (…, K) flattened over the leading axes."""
    if c.kind == "conv":
        return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    if c.kind == "gemm":
        return x.reshape(x.shape[0], -1)
    return x.reshape(-1, x.shape[-1])


def unit_slots(columns: np.ndarray, units: np.ndarray) -> np.ndarray:
    """[units, slots] column index of each unit's k-th channel in the consumer's input (-1 where it has fewer)."""
    hits = [np.nonzero(columns == u)[0] for u in units]
    slots = np.full((len(units), max((len(h) for h in hits), default=0)), -1, dtype=np.int64)
    for i, h in enumerate(hits):
        slots[i, : len(h)] = h
    return slots


def group_feature_maps(analysis, groups: list[int], calib, dim: int = FEATURE_DIM, seed: int = 0,
                       progress=None) -> dict[int, np.ndarray | None]:
    """Per group: centred feature maps [units, ≤ dim] (module docstring), or None where a prunable unit is read by no
    supported consumer (its feature map is unknown). The last result is cached (same analysis, data and groups)."""
    key = (id(analysis), id(calib), tuple(groups), dim, seed)
    if _LAST and _LAST[0][0] == key:
        return _LAST[0][3]
    consumers = find_consumers(analysis, groups)
    rng = np.random.default_rng(seed)
    plans = {}  # (group, consumer index) -> (consumer, slots, rows wanted)
    for g in groups:
        for k, c in enumerate(consumers[g]):
            slots = unit_slots(consumer_columns(c), np.asarray(analysis.groups[g].units))
            if slots.shape[1] and (slots >= 0).any():
                rows = max(1, dim // (len(consumers[g]) * slots.shape[1]))
                plans[(g, k)] = (c, slots, rows)
    picked: dict[tuple[int, int], list[np.ndarray]] = {key_: [] for key_ in plans}
    taken = {key_: 0 for key_ in plans}

    def consume(arrays: dict[str, np.ndarray]) -> None:
        for key_, (c, slots, rows) in plans.items():
            x = input_rows(np.asarray(arrays[c.tensor], dtype=np.float32), c)
            batch = len(arrays[c.tensor])
            share = min(len(x), -(-rows * batch // calib.count), rows - taken[key_])
            if share <= 0:
                continue
            pick = np.sort(rng.choice(len(x), size=share, replace=False))
            values = x[pick][:, np.maximum(slots, 0)]  # [rows, units, slots]
            values[:, slots < 0] = 0.0
            picked[key_].append(values)
            taken[key_] += share

    tensors = sorted({c.tensor for c, _, _ in plans.values()})
    if tensors:
        stream_tensors(analysis.proto, calib, tensors, consume, max(1, int(calib.options.batch)), progress,
                       "calibration feature maps")
    features: dict[int, np.ndarray | None] = {}
    for g in groups:
        group = analysis.groups[g]
        blocks, read = [], np.zeros(group.size, dtype=bool)
        for k in range(len(consumers[g])):
            if (g, k) not in plans or not picked[(g, k)]:
                continue
            slots = plans[(g, k)][1]
            read |= (slots >= 0).any(axis=1)
            values = np.concatenate(picked[(g, k)]).astype(np.float64)  # [rows, units, slots]
            values -= values.mean(axis=0, keepdims=True)
            values[:, slots < 0] = 0.0
            blocks.append(values.transpose(1, 2, 0).reshape(group.size, -1))
        features[g] = np.concatenate(blocks, axis=1) if blocks and read[group.prunable].all() else None
    _LAST[:] = [(key, analysis, calib, features)]
    return features

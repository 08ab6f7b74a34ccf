"""Linear layers as regressions: Conv (grouped, depthwise), ConvTranspose, Gemm and MatMul written as Y = X·M + b.

For a sampled output position, `features` gathers the input values the layer multiplies (an im2col patch for
convolutions, a row for Gemm/MatMul), grouped by convolution group, so that output[g] = features[g] @ M[g] + b[g].
`weight_matrix` and `weight_from_matrix` convert between the ONNX weight and M.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from compressor.engine.graph import attr

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class LinearLayer:
    """One refittable layer of a model: its node, tensors, weight/bias initializers and convolution geometry."""

    node: str
    op: str
    data: str
    output: str
    weight: str
    bias: str | None
    groups: int = 1
    alpha: float = 1.0
    beta: float = 1.0
    trans_b: bool = False

    def weight_matrix(self, weight: np.ndarray) -> np.ndarray:
        """The ONNX weight as M: [groups, features per group, outputs per group]."""
        if self.op == "Conv":
            cout = weight.shape[0]
            per = weight.reshape(self.groups, cout // self.groups, -1)
            return np.transpose(per, (0, 2, 1))
        if self.op == "ConvTranspose":
            cin, cout_g = weight.shape[0], weight.shape[1]
            per = weight.reshape(self.groups, cin // self.groups, cout_g, -1)
            return np.transpose(per, (0, 1, 3, 2)).reshape(self.groups, -1, cout_g)
        matrix = weight.T if self.trans_b else weight
        return (self.alpha * matrix)[None]

    def weight_from_matrix(self, matrix: np.ndarray, like: np.ndarray) -> np.ndarray:
        """Inverse of weight_matrix, shaped like the ONNX weight `like`."""
        if self.op == "Conv":
            return np.transpose(matrix, (0, 2, 1)).reshape(like.shape).astype(like.dtype)
        if self.op == "ConvTranspose":
            g, _, cout_g = matrix.shape
            cin_g = like.shape[0] // g
            per = matrix.reshape(g, cin_g, -1, cout_g)
            return np.transpose(per, (0, 1, 3, 2)).reshape(like.shape).astype(like.dtype)
        weight = matrix[0] / self.alpha
        return (weight.T if self.trans_b else weight).astype(like.dtype)

    def bias_vector(self, proto_bias: np.ndarray | None, outputs: int) -> np.ndarray:
        """The effective per-output bias b (zeros when the layer has none)."""
        if proto_bias is None:
            return np.zeros(outputs)
        scale = self.beta if self.op == "Gemm" else 1.0
        return scale * np.broadcast_to(np.asarray(proto_bias, dtype=np.float64).reshape(-1), (outputs,)).copy()


def linear_layer(proto: onnx.ModelProto, node: onnx.NodeProto) -> LinearLayer | None:
    """The LinearLayer of `node`, or None when it is not a refittable linear layer with constant weights."""
    if node.op_type not in LINEAR_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    inits = {t.name: t for t in proto.graph.initializer}
    weight = inits.get(node.input[1])
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if weight is None or (bias is not None and bias not in inits):
        return None
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return None
        trans_b = bool(attr(node, "transB", 0))
        n = weight.dims[0] if trans_b else weight.dims[1]
        if bias is not None and int(np.prod(inits[bias].dims)) not in (1, n):
            return None
        return LinearLayer(node.name, "Gemm", node.input[0], node.output[0], weight.name, bias,
                           alpha=float(attr(node, "alpha", 1.0)), beta=float(attr(node, "beta", 1.0)), trans_b=trans_b)
    if node.op_type == "MatMul":
        if len(weight.dims) != 2:
            return None
        return LinearLayer(node.name, "MatMul", node.input[0], node.output[0], weight.name, None)
    return LinearLayer(node.name, node.op_type, node.input[0], node.output[0], weight.name, bias,
                       groups=int(attr(node, "group", 1)))


@dataclass
class Geometry:
    """Per spatial axis: kernel size, stride, dilation and leading pad of a convolution, at concrete shapes."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]


def conv_geometry(node: onnx.NodeProto, weight_shape: tuple[int, ...], in_spatial: tuple[int, ...],
                  out_spatial: tuple[int, ...]) -> Geometry:
    """Kernel, strides, dilations and leading pads of a Conv/ConvTranspose (auto_pad resolved from the shapes)."""
    rank = len(in_spatial)
    kernel = tuple(int(k) for k in weight_shape[2:])
    strides = tuple(attr(node, "strides", [1] * rank))
    dilations = tuple(attr(node, "dilations", [1] * rank))
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = list(attr(node, "pads", [0] * (2 * rank)))[:rank]
    transpose = node.op_type == "ConvTranspose"
    if auto_pad in ("SAME_UPPER", "SAME_LOWER") or (transpose and attr(node, "output_shape") is not None):
        for a in range(rank):
            span = (kernel[a] - 1) * dilations[a] + 1
            if transpose:
                extra = list(attr(node, "output_padding", [0] * rank))[a]
                total = strides[a] * (in_spatial[a] - 1) + extra + span - out_spatial[a]
            else:
                total = max(0, (out_spatial[a] - 1) * strides[a] + span - in_spatial[a])
            pads[a] = total - total // 2 if auto_pad == "SAME_LOWER" else total // 2
    elif auto_pad == "VALID":
        pads = [0] * rank
    return Geometry(kernel, strides, dilations, tuple(int(p) for p in pads))


def sample_positions(out_shape: tuple[int, ...], layer: LinearLayer, per_sample: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Row indices [R, 1 + spatial rank] of sampled output positions: sample index, then spatial (or row) coordinates.

    Convolutions sample `per_sample` spatial positions of every sample; Gemm/MatMul sample rows of the flattened
    leading axes (per_sample of them per batch sample).
    """
    n = out_shape[0]
    if layer.op in ("Conv", "ConvTranspose"):
        spatial = out_shape[2:]
    else:
        spatial = (int(np.prod(out_shape[1:-1], dtype=np.int64)),)
    total = int(np.prod(spatial, dtype=np.int64))
    take = min(total, per_sample)
    flat = np.concatenate([np.sort(rng.choice(total, size=take, replace=False)) for _ in range(n)]) if take < total \
        else np.tile(np.arange(total), n)
    sample = np.repeat(np.arange(n), take)
    return np.column_stack([sample, *np.unravel_index(flat, spatial)]).astype(np.int64)


def features(layer: LinearLayer, node: onnx.NodeProto, x: np.ndarray, weight_shape: tuple[int, ...],
             out_shape: tuple[int, ...], rows: np.ndarray) -> np.ndarray:
    """Input features [R, groups, features per group] (float64) of the layer at output positions `rows`."""
    if layer.op == "Conv":
        return _conv_patches(node, x, weight_shape, out_shape, rows, layer.groups)
    if layer.op == "ConvTranspose":
        return _conv_transpose_patches(node, x, weight_shape, out_shape, rows, layer.groups)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    return flat[rows[:, 0], rows[:, 1]].astype(np.float64)[:, None, :]


def targets(layer: LinearLayer, y: np.ndarray, rows: np.ndarray, groups: int) -> np.ndarray:
    """Layer outputs [R, groups, outputs per group] (float64) at the sampled positions."""
    if layer.op in ("Conv", "ConvTranspose"):
        index = (rows[:, 0], slice(None), *[rows[:, 1 + a] for a in range(rows.shape[1] - 1)])
        picked = y[index]  # advanced indices around a slice: the row axis comes first, [R, C]
    else:
        flat = y.reshape(y.shape[0], -1, y.shape[-1])
        picked = flat[rows[:, 0], rows[:, 1]]
    return picked.astype(np.float64).reshape(len(rows), groups, -1)


def _conv_patches(node, x, weight_shape, out_shape, rows, groups) -> np.ndarray:
    geo = conv_geometry(node, weight_shape, x.shape[2:], out_shape[2:])
    rank = len(geo.kernel)
    lead = [(0, 0), (0, 0)]
    padded = np.pad(x, lead + [(p, max(0, k * d)) for p, k, d in zip(geo.pads, geo.kernel, geo.dilations)])
    r = len(rows)
    index = [rows[:, 0].reshape(r, 1, *[1] * rank), np.arange(x.shape[1]).reshape(1, -1, *[1] * rank)]
    for a in range(rank):
        shape = [1] * (2 + rank)
        shape[2 + a] = geo.kernel[a]
        offsets = (np.arange(geo.kernel[a]) * geo.dilations[a]).reshape(shape)
        index.append(rows[:, 1 + a].reshape(r, *[1] * (1 + rank)) * geo.strides[a] + offsets)
    patches = padded[tuple(index)].astype(np.float64)
    return patches.reshape(r, groups, -1)


def _conv_transpose_patches(node, x, weight_shape, out_shape, rows, groups) -> np.ndarray:
    geo = conv_geometry(node, weight_shape, x.shape[2:], out_shape[2:])
    rank = len(geo.kernel)
    r = len(rows)
    index = [rows[:, 0].reshape(r, 1, *[1] * rank), np.arange(x.shape[1]).reshape(1, -1, *[1] * rank)]
    valid = np.ones((r, 1) + geo.kernel, dtype=bool)
    for a in range(rank):
        shape = [1] * (2 + rank)
        shape[2 + a] = geo.kernel[a]
        offsets = (np.arange(geo.kernel[a]) * geo.dilations[a]).reshape(shape)
        source = rows[:, 1 + a].reshape(r, *[1] * (1 + rank)) + geo.pads[a] - offsets
        coord = source // geo.strides[a]
        valid = valid & (source % geo.strides[a] == 0) & (coord >= 0) & (coord < x.shape[2 + a])
        index.append(np.clip(coord, 0, x.shape[2 + a] - 1))
    patches = np.where(valid, x[tuple(index)], 0).astype(np.float64)
    return patches.reshape(r, groups, -1)


def initializer_value(proto: onnx.ModelProto, name: str) -> np.ndarray:
    """The value of initializer `name` of `proto`."""
    for tensor in proto.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    raise KeyError(name)

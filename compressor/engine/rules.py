"""The per-op channel rule table: how each operator propagates, couples, consumes and rewrites channels.

Each entry is one function `rule(tracer, node)`; those registered with `channel_rule` run only when the node's first
input carries tracked channels, and get that input's channel map. A rule reads the channel maps of the node's inputs,
sets those of its outputs, and registers what surgery needs: initializer axes to slice (`tracer.param`), attribute or
shape-constant rewrites (`tracer.rewrite`) and MAC terms (`tracer.macs`). Ops without an entry block every channel
that reaches them, so an unknown op never yields a wrong model.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import numpy as np

from compressor.engine.graph import attr, set_attr

if TYPE_CHECKING:
    import onnx

    from compressor.engine.tracer import ChannelMap, KeepFn, Rewrite, RewriteContext, Tracer

Rule = Callable[["Tracer", "onnx.NodeProto"], None]
ChannelRule = Callable[["Tracer", "onnx.NodeProto", "ChannelMap"], None]
RULES: dict[str, Rule] = {}

# Unary ops that act on each element alone; those mapping 0 to 0 keep exact-zero channels zero.
ZERO_PRESERVING_UNARY = (
    "Relu", "LeakyRelu", "Tanh", "HardSwish", "Identity", "Neg", "Abs", "Elu", "Selu", "Gelu", "Mish",
    "Softsign", "Erf", "Sqrt", "Sin", "Sign", "Floor", "Ceil", "Round", "Celu", "ThresholdedRelu", "Shrink",
)
OTHER_UNARY = ("Sigmoid", "HardSigmoid", "Softplus", "Exp", "Log", "Cos", "Reciprocal", "Cast", "Not", "IsNaN", "IsInf")
ZERO_PRESERVING_POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")
ELEMENTWISE_BINARY = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu")
REDUCE_OPS = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


def rule(*ops: str) -> Callable[[Rule], Rule]:
    """Register a rule for one or more op types."""

    def decorator(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return decorator


def channel_rule(*ops: str) -> Callable[[ChannelRule], ChannelRule]:
    """Register a rule that acts only when the node's first input carries tracked channels; it gets their map."""

    def decorator(fn: ChannelRule) -> ChannelRule:
        @functools.wraps(fn)
        def on_tracked_input(t: "Tracer", node) -> None:
            cmap = t.cmap(node.input[0])
            if cmap is not None:
                fn(t, node, cmap)

        rule(*ops)(on_tracked_input)
        return fn

    return decorator


def _extra_outputs_used(t: "Tracer", node) -> bool:
    return any(out and t.view.consumers.get(out) or out in t.view.outputs for out in node.output[1:])


@channel_rule(*ZERO_PRESERVING_UNARY, *OTHER_UNARY, *ZERO_PRESERVING_POOLS, "Dropout", "Clip")
def elementwise_unary(t: "Tracer", node, cmap: "ChannelMap") -> None:
    """Channel-wise ops: the output has the input's channels; extra outputs (masks, indices) block them."""
    if _extra_outputs_used(t, node):
        t.block(cmap.units, f"{node.op_type} '{node.name}' has a used secondary output")
        return
    zero = cmap.zero if node.op_type in ZERO_PRESERVING_UNARY + ZERO_PRESERVING_POOLS + ("Dropout",) else None
    if node.op_type == "Clip":
        low = _scalar(t, node, 1, attr(node, "min"))
        high = _scalar(t, node, 2, attr(node, "max"))
        keeps_zero = (low is None or low <= 0) and (high is None or high >= 0)
        zero = cmap.zero if keeps_zero else None
    if node.op_type in ZERO_PRESERVING_POOLS and t.rank(node.output[0]) != t.rank(node.input[0]):
        t.block(cmap.units, f"{node.op_type} '{node.name}' changes rank")
        return
    t.set(node.output[0], cmap.axis, cmap.units, zero)


def _scalar(t: "Tracer", node, slot: int, default):
    if len(node.input) > slot and node.input[slot]:
        value = t.view.const(node.input[slot])
        return None if value is None else float(np.asarray(value).reshape(-1)[0])
    return default


@channel_rule("BatchNormalization", "InstanceNormalization")
def per_channel_normalization(t: "Tracer", node, cmap: "ChannelMap") -> None:
    """Per-channel affine/normalization: parameters are sliced with the channels."""
    if cmap.axis != 1 or _extra_outputs_used(t, node):
        t.block(cmap.units, f"{node.op_type} '{node.name}' on an unexpected axis or with training outputs")
        return
    params = [t.view.const(name) for name in node.input[1:]]
    if any(p is None for p in params):
        t.block(cmap.units, f"{node.op_type} '{node.name}' has non-constant parameters")
        return
    for name in node.input[1:]:
        t.param(name, 0, cmap.units, "chan", node)
    zero = np.zeros(len(cmap.units), dtype=bool)
    if node.op_type == "BatchNormalization":
        scale, bias, mean, var = (p.astype(np.float64) for p in params[:4])
        eps = attr(node, "epsilon", 1e-5)
        offset = bias - scale * mean / np.sqrt(var + eps)
        zero = ((scale == 0) & (bias == 0)) | (cmap.zero & (offset == 0))
    t.set(node.output[0], cmap.axis, cmap.units, zero)


@rule("Conv")
def conv(t: "Tracer", node) -> None:
    """Conv: dense, grouped (channel j of every group coupled) and depthwise (pass-through) variants."""
    weight = t.view.const(node.input[1])
    cmap = t.cmap(node.input[0])
    out = node.output[0]
    if weight is None or (len(node.input) > 2 and node.input[2] and t.view.const(node.input[2]) is None):
        if cmap is not None:
            t.block(cmap.units, f"Conv '{node.name}' has non-constant weights")
        return
    groups = attr(node, "group", 1)
    cout, cin_g = weight.shape[0], weight.shape[1]
    has_bias = len(node.input) > 2 and bool(node.input[2])
    bias = t.view.const(node.input[2]) if has_bias else None
    filter_zero = ~weight.reshape(cout, -1).any(axis=1)
    if bias is not None:
        filter_zero &= bias == 0
    if cmap is not None and cmap.axis != 1:
        t.block(cmap.units, f"Conv '{node.name}' input channels on an unexpected axis")
        cmap = None
    depthwise = groups > 1 and cin_g == 1 and cout == groups
    if depthwise:
        if cmap is None:
            t.macs(node, None, None)
            return
        t.param(node.input[1], 0, cmap.units, "chan", node)
        if has_bias:
            t.param(node.input[2], 0, cmap.units, "chan", node)
        t.rewrite(node, _set_group_to_kept(cmap.units))
        t.macs(node, None, cmap.units)
        t.set(out, 1, cmap.units, filter_zero | cmap.zero if bias is None else filter_zero | (cmap.zero & (bias == 0)))
        return
    cout_g = cout // groups
    born = t.new_units(cout_g, node)
    out_units = np.tile(born, groups)
    in_units = None
    if cmap is not None:
        if groups > 1:
            per_group = cmap.units.reshape(groups, cin_g)
            for k in range(1, groups):
                t.union(per_group[0], per_group[k])
            in_units = per_group[0]
            t.param(node.input[1], 1, in_units, "in", node, tensor=node.input[0])
        else:
            in_units = cmap.units
            t.param(node.input[1], 1, in_units, "in", node, tensor=node.input[0])
    t.param(node.input[1], 0, out_units, "out", node)
    if has_bias:
        t.param(node.input[2], 0, out_units, "out", node)
    t.macs(node, cmap.units if cmap is not None else None, out_units)
    t.set(out, 1, out_units, filter_zero)


def _set_group_to_kept(units: np.ndarray) -> "Rewrite":
    def rewrite(node: "onnx.NodeProto", keep: "KeepFn", surgery: "RewriteContext") -> None:
        set_attr(node, "group", int(keep(units).sum()))

    return rewrite


@rule("ConvTranspose")
def conv_transpose(t: "Tracer", node) -> None:
    """ConvTranspose with weight [Cin, Cout/group, k...]: dense only; grouped ones block their channels."""
    weight = t.view.const(node.input[1])
    cmap = t.cmap(node.input[0])
    groups = attr(node, "group", 1)
    if weight is None or groups != 1 or (cmap is not None and cmap.axis != 1):
        if cmap is not None:
            t.block(cmap.units, f"ConvTranspose '{node.name}' is grouped or has non-constant weights")
        t.macs(node, None, None)
        return
    has_bias = len(node.input) > 2 and bool(node.input[2])
    out_units = t.new_units(weight.shape[1], node)
    zero = ~np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1).any(axis=1)
    if has_bias:
        bias = t.view.const(node.input[2])
        if bias is None:
            if cmap is not None:
                t.block(cmap.units, f"ConvTranspose '{node.name}' has a non-constant bias")
            return
        zero &= bias == 0
        t.param(node.input[2], 0, out_units, "out", node)
    if cmap is not None:
        t.param(node.input[1], 0, cmap.units, "in", node, tensor=node.input[0])
    t.param(node.input[1], 1, out_units, "out", node)
    t.macs(node, cmap.units if cmap is not None else None, out_units)
    t.set(node.output[0], 1, out_units, zero)


@rule("Gemm")
def gemm(t: "Tracer", node) -> None:
    """Gemm with constant B: input features are B's K axis, output features B's N axis (transB aware)."""
    cmap = t.cmap(node.input[0])
    b = t.view.const(node.input[1])
    c = t.view.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    has_c = len(node.input) > 2 and bool(node.input[2])
    if b is None or attr(node, "transA", 0) or (has_c and c is None):
        if cmap is not None:
            t.block(cmap.units, f"Gemm '{node.name}' has transA or non-constant weights")
        t.macs(node, None, None)
        return
    trans_b = attr(node, "transB", 0)
    k_axis, n_axis = (1, 0) if trans_b else (0, 1)
    n = b.shape[n_axis]
    out_units = t.new_units(n, node)
    zero = ~np.moveaxis(b, n_axis, 0).reshape(n, -1).any(axis=1)
    if cmap is not None:
        if cmap.axis != 1:
            t.block(cmap.units, f"Gemm '{node.name}' input features on an unexpected axis")
        else:
            t.param(node.input[1], k_axis, cmap.units, "in", node, tensor=node.input[0])
    t.param(node.input[1], n_axis, out_units, "out", node)
    if c is not None:
        if c.ndim >= 1 and c.shape[-1] == n and n > 1:
            t.param(node.input[2], c.ndim - 1, out_units, "out", node)
            zero &= np.broadcast_to(c, c.shape[:-1] + (n,)).reshape(-1, n).max(axis=0) == 0
            zero &= np.broadcast_to(c, c.shape[:-1] + (n,)).reshape(-1, n).min(axis=0) == 0
        else:
            zero &= bool(np.all(c == 0))
    t.macs(node, cmap.units if cmap is not None and cmap.axis == 1 else None, out_units)
    t.set(node.output[0], 1, out_units, zero)


@rule("MatMul")
def matmul(t: "Tracer", node) -> None:
    """MatMul with a constant 2-D B [K, N]: features on the last axis; activation×activation blocks."""
    cmap = t.cmap(node.input[0])
    b = t.view.const(node.input[1])
    rank = t.rank(node.input[0])
    if b is None or b.ndim != 2 or rank is None:
        if cmap is not None:
            t.block(cmap.units, f"MatMul '{node.name}' multiplies two activations")
        other = t.cmap(node.input[1])
        if other is not None:
            t.block(other.units, f"MatMul '{node.name}' multiplies two activations")
        t.macs(node, None, None)
        return
    out_units = t.new_units(b.shape[1], node)
    if cmap is not None:
        if cmap.axis != rank - 1:
            t.block(cmap.units, f"MatMul '{node.name}' input features on an unexpected axis")
            cmap = None
        else:
            t.param(node.input[1], 0, cmap.units, "in", node, tensor=node.input[0])
    t.param(node.input[1], 1, out_units, "out", node)
    t.macs(node, cmap.units if cmap is not None else None, out_units)
    t.set(node.output[0], rank - 1, out_units, ~b.T.any(axis=1))


@rule(*ELEMENTWISE_BINARY)
def elementwise_binary(t: "Tracer", node) -> None:
    """Broadcasting elementwise ops: activations with the same channels are coupled; constants are sliced."""
    out = node.output[0]
    out_rank = t.rank(out)
    tracked = [(i, name, t.cmap(name)) for i, name in enumerate(node.input) if name and t.cmap(name) is not None]
    if not tracked or out_rank is None:
        return
    axis = tracked[0][2].axis + out_rank - t.rank(tracked[0][1])
    units = tracked[0][2].units
    channels = len(units)
    coupled_zero: list[np.ndarray] = []
    const_zero = np.zeros(channels, dtype=bool)
    for name in node.input:
        if not name:
            continue
        rank = t.rank(name)
        shape = t.view.shape(name)
        local = axis - (out_rank - rank) if rank is not None else -1
        size = shape[local] if shape is not None and 0 <= local < len(shape) else 1
        cmap = t.cmap(name)
        value = t.view.const(name)
        if cmap is not None and size == channels and cmap.axis == local:
            t.union(units, cmap.units)
            coupled_zero.append(cmap.zero)
        elif value is not None:
            if size == channels and channels > 1:
                t.param(name, local, units, "chan", node)
                const_zero |= ~np.moveaxis(value, local, 0).reshape(size, -1).any(axis=1)
            else:
                const_zero |= not value.any()
        elif size == 1 and channels > 1:
            continue
        else:
            t.block(units, f"{node.op_type} '{node.name}' combines channels with a tensor whose channels are fixed")
            for _, _, other in tracked:
                t.block(other.units, f"{node.op_type} '{node.name}' combines channels with a fixed tensor")
            return
    if node.op_type == "Mul":
        zero = const_zero | np.logical_or.reduce(coupled_zero) if coupled_zero else const_zero
    elif node.op_type in ("Add", "Sum", "Sub", "Max", "Min", "Mean") and len(coupled_zero) == len([n for n in node.input if n]):
        zero = np.logical_and.reduce(coupled_zero)
    else:
        zero = None
    t.set(out, axis, units, zero)


@rule("Concat")
def concat(t: "Tracer", node) -> None:
    """Concat on the channel axis joins unit lists; on another axis it couples the inputs' channels."""
    out_rank = t.rank(node.output[0])
    axis = attr(node, "axis")
    if out_rank is None:
        return t.block_inputs(node, "unknown rank")
    axis = axis % out_rank
    cmaps = [t.cmap(name) for name in node.input]
    tracked = [c for c in cmaps if c is not None]
    if not tracked:
        return
    channel_axis = tracked[0].axis
    if any(c.axis != channel_axis for c in tracked):
        return t.block_inputs(node, "inputs with channels on different axes")
    if axis == channel_axis:
        parts, zeros = [], []
        for name, cmap in zip(node.input, cmaps):
            if cmap is None:
                size = t.view.shape(name)[axis]
                parts.append(t.new_units(size, node, blocked=f"Concat '{node.name}' input '{name}' has fixed channels"))
                zeros.append(np.zeros(size, dtype=bool))
            else:
                parts.append(cmap.units)
                zeros.append(cmap.zero)
        t.set(node.output[0], axis, np.concatenate(parts), np.concatenate(zeros))
        return
    if len(tracked) != len(cmaps):
        return t.block_inputs(node, "concatenates tracked and fixed channels")
    for c in tracked[1:]:
        t.union(tracked[0].units, c.units)
    t.set(node.output[0], channel_axis, tracked[0].units, np.logical_and.reduce([c.zero for c in tracked]))


@channel_rule("Split")
def split(t: "Tracer", node, cmap: "ChannelMap") -> None:
    """Split: on the channel axis each output takes its range (sizes rewritten); otherwise channels pass."""
    axis = attr(node, "axis", 0) % t.rank(node.input[0])
    if axis != cmap.axis:
        for out in node.output:
            t.set(out, cmap.axis, cmap.units, cmap.zero)
        return
    sizes = [t.view.shape(out)[axis] for out in node.output]
    bounds = np.cumsum([0] + sizes)
    opset = t.opset
    pieces = [cmap.units[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
    for out, lo, hi, piece in zip(node.output, bounds[:-1], bounds[1:], pieces):
        t.set(out, axis, piece, cmap.zero[lo:hi])

    def rewrite(node: "onnx.NodeProto", keep: "KeepFn", surgery: "RewriteContext") -> None:
        kept = np.array([int(keep(p).sum()) for p in pieces], dtype=np.int64)
        for a in [a for a in node.attribute if a.name == "num_outputs"]:
            node.attribute.remove(a)
        if opset < 13:
            set_attr(node, "split", kept.tolist())
            return
        if len(node.input) < 2:
            node.input.append("")
        surgery.set_input_constant(node, 1, kept)

    t.rewrite(node, rewrite)


@channel_rule("Slice")
def slice_(t: "Tracer", node, cmap: "ChannelMap") -> None:
    """Slice: channel ranges with step 1 are followed (starts/ends rewritten); other channel slices block."""
    rank = t.rank(node.input[0])
    if len(node.input) < 3:
        starts, ends, axes, steps = np.array(attr(node, "starts")), np.array(attr(node, "ends")), attr(node, "axes"), None
    else:
        operands = [node.input[i] if len(node.input) > i else "" for i in range(1, 5)]
        starts, ends, axes, steps = (t.view.const(name) if name else None for name in operands)
        if any(name and value is None for name, value in zip(operands, (starts, ends, axes, steps))):
            return t.block_inputs(node, "non-constant slice bounds")
    axes = np.arange(len(starts)) if axes is None else np.asarray(axes) % rank
    steps = np.ones(len(starts), dtype=np.int64) if steps is None else np.asarray(steps)
    hit = np.nonzero(axes == cmap.axis)[0]
    if len(hit) == 0:
        t.set(node.output[0], cmap.axis, cmap.units, cmap.zero)
        return
    i = int(hit[0])
    if steps[i] != 1 or len(node.input) < 3:
        return t.block_inputs(node, "channel slice with a step or old-opset attributes")
    n = len(cmap.units)
    lo, hi, _ = slice(int(starts[i]), int(ends[i]), 1).indices(n)
    units, zero = cmap.units[lo:hi], cmap.zero[lo:hi]
    before, inside = cmap.units[:lo], units
    t.set(node.output[0], cmap.axis, units, zero)

    def rewrite(node: "onnx.NodeProto", keep: "KeepFn", surgery: "RewriteContext") -> None:
        new_lo = int(keep(before).sum())
        new_starts, new_ends = starts.copy(), ends.copy()
        new_starts[i], new_ends[i] = new_lo, new_lo + int(keep(inside).sum())
        surgery.set_input_constant(node, 1, new_starts)
        surgery.set_input_constant(node, 2, new_ends)

    t.rewrite(node, rewrite)


@channel_rule("Pad")
def pad(t: "Tracer", node, cmap: "ChannelMap") -> None:
    """Pad: spatial pads pass channels; constant channel pads add removable constant channels (pads rewritten)."""
    rank = t.rank(node.input[0])
    from_input = len(node.input) > 1 and node.input[1]
    pads = t.view.const(node.input[1]) if from_input else np.array(attr(node, "pads", []))
    axes_in = t.view.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if pads is None or (len(node.input) > 3 and node.input[3] and axes_in is None):
        return t.block_inputs(node, "non-constant pads")
    pads = np.asarray(pads, dtype=np.int64)
    axes = np.arange(rank) if axes_in is None else np.asarray(axes_in) % rank
    full = np.zeros(2 * rank, dtype=np.int64)
    full[axes], full[axes + rank] = pads[: len(axes)], pads[len(axes):]
    before, after = int(full[cmap.axis]), int(full[cmap.axis + rank])
    if before == 0 and after == 0:
        t.set(node.output[0], cmap.axis, cmap.units, cmap.zero)
        return
    mode = attr(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    value = t.view.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(attr(node, "value", 0.0))
    if mode != "constant" or before < 0 or after < 0 or value is None:
        return t.block_inputs(node, "channel pad that is not a constant pad")
    head, tail = t.new_units(before, node), t.new_units(after, node)
    pad_zero = bool(np.all(np.asarray(value) == 0))
    zero = np.concatenate([np.full(before, pad_zero), cmap.zero, np.full(after, pad_zero)])
    t.set(node.output[0], cmap.axis, np.concatenate([head, cmap.units, tail]), zero)
    channel_index = int(np.nonzero(axes == cmap.axis)[0][0])

    def rewrite(node: "onnx.NodeProto", keep: "KeepFn", surgery: "RewriteContext") -> None:
        new = pads.copy()
        new[channel_index], new[channel_index + len(axes)] = int(keep(head).sum()), int(keep(tail).sum())
        if from_input:
            surgery.set_input_constant(node, 1, new)
        else:
            set_attr(node, "pads", new.tolist())

    t.rewrite(node, rewrite)


@channel_rule(*REDUCE_OPS)
def reduce(t: "Tracer", node, cmap: "ChannelMap") -> None:
    """Reductions over non-channel axes keep channels (axis shifts when dims are dropped); over channels block."""
    rank = t.rank(node.input[0])
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = t.view.const(node.input[1])
        if value is None:
            return t.block_inputs(node, "non-constant reduction axes")
        axes = value.tolist()
    if axes is None or len(axes) == 0:
        if attr(node, "noop_with_empty_axes", 0):
            t.set(node.output[0], cmap.axis, cmap.units, cmap.zero)
            return
        axes = list(range(rank))
    axes = sorted(a % rank for a in axes)
    if cmap.axis in axes:
        return t.block_inputs(node, "reduces over channels")
    keepdims = attr(node, "keepdims", 1)
    axis = cmap.axis if keepdims else cmap.axis - sum(a < cmap.axis for a in axes)
    preserving = node.op_type in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare")
    t.set(node.output[0], axis, cmap.units, cmap.zero if preserving else None)


@channel_rule("Flatten", "Reshape")
def flatten_or_reshape(t: "Tracer", node, cmap: "ChannelMap") -> None:
    """Reshapes that keep the channel axis, or merge it with the dims after it (features = channel blocks)."""
    in_shape, out_shape = t.view.shape(node.input[0]), t.view.shape(node.output[0])
    if in_shape is None or out_shape is None:
        return t.block_inputs(node, "unknown shapes")
    c = cmap.axis
    pre, channels = int(np.prod(in_shape[:c], dtype=np.int64)), in_shape[c]
    cum = np.cumprod((1,) + tuple(out_shape), dtype=np.int64)
    k = next((i for i in range(len(out_shape)) if cum[i] == pre and out_shape[i] % channels == 0), None)
    if k is None:
        return t.block_inputs(node, "reshape splits or moves the channel axis")
    block_size = out_shape[k] // channels
    post = int(np.prod(in_shape[c + 1:], dtype=np.int64))
    if post % block_size or post // block_size != int(np.prod(out_shape[k + 1:], dtype=np.int64)):
        return t.block_inputs(node, "reshape mixes channels with other dims")
    if block_size > 1 and not _merges_leading_dims(in_shape[c + 1:], block_size):
        return t.block_inputs(node, "reshape interleaves channels")
    units = np.repeat(cmap.units, block_size)
    zero = np.repeat(cmap.zero, block_size)
    t.set(node.output[0], k, units, zero)
    if node.op_type == "Flatten":
        return
    target = t.view.const(node.input[1])
    if target is None:
        return t.block_inputs(node, "reshape target is computed at run time")
    if target[k] <= 0:
        return
    channel_units = cmap.units

    def rewrite(node: "onnx.NodeProto", keep: "KeepFn", surgery: "RewriteContext") -> None:
        new = target.copy()
        new[k] = int(keep(channel_units).sum()) * block_size
        surgery.set_input_constant(node, 1, new)

    t.rewrite(node, rewrite)


def _merges_leading_dims(dims: tuple[int, ...], block: int) -> bool:
    """Whether `block` is the product of the first few of `dims` (so each channel's features are contiguous)."""
    product = 1
    for d in dims:
        if product == block:
            return True
        product *= d
    return product == block


@channel_rule("Transpose")
def transpose(t: "Tracer", node, cmap: "ChannelMap") -> None:
    """Transpose moves the channel axis."""
    perm = attr(node, "perm") or list(reversed(range(t.rank(node.input[0]))))
    t.set(node.output[0], list(perm).index(cmap.axis), cmap.units, cmap.zero)


@channel_rule("Squeeze", "Unsqueeze")
def squeeze(t: "Tracer", node, cmap: "ChannelMap") -> None:
    """(Un)squeeze shifts the channel axis; squeezing the channel axis itself blocks."""
    in_shape, out_shape = t.view.shape(node.input[0]), t.view.shape(node.output[0])
    if in_shape is None or out_shape is None:
        return t.block_inputs(node, "unknown shapes")
    before = [d for d in in_shape[: cmap.axis] if d != 1]
    count = len(cmap.units)
    for k, d in enumerate(out_shape):
        if d == count and [x for x in out_shape[:k] if x != 1] == before:
            t.set(node.output[0], k, cmap.units, cmap.zero)
            return
    t.block_inputs(node, "squeezes the channel axis")


@channel_rule("Resize", "Upsample")
def resize(t: "Tracer", node, cmap: "ChannelMap") -> None:
    """Resizing keeps channels if it does not scale the channel axis (a constant `sizes` is rewritten)."""
    in_shape, out_shape = t.view.shape(node.input[0]), t.view.shape(node.output[0])
    if in_shape is None or out_shape is None or in_shape[cmap.axis] != out_shape[cmap.axis]:
        return t.block_inputs(node, "resizes the channel axis")
    if node.op_type == "Resize" and len(node.input) > 3 and node.input[3]:
        sizes = t.view.const(node.input[3])
        if sizes is None or attr(node, "axes") is not None:
            return t.block_inputs(node, "run-time output sizes")
        units = cmap.units

        def rewrite(node: "onnx.NodeProto", keep: "KeepFn", surgery: "RewriteContext") -> None:
            new = sizes.copy()
            new[cmap.axis] = int(keep(units).sum())
            surgery.set_input_constant(node, 3, new)

        t.rewrite(node, rewrite)
    t.set(node.output[0], cmap.axis, cmap.units, cmap.zero)


@channel_rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(t: "Tracer", node, cmap: "ChannelMap") -> None:
    """Softmax over a non-channel axis keeps channels; over the channel axis it mixes them."""
    rank = t.rank(node.input[0])
    axis = attr(node, "axis", -1 if t.opset >= 13 else 1) % rank
    if axis == cmap.axis or (t.opset < 13 and cmap.axis >= axis):
        return t.block_inputs(node, "normalizes across channels")
    t.set(node.output[0], cmap.axis, cmap.units, None)


@channel_rule("Shape")
def shape(t: "Tracer", node, cmap: "ChannelMap") -> None:
    """Shape is harmless when only non-channel dims are read from it (Gather of constant indices)."""
    rank = t.rank(node.input[0])
    start = attr(node, "start", 0) % max(rank, 1) if attr(node, "start") is not None else 0
    end = attr(node, "end")
    end = rank if end is None else (end if end >= 0 else rank + end)
    channel_pos = cmap.axis - start
    if not (start <= cmap.axis < min(end, rank)):
        return
    for consumer in t.view.consumers.get(node.output[0], []):
        indices = t.view.const(consumer.input[1]) if consumer.op_type == "Gather" and len(consumer.input) > 1 else None
        if indices is None or channel_pos in (np.asarray(indices) % (min(end, rank) - start)).reshape(-1).tolist():
            return t.block_inputs(node, "the channel count is read at run time")
    if node.output[0] in t.view.outputs:
        t.block_inputs(node, "the shape is a graph output")

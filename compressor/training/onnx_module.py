"""An ONNX model as a trainable PyTorch module (onnx2torch), and its trained weights written back into the graph.

onnx2torch 1.5.15 builds a torch.fx GraphModule with one submodule per ONNX node (named after the node). Two gaps
on the models of this project are closed here, and nothing else is patched:
- weights reached through Identity chains (TorchScript exports of torchvision ResNet-50, EfficientNet-B0: KeyError
  on a Conv weight name): the model goes through the engine's loader first, which folds those chains into
  initializers (compressor.engine.loading);
- opset 18 and later (dynamo exports; TorchScript exports at the default opset of torch 2.9+): reductions take their
  axes as an input and onnx2torch has no converter for ReduceMean 18, Pad 18/19, Split 18 or Resize 18/19:
  converters for those versions are registered in onnx2torch's registry, reusing its
  own reduction module (constant axes) and its opset-13 converters where the node uses none of the new features;
  Reshape's allowzero=1 is dropped where the target shape holds no zero (it cannot matter there).

Training writes back instead of re-exporting: every trained tensor is copied into the initializer it came from, in
the same graph. The graph the engine verified (ops, names, channel counts, MACs) is kept exactly; only values change.
Parameters of nodes the write-back does not know are frozen, so nothing trains that cannot be saved.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from compressor.errors import CompressorError
from compressor.engine.loading import load_model

# ONNX op -> {torch parameter/buffer name: index of the node input holding it}
WRITE_BACK_INPUTS = {
    "Conv": {"weight": 1, "bias": 2},
    "ConvTranspose": {"weight": 1, "bias": 2},
    "Gemm": {"weight": 1, "bias": 2},
    "BatchNormalization": {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4},
}
AXES_INPUT_REDUCTIONS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                      "ReduceMin", "ReduceProd", "ReduceSumSquare")


@dataclass
class TensorLink:
    """One torch tensor of the module and the ONNX initializer it is written back to."""

    module_name: str
    tensor_name: str
    initializer: str
    transpose: bool = False


@dataclass
class OnnxModule:
    """A converted model: the torch module, the (normalized) ONNX graph it came from, and the write-back links."""

    module: nn.Module
    proto: onnx.ModelProto
    links: list[TensorLink] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    convs: list[str] = field(default_factory=list)  # submodules of 2-D Conv nodes whose weight and bias are linked

    def trainable_elements(self) -> int:
        """Number of trainable parameter elements."""
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    def input_shape(self) -> list[int | None]:
        """Dims of the first graph input (None where dynamic)."""
        dims = self.proto.graph.input[0].type.tensor_type.shape.dim
        return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def _unsupported_after_13(node, graph) -> str | None:
    """Why a Pad/Split/Resize node of opset 18+ differs from its opset-13 form, or None when it does not (new modes
    and coordinate transformations are refused by onnx2torch's opset-13 converters themselves)."""
    op, attrs = node.operation_type, node.attributes
    if op == "Pad" and len(node.input_values) > 3 and node.input_values[3]:
        return "Pad with an axes input"
    if op == "Resize" and (attrs.get("antialias", 0) or attrs.get("axes") is not None
                           or attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch"
                           or attrs.get("coordinate_transformation_mode") == "half_pixel_symmetric"):
        return "Resize with antialias, axes, keep_aspect_ratio_policy or half_pixel_symmetric"
    return None


def _register_converters_after_13() -> None:
    """Converters for the versions after 13 (18 and later) where onnx2torch stops at 13: reductions whose axes are
    a constant input (its own reduction module), and Pad/Split/Resize used in their opset-13 form (its own
    opset-13 converters)."""
    from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
    from onnx2torch.node_converters.registry import add_converter, get_converter
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    def reduction(node, graph):
        axes = None
        if len(node.input_values) > 1 and node.input_values[1]:
            axes_name = node.input_values[1]
            if axes_name not in graph.initializers:
                raise NotImplementedError(f"{node.operation_type} with axes computed at run time")
            axes = [int(a) for a in graph.initializers[axes_name].to_numpy().reshape(-1)]
        if not axes and node.attributes.get("noop_with_empty_axes", 0):
            raise NotImplementedError(f"{node.operation_type} with noop_with_empty_axes")
        module = OnnxReduceStaticAxes(node.operation_type, axes or None, node.attributes.get("keepdims", 1))
        return OperationConverterResult(torch_module=module,
                                        onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values))

    def as_opset13(node, graph):
        reason = _unsupported_after_13(node, graph)
        if reason:
            raise NotImplementedError(reason)
        return get_converter(operation_type=node.operation_type, version=13)(node, graph)

    for op_type, converter in [(op, reduction) for op in AXES_INPUT_REDUCTIONS] + [
            (op, as_opset13) for op in ("Pad", "Split", "Resize")]:
        for version in _versions_after_13(op_type):
            try:
                add_converter(operation_type=op_type, version=version)(converter)
            except ValueError:  # a newer onnx2torch already has it
                pass


def _versions_after_13(op_type: str) -> list[int]:
    """The opset versions after 13 in which the ONNX op changed (e.g. Pad: 18, 19, 21, ...)."""
    return sorted({schema.since_version for schema in onnx.defs.get_all_schemas_with_history()
                   if schema.name == op_type and schema.domain == "" and schema.since_version > 13})


def _prepare_for_onnx2torch(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy onnx2torch accepts: Reshape's allowzero=1 dropped where the target shape is a constant without zeros
    (where allowzero cannot change the result)."""
    proto = copy.deepcopy(proto)
    constants = {init.name: init for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        if np.all(numpy_helper.to_array(constants[node.input[1]]) != 0):
            kept = [a for a in node.attribute if a.name != "allowzero"]
            del node.attribute[:]
            node.attribute.extend(kept)
    return proto


@functools.lru_cache(maxsize=None)
def _onnx2torch():
    """onnx2torch with the converters of _register_converters_after_13 (registered once per process)."""
    try:
        import onnx2torch
    except ImportError as exc:
        raise CompressorError("compress finetune needs onnx2torch (pip install onnx2torch)") from exc
    _register_converters_after_13()
    return onnx2torch


def add_conv_biases(proto: onnx.ModelProto) -> None:
    """In place: give every Conv without a bias a zero bias initializer (same function, same MACs), so that a
    BatchNorm can be folded into it later."""
    names = {init.name for init in proto.graph.initializer}
    weights = {init.name: init for init in proto.graph.initializer}
    for index, node in enumerate(proto.graph.node):
        if node.op_type != "Conv" or len(node.input) >= 3 or node.input[1] not in weights:
            continue
        weight = weights[node.input[1]]
        name = f"{node.name or 'conv' + str(index)}.finetune_bias"
        while name in names:
            name += "_"
        names.add(name)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(weight.data_type)
        proto.graph.initializer.append(numpy_helper.from_array(np.zeros(weight.dims[0], dtype=dtype), name))
        node.input.append(name)


def convert_onnx(model, *, trainable: bool = True, conv_biases: bool = False) -> OnnxModule:
    """Convert an ONNX model (path or ModelProto) into a torch module in train mode; with `trainable`, link each
    parameter of a Conv/ConvTranspose/Gemm/BatchNormalization node to its initializer and freeze every other
    parameter; with `conv_biases`, biasless Convs get a zero bias first (add_conv_biases). Raises CompressorError
    naming the op when onnx2torch cannot convert the graph."""
    onnx2torch = _onnx2torch()
    from onnx2torch.onnx_graph import OnnxGraph

    proto = load_model(model)
    if conv_biases:
        add_conv_biases(proto)
    try:
        module = onnx2torch.convert(_prepare_for_onnx2torch(proto))
    except (NotImplementedError, KeyError, ValueError, RuntimeError) as exc:
        raise CompressorError(f"onnx2torch cannot convert this model: {type(exc).__name__}: {exc}") from exc
    converted = OnnxModule(module, proto)
    if not trainable:
        module.eval().requires_grad_(False)
        return converted
    initializers = {init.name for init in proto.graph.initializer}
    users: dict[str, int] = {}
    for node in proto.graph.node:
        for name in set(node.input):
            users[name] = users.get(name, 0) + 1
    submodules = dict(module.named_modules())
    linked: set[str] = set()
    for name, node in OnnxGraph(proto.graph).nodes.items():
        inputs = WRITE_BACK_INPUTS.get(node.operation_type)
        owner = submodules.get(name)
        if inputs is None or owner is None:
            continue
        for tensor_name, tensor in list(owner.named_parameters()) + list(owner.named_buffers()):
            index = inputs.get(tensor_name.rsplit(".", 1)[-1])
            source = node.input_values[index] if index is not None and index < len(node.input_values) else ""
            if source not in initializers or users.get(source, 0) != 1:
                continue  # computed at run time, or shared by several nodes: leave it as it is
            transpose = node.operation_type == "Gemm" and not node.attributes.get("transB", 0)
            converted.links.append(TensorLink(name, tensor_name, source, transpose))
            linked.add(f"{name}.{tensor_name}")
        own = {link.tensor_name.rsplit(".", 1)[-1] for link in converted.links if link.module_name == name}
        if node.operation_type == "Conv" and {"weight", "bias"} <= own and "." not in name:
            converted.convs.append(name)
    for param_name, param in module.named_parameters():
        if param_name not in linked:
            param.requires_grad_(False)
            converted.frozen.append(param_name)
    return converted


def write_back(converted: OnnxModule, module: nn.Module | None = None) -> onnx.ModelProto:
    """A copy of the converted graph whose linked initializers hold the current values of `module` (default: the
    converted module itself), in each initializer's own dtype and layout."""
    module = module if module is not None else converted.module
    proto = copy.deepcopy(converted.proto)
    by_name = {init.name: init for init in proto.graph.initializer}
    submodules = dict(module.named_modules())
    for link in converted.links:
        owner = submodules[link.module_name]
        tensor = dict(list(owner.named_parameters()) + list(owner.named_buffers()))[link.tensor_name]
        value = tensor.detach().to("cpu", torch.float32)
        value = value.T if link.transpose else value
        target = by_name[link.initializer]
        old = numpy_helper.to_array(target)
        if tuple(old.shape) != tuple(value.shape):
            raise CompressorError(f"trained tensor {link.module_name}.{link.tensor_name} has shape "
                                  f"{tuple(value.shape)}, its initializer {link.initializer} {old.shape}")
        new = numpy_helper.from_array(np.ascontiguousarray(value.numpy().astype(old.dtype)), link.initializer)
        target.CopyFrom(new)
    return proto


def output_classes(converted: OnnxModule) -> int | None:
    """Size of the last dim of the first graph output (the number of classes of a classifier), when static."""
    dims = converted.proto.graph.output[0].type.tensor_type.shape.dim
    if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value > 0:
        return int(dims[-1].dim_value)
    return None

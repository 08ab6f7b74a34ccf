"""GSM's filter groups (structured mode): which filters go together with which BN parameters, and the MACs each
filter costs (its own and its consumer's input slice), measured by one forward pass."""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn as nn

from compressor.errors import CompressorError


class FilterGroup(NamedTuple):
    """One removable conv layer for structured GSM: unit j is conv_weight[j] with bn_weight[j] and bn_bias[j].

    bn_weight may be None for a conv without BN; then pass the conv's own bias (or None) as bn_bias.
    """

    conv_weight: nn.Parameter
    bn_weight: nn.Parameter | None
    bn_bias: nn.Parameter | None
    macs_per_filter: int


def _output_sizes(model: nn.Module, modules: Iterable[nn.Module], input_shape: Sequence[int]) -> dict[int, torch.Size]:
    """Output shape of each given module for one forward pass of zeros of input_shape (batch 1), eval mode kept."""
    sizes: dict[int, torch.Size] = {}
    hooks = [m.register_forward_hook(lambda mod, _i, out: sizes.__setitem__(id(mod), out.shape)) for m in modules]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(*input_shape, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return sizes


def _layer_macs(module: nn.Module, out_shape: torch.Size) -> int:
    """MACs of one conv or linear layer for one sample (batch 1)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size) * (module.in_channels // module.groups)
        return kernel * math.prod(out_shape[1:])
    return module.in_features * math.prod(out_shape[1:])


def conv_linear_macs(model: nn.Module, input_shape: Sequence[int] = (1, 3, 32, 32)) -> int:
    """MACs of all conv and linear layers of the model for one sample of input_shape (batch 1)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    sizes = _output_sizes(model, layers, input_shape)
    return sum(_layer_macs(m, sizes[id(m)]) for m in layers if id(m) in sizes)


def filter_groups_for(
    model: nn.Module,
    pairs: Sequence[tuple[nn.Module, nn.Module | None, nn.Module]],
    input_shape: Sequence[int] = (1, 3, 32, 32),
) -> list[FilterGroup]:
    """Filter groups from (conv, bn, consumer) triples: conv's filters with bn's gamma/beta (bn may be None: then the
    conv's bias); consumer is the one conv (groups=1) or linear that reads conv's output channels. macs_per_filter =
    the conv's MACs per filter + the consumer's MACs per input channel, measured by one forward pass of input_shape."""
    modules = [m for conv, _bn, consumer in pairs for m in (conv, consumer)]
    sizes = _output_sizes(model, modules, input_shape)
    groups = []
    for conv, bn, consumer in pairs:
        if id(conv) not in sizes or id(consumer) not in sizes:
            raise CompressorError("a filter-group conv or its consumer is not used in the forward pass")
        if isinstance(consumer, nn.modules.conv._ConvNd) and consumer.groups != 1:
            raise CompressorError("grouped or depthwise consumers are not supported for GSM filter groups")
        own = _layer_macs(conv, sizes[id(conv)]) // conv.out_channels
        consumer_macs = _layer_macs(consumer, sizes[id(consumer)])
        consumer_inputs = consumer.in_channels if isinstance(consumer, nn.modules.conv._ConvNd) else consumer.in_features
        if consumer_inputs % conv.out_channels:
            raise CompressorError("the consumer's inputs are not a whole multiple of the conv's filters")
        per_channel = consumer_macs // conv.out_channels
        if bn is not None:
            groups.append(FilterGroup(conv.weight, bn.weight, bn.bias, own + per_channel))
        else:
            groups.append(FilterGroup(conv.weight, None, conv.bias, own + per_channel))
    return groups


def cifar_resnet_filter_groups(model: nn.Module, image_size: int = 32) -> list[FilterGroup]:
    """Filter groups of a CIFAR ResNet (compressor.training.models): conv1 + bn1 of every BasicBlock, consumer conv2."""
    from compressor.training.models import BasicBlock

    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    if not blocks:
        raise CompressorError("the model has no BasicBlock: build its GSM filter groups with filter_groups_for")
    return filter_groups_for(model, [(b.conv1, b.bn1, b.conv2) for b in blocks], (1, 3, image_size, image_size))

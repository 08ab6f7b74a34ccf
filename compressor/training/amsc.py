"""AMSC: adaptive multi-dimensional structured compression (depth-first adaptive group lasso with exact zeros).

Loss = CE + lambda0 * sum_l w(l) ||theta_l||_2 + lambda1 * sum_{l,j} w(l,j) ||theta_{l,j}||_2 with
- depth groups theta_l: every residual branch the engine can drop (identity shortcut: never a block with a padding
  or projection shortcut): its convs and BNs, gamma and beta included, so a zero group is an exact identity;
- width groups theta_{l,j}: filter j of an inner conv of a residual branch (every conv of a VGG) with its BN gamma_j,
  beta_j, so a zero group is a channel of exact zeros;
- weights w(g) = sqrt(q_g) / ||theta_hat_g|| (adaptive: theta_hat the starting weights, q_g the group's number of
  scalars), sqrt(q_g) (uniform) or sqrt(q_g) * ||theta_hat_g|| (reverse), for ablations.
Optimization is SGD on CE followed, after every step, by the proximal operator of the penalty: group soft-thresholding
theta_g <- theta_g * max(0, 1 - lr * lambda * w(g) / ||theta_g||), filters first, then blocks (for nested groups this
order is the exact proximal operator of the sum). Groups reach exact zeros; their momentum is cleared as they do.

Every conv in a group is directly followed by its BN, so the network's function does not depend on the norm of a
conv filter, only on its direction (and on gamma, beta). The shrinkage therefore leaves the surviving filters far
smaller than they started, which (a) makes the BN running statistics lag behind the weights during the sparse phase
and (b) multiplies the effective learning rate of a later fine-tune on those filters by (start norm / norm)^2, which
scrambles them. `renormalize_filters` undoes the scale exactly (each surviving filter back to its starting norm, its
BN running mean/var rescaled to match): the same function up to BN's eps, the same structure, healthy step sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from compressor.errors import CompressorError
from compressor.training.loop import TrainHooks
from compressor.training.masks import ParameterMasks

DIMENSIONS = ("both", "depth-only", "width-only")
WEIGHTINGS = ("adaptive", "uniform", "reverse")


@dataclass
class DepthGroup:
    """One droppable residual branch: all its parameters (conv weights, BN gamma and beta)."""

    name: str
    params: list[tuple[str, nn.Parameter]]
    weight: float = 1.0

    @property
    def size(self) -> int:
        """q_l: number of scalars in the group."""
        return sum(p.numel() for _, p in self.params)

    def norm(self) -> torch.Tensor:
        """||theta_l||_2 (a 0-d tensor, differentiable)."""
        return torch.linalg.vector_norm(torch.cat([p.reshape(-1) for _, p in self.params]))


@dataclass
class WidthLayer:
    """The width groups of one conv: filter j of conv with gamma_j, beta_j of its BN; `consumer` reads the channels."""

    name: str
    bn_name: str
    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    consumer: nn.Module
    block: str | None = None  # the residual block holding the conv, if any
    weights: torch.Tensor = field(default_factory=lambda: torch.ones(0))

    @property
    def filter_size(self) -> int:
        """q_{l,j}: scalars per filter group (the filter's weights + gamma_j + beta_j)."""
        return self.conv.weight[0].numel() + 2

    def rows(self) -> torch.Tensor:
        """[filters, q] matrix: each row one group's scalars (differentiable)."""
        return torch.cat([self.conv.weight.reshape(self.conv.out_channels, -1), self.bn.weight[:, None],
                          self.bn.bias[:, None]], 1)

    def norms(self) -> torch.Tensor:
        """||theta_{l,j}||_2 per filter."""
        return torch.linalg.vector_norm(self.rows(), dim=1)


@dataclass
class ConvBn:
    """A conv whose weights belong to a group, the BN that directly normalizes it, and its starting filter norms."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    start_norms: torch.Tensor

    def filter_norms(self) -> torch.Tensor:
        """Current norm of every output filter of the conv."""
        return torch.linalg.vector_norm(self.conv.weight.detach().reshape(self.conv.out_channels, -1).float(), dim=1)


@dataclass
class AmscStructure:
    """The depth and width groups of a model, with their penalty weights fixed from the starting weights."""

    depth: list[DepthGroup]
    width: list[WidthLayer]
    weighting: str = "adaptive"
    conv_bns: list[ConvBn] = field(default_factory=list)

    def counts(self) -> dict:
        """Groups in the model and how many are exactly zero now (filters_zero: outside zero blocks)."""
        with torch.no_grad():
            zero_blocks = [g.name for g in self.depth if float(g.norm()) == 0.0]
            zero_filters = {w.name: int((w.norms() == 0).sum()) for w in self.width if w.block not in zero_blocks}
        return {"blocks_total": len(self.depth), "blocks_zero": len(zero_blocks), "zero_blocks": zero_blocks,
                "filters_total": sum(w.conv.out_channels for w in self.width),
                "filters_zero": sum(zero_filters.values()), "zero_filters_per_layer": zero_filters}


def _residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module, list[tuple[nn.Conv2d, nn.BatchNorm2d]], bool]]:
    """(name, block, [(conv_i, bn_i)...], identity shortcut?) for every module shaped like a ResNet block
    (attributes conv1/bn1/conv2/bn2[/conv3/bn3]; shortcut `shortcut` (nn.Identity) or `downsample` (None))."""
    found = []
    for name, module in model.named_modules():
        if not all(isinstance(getattr(module, a, None), (nn.Conv2d, nn.BatchNorm2d)) for a in ("conv1", "bn1", "conv2", "bn2")):
            continue
        layers = [(getattr(module, f"conv{i}"), getattr(module, f"bn{i}")) for i in (1, 2, 3)
                  if isinstance(getattr(module, f"conv{i}", None), nn.Conv2d)]
        if hasattr(module, "shortcut"):
            identity = isinstance(module.shortcut, nn.Identity)
        else:
            identity = getattr(module, "downsample", "missing") is None
        found.append((name, module, layers, identity))
    return found


def _plain_conv_stack(model: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d, nn.Module]]:
    """(name, conv, bn, consumer) for a VGG-like model: every conv followed by a BN, the next conv (or the last linear)
    consuming it."""
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    convs = [(i, n, m) for i, (n, m) in enumerate(modules) if isinstance(m, nn.Conv2d)]
    layers = []
    for k, (i, name, conv) in enumerate(convs):
        bn = modules[i + 1][1] if i + 1 < len(modules) else None
        consumer = next((m for _, m in modules[i + 1:] if isinstance(m, (nn.Conv2d, nn.Linear))), None)
        if isinstance(bn, nn.BatchNorm2d) and consumer is not None:
            layers.append((name, conv, bn, consumer))
    return layers


def amsc_structure(model: nn.Module, dims: str = "both", weighting: str = "adaptive") -> AmscStructure:
    """Find the depth and width groups of a CIFAR ResNet, a torchvision ResNet or a VGG-like conv stack and fix their
    weights from the model's current (starting) weights."""
    if dims not in DIMENSIONS:
        raise CompressorError(f"unknown AMSC dimensions '{dims}' (choose from: {', '.join(DIMENSIONS)})")
    if weighting not in WEIGHTINGS:
        raise CompressorError(f"unknown AMSC weighting '{weighting}' (choose from: {', '.join(WEIGHTINGS)})")
    names = {id(p): n for n, p in model.named_parameters()}
    module_names = {id(m): n for n, m in model.named_modules()}
    depth: list[DepthGroup] = []
    width: list[WidthLayer] = []
    pairs: dict[int, tuple[nn.Conv2d, nn.BatchNorm2d]] = {}
    blocks = _residual_blocks(model)
    if blocks:
        for name, _block, layers, identity in blocks:
            if identity and dims != "width-only":
                params = [(names[id(p)], p) for conv, bn in layers for p in (conv.weight, bn.weight, bn.bias)]
                params += [(names[id(conv.bias)], conv.bias) for conv, _ in layers if conv.bias is not None]
                depth.append(DepthGroup(name, params))
                pairs.update({id(conv): (conv, bn) for conv, bn in layers})
            if dims != "depth-only":
                for (conv, bn), (consumer, _) in zip(layers[:-1], layers[1:]):
                    if conv.groups == 1 and consumer.groups == 1 and conv.bias is None:
                        width.append(WidthLayer(module_names[id(conv)], module_names[id(bn)], conv, bn, consumer, name))
    elif dims != "depth-only":
        width = [WidthLayer(name, module_names[id(bn)], conv, bn, consumer)
                 for name, conv, bn, consumer in _plain_conv_stack(model) if conv.groups == 1 and conv.bias is None]
    if not depth and not width:
        raise CompressorError(f"AMSC ({dims}) finds no groups in this model: it supports ResNet-style blocks "
                              "(conv1/bn1/conv2/bn2) and VGG-style conv+BN stacks")
    pairs.update({id(layer.conv): (layer.conv, layer.bn) for layer in width})
    structure = AmscStructure(depth, width, weighting)
    structure.conv_bns = [ConvBn(conv, bn, torch.ones(0)) for conv, bn in pairs.values()]
    for pair in structure.conv_bns:
        pair.start_norms = pair.filter_norms().clone()
    set_group_weights(structure, weighting)
    return structure


@torch.no_grad()
def renormalize_filters(structure: AmscStructure) -> int:
    """Scale every non-zero filter of the structure's convs back to its starting norm and its BN running mean and
    variance by the same factor (and its square): the model computes the same function (exactly, up to BN's eps),
    zero filters stay zero, and a fine-tune gets the step sizes of the starting weights back. Returns the number of
    filters rescaled."""
    rescaled = 0
    for pair in structure.conv_bns:
        norms = pair.filter_norms()
        start = pair.start_norms.to(norms.device)
        alive = (norms > 0) & (start > 0)
        scale = torch.where(alive, start / torch.where(alive, norms, torch.ones_like(norms)), torch.ones_like(norms))
        pair.conv.weight.mul_(scale.view(-1, 1, 1, 1).to(pair.conv.weight.dtype))
        if pair.conv.bias is not None:
            pair.conv.bias.mul_(scale.to(pair.conv.bias.dtype))
        if pair.bn.running_mean is not None:
            pair.bn.running_mean.mul_(scale.to(pair.bn.running_mean.dtype))
            pair.bn.running_var.mul_((scale ** 2).to(pair.bn.running_var.dtype))
        rescaled += int(alive.sum())
    return rescaled


@torch.no_grad()
def set_group_weights(structure: AmscStructure, weighting: str) -> None:
    """Fix w(g) from the current weights: adaptive sqrt(q)/||theta_hat||, uniform sqrt(q), reverse sqrt(q)*||theta_hat||.
    A group that already is zero gets a huge adaptive weight (it stays zero)."""
    tiny = torch.finfo(torch.float32).tiny
    for group in structure.depth:
        norm = max(float(group.norm()), tiny)
        group.weight = _weight(math.sqrt(group.size), norm, weighting)
    for layer in structure.width:
        norms = layer.norms().float().clamp(min=tiny)
        root_q = math.sqrt(layer.filter_size)
        layer.weights = _weight(root_q, norms, weighting)
    structure.weighting = weighting


def _weight(root_q, norm, weighting: str):
    if weighting == "adaptive":
        return root_q / norm
    if weighting == "uniform":
        return root_q * torch.ones_like(norm) if torch.is_tensor(norm) else root_q
    return root_q * norm


def amsc_penalty(structure: AmscStructure, lambda_depth: float, lambda_width: float) -> torch.Tensor:
    """lambda0 * sum_l w(l) ||theta_l|| + lambda1 * sum_{l,j} w(l,j) ||theta_{l,j}|| (differentiable)."""
    terms = [lambda_depth * group.weight * group.norm().float() for group in structure.depth]
    terms += [lambda_width * (layer.weights.to(layer.conv.weight.device) * layer.norms().float()).sum()
              for layer in structure.width]
    return torch.stack(terms).sum()


@torch.no_grad()
def proximal_step(structure: AmscStructure, lr: float, lambda_depth: float, lambda_width: float,
                  optimizer: torch.optim.Optimizer | None = None) -> None:
    """Group soft-threshold: theta_g <- theta_g * max(0, 1 - lr*lambda*w(g)/||theta_g||), filters then blocks.
    Groups that reach zero are exactly zero, and so is their optimizer state (momentum)."""
    if lambda_width > 0:
        for layer in structure.width:
            weights = layer.weights.to(layer.conv.weight.device)
            norms = layer.norms().float()
            scale = _shrink(norms, lr * lambda_width * weights)
            for p, shape in ((layer.conv.weight, (-1, 1, 1, 1)), (layer.bn.weight, (-1,)), (layer.bn.bias, (-1,))):
                _scale_param(p, scale.view(shape).to(p.dtype), optimizer)
    if lambda_depth > 0:
        for group in structure.depth:
            scale = _shrink(group.norm().float(), lr * lambda_depth * group.weight)
            for _, p in group.params:
                _scale_param(p, scale.to(p.dtype), optimizer)


def _shrink(norms: torch.Tensor, thresholds) -> torch.Tensor:
    """max(0, 1 - t/||x||), 0 where ||x|| = 0."""
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, (1 - thresholds / safe).clamp(min=0), torch.zeros_like(norms))


def _scale_param(p: torch.Tensor, scale: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    p.mul_(scale)
    if optimizer is not None:
        keep = (scale != 0).to(p.dtype)
        for value in optimizer.state.get(p, {}).values():
            if torch.is_tensor(value) and value.shape == p.shape:
                value.mul_(keep)


class AmscHooks(TrainHooks):
    """Training hook: the proximal step after every optimizer step (or, with penalty_in_loss, the penalty as a loss
    term for plain subgradient descent)."""

    def __init__(self, structure: AmscStructure, lambda_depth: float, lambda_width: float, penalty_in_loss: bool = False):
        self.structure = structure
        self.lambda_depth = float(lambda_depth)
        self.lambda_width = float(lambda_width)
        self.penalty_in_loss = penalty_in_loss

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """The AMSC penalty when it is optimized by subgradient, else None."""
        if not self.penalty_in_loss:
            return None
        return amsc_penalty(self.structure, self.lambda_depth, self.lambda_width)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> None:
        """Proximal group soft-threshold with this step's learning rate."""
        if not self.penalty_in_loss:
            proximal_step(self.structure, lr, self.lambda_depth, self.lambda_width, optimizer)


@torch.no_grad()
def structure_masks(structure: AmscStructure) -> ParameterMasks:
    """Masks that keep the structure's zero groups (whole blocks, single filters with gamma and beta) at zero."""
    keep: dict[str, torch.Tensor] = {}
    for group in structure.depth:
        if float(group.norm()) == 0.0:
            keep.update({name: torch.zeros(p.shape, dtype=torch.bool) for name, p in group.params})
    for layer in structure.width:
        alive = (layer.norms() != 0).cpu()
        if bool(alive.all()):
            continue
        for name, p in ((f"{layer.name}.weight", layer.conv.weight), (f"{layer.bn_name}.weight", layer.bn.weight),
                        (f"{layer.bn_name}.bias", layer.bn.bias)):
            mask = alive.view(-1, *([1] * (p.dim() - 1))).expand(p.shape).clone()
            keep[name] = keep[name] & mask if name in keep else mask
    return ParameterMasks(keep)


def kill_lambdas(structure: AmscStructure, kind: str, lr_sum: float) -> np.ndarray:
    """Per group, the lambda whose proximal steps alone (no gradient) would bring it to zero over a run whose
    learning rates sum to lr_sum: ||theta_hat_g|| / (w(g) * lr_sum). The automatic lambda grids span these."""
    with torch.no_grad():
        if kind == "depth":
            values = [float(g.norm()) / (g.weight * lr_sum) for g in structure.depth]
        else:
            values = [v for layer in structure.width
                      for v in (layer.norms().float().cpu() / (layer.weights.cpu() * lr_sum)).tolist()]
    return np.array([v for v in values if np.isfinite(v) and v > 0])


def auto_grid(kills: np.ndarray, points: int, low_quantile: float = 0.1, high_quantile: float = 0.9,
              high_factor: float = 1.0) -> list[float]:
    """A log-spaced grid from the low quantile of the kill lambdas to high_factor times the high quantile. The
    gradient resists the shrinkage, so fewer groups die than these estimates say; the search extends the grid
    upward when a ratio is out of reach."""
    if not len(kills):
        raise CompressorError("no groups to build a lambda grid from")
    low = float(np.quantile(kills, low_quantile))
    high = float(np.quantile(kills, high_quantile)) * high_factor
    if points <= 1:
        return [float(math.sqrt(low * high))]
    return [float(v) for v in np.geomspace(low, high, points)]

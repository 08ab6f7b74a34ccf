"""Train a folded network with BatchNorm again: a BatchNorm after every converted Conv while training, folded back
into the Conv's weight and bias at the end.

Exported CNNs have their BatchNorm folded into the convolutions. Without it a deep network is fragile to fine-tune:
on the CIFAR ResNet-56 export, one SGD step at lr 0.01 with the distillation loss makes the logits explode. Each
inserted BatchNorm starts as the identity on the data (its affine parameters are set to the per-channel mean and
standard deviation of the Conv's output, measured on a few batches), normalizes with batch statistics while
training, and folds exactly into the Conv when done (w' = w * g / s, b' = (b - m) * g / s + beta with
s = sqrt(running_var + eps)). The graph gets no new node: only the Conv's weight and bias change.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn


class ConvWithBatchNorm(nn.Module):
    """A converted Conv (nn.Conv2d, or onnx2torch's Sequential(pad, conv)) followed by a BatchNorm2d."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.conv = inner if isinstance(inner, nn.Conv2d) else inner[-1]
        self.bn = nn.BatchNorm2d(self.conv.out_channels).to(self.conv.weight.device)
        self.calibrating = False
        self.sums: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The Conv, then the BatchNorm (or, while calibrating, the Conv alone with its output statistics summed)."""
        y = self.inner(x)
        if self.calibrating:
            flat = y.detach().double().transpose(0, 1).reshape(y.shape[1], -1)
            stats = torch.stack([flat.sum(1), (flat * flat).sum(1), torch.full_like(flat[:, 0], flat.shape[1])])
            self.sums = stats if self.sums is None else self.sums + stats
            return y
        return self.bn(y)

    def start_as_identity(self) -> None:
        """Set running statistics and affine parameters from the calibration sums, so the BatchNorm computes the
        identity on data distributed like the calibration batches."""
        total, squares, count = self.sums
        mean = total / count
        var = (squares / count - mean * mean).clamp(min=0)
        with torch.no_grad():
            self.bn.running_mean.copy_(mean.float())
            self.bn.running_var.copy_(var.float())
            self.bn.weight.copy_(torch.sqrt(var + self.bn.eps).float())
            self.bn.bias.copy_(mean.float())
        self.sums, self.calibrating = None, False

    @torch.no_grad()
    def folded(self) -> nn.Module:
        """The inner Conv with the eval-mode BatchNorm folded into its weight and bias (which must exist)."""
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        self.conv.weight.mul_(scale.view(-1, *([1] * (self.conv.weight.dim() - 1))))
        self.conv.bias.copy_((self.conv.bias - self.bn.running_mean) * scale + self.bn.bias)
        return self.inner


def insert_batchnorms(module: nn.Module, names: Iterable[str], batches: Iterable[torch.Tensor]) -> list[str]:
    """Wrap the named Conv submodules (direct children of `module`, each with a bias) in ConvWithBatchNorm, calibrate
    on `batches` (normalized images) and start every BatchNorm as the identity; returns the wrapped names."""
    wrapped = []
    for name in names:
        inner = getattr(module, name)
        conv = inner if isinstance(inner, nn.Conv2d) else inner[-1] if isinstance(inner, nn.Sequential) else None
        if not isinstance(conv, nn.Conv2d) or conv.bias is None:
            continue
        wrapper = ConvWithBatchNorm(inner)
        wrapper.calibrating = True
        setattr(module, name, wrapper)
        wrapped.append(name)
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for images in batches:
            module(images)
    for name in wrapped:
        getattr(module, name).start_as_identity()
    module.train(was_training)
    return wrapped


def fold_batchnorms(module: nn.Module, names: Iterable[str]) -> None:
    """Fold every wrapped BatchNorm back into its Conv and put the plain Conv back in place."""
    for name in names:
        setattr(module, name, getattr(module, name).folded())

"""Model definitions for training and export: CIFAR ResNets with option-A shortcuts (He et al. 2016), VGG-16-BN for
CIFAR, torchvision classifiers (random init, never downloaded weights), and checkpoint loading."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from compressor.errors import CompressorError

CIFAR_RESNET_DEPTHS = {"resnet8": 1, "resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channel axis (no weights)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem (16), three stages of n basic blocks (16, 32, 64), global pool, linear."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            layers = []
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(name: str, num_classes: int = 10) -> CifarResNet:
    """A CIFAR ResNet by name: resnet8 (tests), resnet20, resnet32, resnet44, resnet56 or resnet110."""
    if name not in CIFAR_RESNET_DEPTHS:
        raise CompressorError(f"unknown CIFAR ResNet '{name}' (choose from: {', '.join(CIFAR_RESNET_DEPTHS)})")
    return CifarResNet(CIFAR_RESNET_DEPTHS[name], num_classes)


CIFAR_VGG_CONFIGS = {
    "vgg16_bn": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}
TORCHVISION_PREFIX = "tv:"


class CifarVGG(nn.Module):
    """VGG with BN for 32x32 inputs: 3x3 conv+BN+ReLU stacks with 2x2 max pools, global pool, one linear layer."""

    def __init__(self, config: tuple, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_channels, item, 3, 1, 1, bias=False), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                in_channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(out)


def cifar_vgg(name: str = "vgg16_bn", num_classes: int = 10) -> CifarVGG:
    """A CIFAR VGG by name (vgg16_bn)."""
    if name not in CIFAR_VGG_CONFIGS:
        raise CompressorError(f"unknown CIFAR VGG '{name}' (choose from: {', '.join(CIFAR_VGG_CONFIGS)})")
    return CifarVGG(CIFAR_VGG_CONFIGS[name], num_classes)


def torchvision_classifier(name: str, num_classes: int = 1000) -> nn.Module:
    """A torchvision classification model by name (e.g. resnet18, mobilenet_v2), randomly initialized."""
    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001 - a torchvision built for another torch fails in many ways
        raise CompressorError(f"torchvision is not usable here ({type(exc).__name__}: {exc})") from exc
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except ValueError as exc:
        raise CompressorError(f"unknown torchvision model '{name}': {exc}") from exc


def model_names() -> list[str]:
    """Names build_model accepts (torchvision classifiers as tv:NAME)."""
    return [*CIFAR_RESNET_DEPTHS, *CIFAR_VGG_CONFIGS, f"{TORCHVISION_PREFIX}NAME"]


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A model by name: a CIFAR ResNet (resnet20..resnet110), a CIFAR VGG (vgg16_bn) or tv:NAME for torchvision."""
    if name in CIFAR_RESNET_DEPTHS:
        return cifar_resnet(name, num_classes)
    if name in CIFAR_VGG_CONFIGS:
        return cifar_vgg(name, num_classes)
    if name.startswith(TORCHVISION_PREFIX):
        return torchvision_classifier(name[len(TORCHVISION_PREFIX):], num_classes)
    raise CompressorError(f"unknown model '{name}' (choose from: {', '.join(model_names())})")


def load_checkpoint(model: nn.Module, path: str | Path) -> dict:
    """Load a checkpoint into the model: a published CIFAR ResNet checkpoint (legacy torch.save of
    {'state_dict': ...}, keys prefixed 'module.') or one written by `compress train` (same layout, no prefix).

    Returns the checkpoint's other entries (e.g. best_prec1, arch, metrics).
    """
    path = Path(path)
    if not path.is_file():
        raise CompressorError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many kinds of errors
        raise CompressorError(f"cannot read checkpoint {path}: {exc}") from exc
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CompressorError(f"checkpoint {path} holds no state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CompressorError(f"checkpoint {path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return {k: v for k, v in ckpt.items() if k != "state_dict"}


load_cifar_resnet_checkpoint = load_checkpoint  # the published checkpoints' loader, under its first name

"""Real torchvision architectures through both torch exporters: `zeros` is exact, `l1 --ratio 0.5` verifies."""

from __future__ import annotations

import numpy as np
import pytest

import compressor
from compressor.engine.analysis import analyze
from tests.conftest import export_onnx
from tests.zeroing import zero_structures

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

MODELS = {
    "resnet18": 64,
    "mobilenet_v2": 64,
    "efficientnet_b0": 64,
    "densenet121": 64,
    "squeezenet1_1": 64,
    "googlenet": 64,
    "regnet_x_400mf": 64,
    "vgg11_bn": 224,  # its adaptive pool needs a 7x7 feature map
    "shufflenet_v2_x0_5": 64,
    "resnext50_32x4d": 64,
}
CASES = [(name, dynamo) for name in MODELS for dynamo in (False, True)]


def randomize_bn(model) -> None:
    """Give BN layers non-trivial statistics so folded and unfolded exports differ from the identity."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def exported(export_dir):
    cache = {}

    def get(name: str, dynamo: bool):
        key = (name, dynamo)
        if key not in cache:
            torch.manual_seed(0)
            kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
            model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
            randomize_bn(model)
            size = MODELS[name]
            cache[key] = export_onnx(model, torch.randn(1, 3, size, size), export_dir / f"{name}_{int(dynamo)}.onnx", dynamo)
        return cache[key]

    return get


@pytest.mark.parametrize("name,dynamo", CASES, ids=[f"{n}-{'dynamo' if d else 'torchscript'}" for n, d in CASES])
def test_l1_half_macs_verified(exported, name, dynamo):
    result = compressor.compress(exported(name, dynamo), method="l1", ratio=0.5)
    report = result.report
    assert report["verified"] and report["relative_error_vs_reference"] <= report["relative_tolerance"]
    assert abs(report["macs_reduction"] - 0.5) <= 0.02
    assert report["macs_after"] == report["macs_planned"]
    assert report["params_after"] == report["params_planned"]


@pytest.mark.parametrize("name,dynamo", CASES, ids=[f"{n}-{'dynamo' if d else 'torchscript'}" for n, d in CASES])
def test_zeros_removes_exactly_the_zeroed_structures(exported, name, dynamo):
    analysis = analyze(exported(name, dynamo))
    zeroed, expected = zero_structures(analysis)
    result = compressor.compress(zeroed, method="zeros")
    found = {g: set(v.tolist()) for g, v in result.plan.removed.items() if len(v)}
    assert found == {g: set(v.tolist()) for g, v in expected.removed.items()}
    assert result.plan.dropped_blocks == expected.dropped_blocks
    report = result.report
    # the result computes the same function: only float summation order may differ (10x inside the verification
    # tolerance, relative to each output's own scale)
    assert report["relative_error_vs_original"] <= report["relative_tolerance"] / 10
    # MACs measured on the pruned graph fall by exactly the zeroed structures' MACs
    expected_macs, expected_params = result.analysis.cost(expected)
    assert report["macs_after"] == expected_macs < report["macs_before"]
    assert report["params_after"] == expected_params
    dropped = result.analysis.blocks[next(iter(expected.dropped_blocks))].macs if expected.dropped_blocks else 0
    assert report["macs_before"] - report["macs_after"] >= dropped

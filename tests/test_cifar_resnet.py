"""The CIFAR ResNet-56 of ../shared/models (option-A shortcuts) through the engine, with hand-computed MACs."""

from __future__ import annotations

import pytest

import compressor
from compressor.engine.analysis import analyze
from tests.conftest import CIFAR_MODELS, assert_close_to_scale, export_onnx

torch = pytest.importorskip("torch")
from compressor.training.models import cifar_resnet, load_cifar_resnet_checkpoint  # noqa: E402


def resnet56():
    model = cifar_resnet("resnet56").eval()
    checkpoints = sorted(CIFAR_MODELS.glob("resnet56-*.th")) if CIFAR_MODELS.exists() else []
    if checkpoints:
        load_cifar_resnet_checkpoint(model, checkpoints[0])
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["torchscript", "dynamo"])
def resnet56_onnx(request, export_dir):
    path = export_dir / f"resnet56_{int(request.param)}.onnx"
    if not path.exists():
        export_onnx(resnet56(), torch.randn(1, 3, 32, 32), path, request.param)
    return path


def conv_macs(hw: int, cin: int, cout: int) -> int:
    return hw * hw * cin * cout * 9


def test_structure_blocks_and_groups(resnet56_onnx):
    analysis = analyze(resnet56_onnx)
    # 27 blocks; the first block of stages 2 and 3 has a padding shortcut and is not removable
    assert len(analysis.blocks) == 25
    assert analysis.macs == 125_485_696  # stem + 54 block convs + linear, counted by hand
    inner = [g for g in analysis.groups if len(g.producers) == 1 and g.size in (16, 32, 64) and g.prunable.all()]
    assert len(inner) == 27  # conv1 of every block
    # the residual stream of all three stages is one group: zero-pad shortcuts couple the stages
    stream = max(analysis.groups, key=lambda g: len(g.producers))
    assert stream.size == 64 and stream.prunable.all()


def test_zeros_removes_zeroed_filters_and_block_with_exact_macs(export_dir):
    model = resnet56()
    with torch.no_grad():
        for j in (3, 5):  # two filters of layer1.0.conv1: its BN makes them exactly zero
            model.layer1[0].bn1.weight[j] = 0
            model.layer1[0].bn1.bias[j] = 0
        model.layer2[3].bn2.weight.zero_()  # a whole branch of stage 2
        model.layer2[3].bn2.bias.zero_()
    for dynamo in (False, True):
        path = export_onnx(model, torch.randn(1, 3, 32, 32), export_dir / f"r56_zeroed_{int(dynamo)}.onnx", dynamo)
        result = compressor.compress(path, method="zeros")
        report = result.report
        filters = 2 * (conv_macs(32, 16, 16) // 16) * 2  # each filter: its own conv1 slice + conv2's input slice
        branch = 2 * conv_macs(16, 32, 32)
        assert report["macs_before"] - report["macs_after"] == filters + branch
        assert len(report["blocks_removed"]) == 1
        # the same function up to float rounding, judged on the outputs' own scale (the checkpoint's logits are ~10,
        # a random-init ResNet-56's ~1e4: measured ~3e-7 relative on both)
        assert report["relative_error_vs_original"] <= 1e-5
        x = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            expected = model(x).numpy()
        from compressor.runtime.sessions import cpu_session

        got = cpu_session(result.model).run(None, {result.model.graph.input[0].name: x[:1].numpy()})[0]
        assert_close_to_scale(got, expected[:1], 1e-5)


def test_l1_half_macs(resnet56_onnx):
    result = compressor.compress(resnet56_onnx, method="l1", ratio=0.5)
    assert result.report["verified"]
    assert abs(result.report["macs_reduction"] - 0.5) <= 0.02

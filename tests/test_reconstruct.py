"""Reconstruction: refitting the layers that consume removed channels on calibration data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

import compressor
from compressor.engine.analysis import analyze
from compressor.calibration import CalibrationSet
from compressor.calibration.reconstruct import reconstruct
from compressor.calibration.refit import add_refits_to_reference
from compressor.engine.plan import Plan
from compressor.engine.surgery import apply_plan, zeroed_reference
from compressor.engine.verify import run_outputs, verify
from tests.cli_run import run_cli
from tests.graphs import GraphBuilder, head
from tests.zeroing import zero_structures

REPO = Path(__file__).resolve().parents[1]
RESNET20 = REPO / "examples" / "resnet20-cifar10.onnx"
METHOD_PLAN = {"calib_importance": "off", "calib_allocation": "method"}  # the method's own plan, data or not
NOT_FAILURES = ("", "already matches the original", "the refit does not lower the held-out error")


def random_calib(shape, n=96, seed=0, name="x") -> CalibrationSet:
    data = np.random.default_rng(seed).standard_normal((n, *shape[1:])).astype(np.float32)
    return CalibrationSet.from_arrays({name: data})


def relative_diff(a: onnx.ModelProto, b: onnx.ModelProto, shape, seed=7) -> float:
    data = np.random.default_rng(seed).standard_normal((8, 1, *shape[1:])).astype(np.float32)
    name = a.graph.input[0].name
    feeds = [{name: sample} for sample in data]
    ya = np.stack([outs[0] for outs in run_outputs(a, feeds)])
    yb = np.stack([outs[0] for outs in run_outputs(b, feeds)])
    return float(np.linalg.norm(ya - yb) / np.linalg.norm(ya))


def planted_model():
    """conv1 (no bias) → conv2 → relu → head, where conv1's channels 6 and 7 are linear combinations of 0..3."""
    b = GraphBuilder(shape=(1, 4, 8, 8))
    w1 = b.rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w1[6] = 0.5 * w1[0] - w1[3]
    w1[7] = w1[1] + 2.0 * w1[2]
    y = b.op("Conv", ["x", b.const(w1)], pads=[1, 1, 1, 1])
    y = b.op("Relu", [b.conv(y, 8, 8)])
    return b.model(head(b, y, 8))


def test_refit_recovers_a_planted_linear_map_exactly():
    model = planted_model()
    analysis = analyze(model)
    conv1 = next(n.name for n in analysis.view.nodes if n.op_type == "Conv" and n.input[0] == "x")
    group = next(g for g in analysis.groups if conv1 in g.producers)
    plan = Plan(removed={group.index: np.array([6, 7])})
    pruned = apply_plan(analysis, plan)
    shape = analysis.input_shapes["x"]
    assert relative_diff(model, pruned, shape) > 0.05  # removing the channels alone changes the output
    result = reconstruct(analysis, plan, pruned, random_calib(shape))
    (record,) = result.layers
    assert record.refit and record.error_before > 0.05 and record.error_after < 1e-4
    assert relative_diff(model, result.model, shape) < 1e-4
    reference = zeroed_reference(analysis, plan)
    add_refits_to_reference(reference, analysis, plan, result.refits)
    assert verify(analysis.proto, reference, result.model, analysis.input_shapes).passed


def dense_model(b):
    x = b.op("Relu", [b.bn(b.conv("x", 4, 16), 16)])
    x = b.op("Relu", [b.bn(b.conv(x, 16, 16, bias=False), 16)])
    return b.model(head(b, x, 16))


def grouped_model(b):
    x = b.op("Relu", [b.conv("x", 4, 16)])
    x = b.op("Relu", [b.conv(x, 16, 16, group=4)])
    return b.model(head(b, b.op("Relu", [b.conv(x, 16, 16)]), 16))


def depthwise_model(b):
    x = b.op("Relu", [b.bn(b.conv("x", 4, 16), 16)])
    x = b.op("Relu", [b.conv(x, 16, 16, group=16)])
    return b.model(head(b, b.op("Relu", [b.conv(x, 16, 16, k=1)]), 16))


def conv_transpose_model(b):
    x = b.op("Relu", [b.conv("x", 4, 16)])
    w = b.const(b.rng.standard_normal((16, 8, 2, 2)).astype(np.float32) * 0.3)
    x = b.op("Relu", [b.op("ConvTranspose", [x, w], strides=[2, 2])])
    return b.model(head(b, x, 8))


def matmul_model(b):
    x = b.op("Relu", [b.conv("x", 4, 16)])
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    w = b.const(b.rng.standard_normal((16, 6)).astype(np.float32) * 0.3)
    return b.model(b.op("MatMul", [x, w]))


@pytest.mark.parametrize("build", [dense_model, grouped_model, depthwise_model, conv_transpose_model, matmul_model])
def test_reconstruction_lowers_the_error_and_verifies(build):
    model = build(GraphBuilder(shape=(1, 4, 8, 8)))
    shape = [1, 4, 8, 8]
    plain = compressor.compress(model, method="l1", ratio=0.5)
    result = compressor.compress(model, method="l1", ratio=0.5, calib=random_calib(shape, n=128))
    assert result.report["verified"]
    calibration = result.report["calibration"]
    layers = calibration["layers"]
    assert layers and calibration["layers_refitted"] >= 1
    assert all(layer["reason"] in NOT_FAILURES for layer in layers), layers
    assert all(layer["error_after"] < layer["error_before"] for layer in layers if layer["refit"])
    held = calibration["held_out"]
    assert held["reconstructed"]["relative_error"] < held["pruned"]["relative_error"]
    assert relative_diff(model, result.model, shape) < relative_diff(model, plain.model, shape)


def test_matmul_without_bias_gets_one(tmp_path):
    model = matmul_model(GraphBuilder(shape=(1, 4, 8, 8)))
    result = compressor.compress(model, method="l1", ratio=0.5, calib=random_calib([1, 4, 8, 8], n=128))
    assert result.report["calibration"]["layers_refitted"] == 1
    assert [n.op_type for n in result.model.graph.node][-2:] == ["MatMul", "Add"]


def test_no_reconstruct_keeps_the_surgery_result():
    model = dense_model(GraphBuilder(shape=(1, 4, 8, 8)))
    plain = compressor.compress(model, method="l1", ratio=0.5)
    result = compressor.compress(model, method="l1", ratio=0.5, calib=random_calib([1, 4, 8, 8]), reconstruct=False,
                                 method_options=METHOD_PLAN)
    assert result.report["calibration"]["reconstructed"] is False
    assert result.model.SerializeToString() == plain.model.SerializeToString()
    assert "reconstructed" not in result.report["calibration"]["held_out"]


def test_zero_structures_with_calib_change_nothing():
    zeroed, expected = zero_structures(analyze(RESNET20), n_groups=3)
    shape = [1, 3, 32, 32]
    plain = compressor.compress(zeroed, method="zeros")
    result = compressor.compress(zeroed, method="zeros", calib=random_calib(shape, n=48, name="input"))
    assert result.plan.removed.keys() == expected.removed.keys()
    assert all(not layer["refit"] for layer in result.report["calibration"]["layers"])
    plain_weights = {t.name: numpy_helper.to_array(t) for t in plain.model.graph.initializer}
    for tensor in result.model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), plain_weights[tensor.name])
    assert result.report["verified"]
    assert result.report["relative_error_vs_original"] <= result.report["relative_tolerance"]
    assert relative_diff(zeroed, result.model, shape) < 1e-5


def test_cli_calibrates_resnet20_from_an_image_folder(tmp_path):
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(40):
        folder = images / ("jpg" if i % 2 else "png" / Path("nested"))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((36, 40, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    proc = run_cli(str(RESNET20), "--method", "l1", "--ratio", "0.5", "-o", str(out), "--report", str(report),
                   "--calib", str(images), "--calib-count", "32")
    assert proc.returncode == 0, proc.stderr
    assert "calibration: 28 samples fitted, 4 held out" in proc.stdout
    data = json.loads(report.read_text())
    calibration = data["calibration"]
    assert data["verified"] and calibration["samples"] == 32 and calibration["layers_refitted"] >= 1
    assert calibration["held_out"]["reconstructed"]["relative_error"] < calibration["held_out"]["pruned"]["relative_error"]
    onnx.checker.check_model(onnx.load(str(out)))


def test_compress_with_calib_never_imports_torch(tmp_path):
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    code = (
        "import sys, compressor; compressor.compress(sys.argv[1], method='l1', ratio=0.5, calib=sys.argv[2]); "
        "import cli.compress_cmd, cli.calib_options; "
        "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code, str(RESNET20), str(tmp_path / "calib.npy")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def residual_model():
    """conv0 → relu → conv → bn → relu = s; s → conv1 → relu → conv2 → bn → Add(s) → relu → head."""
    b = GraphBuilder(shape=(1, 4, 8, 8))
    s = b.op("Relu", [b.bn(b.conv(b.op("Relu", [b.conv("x", 4, 8)]), 8, 8), 8)])
    y = b.bn(b.conv(b.op("Relu", [b.conv(s, 8, 8)]), 8, 8), 8)
    joined = b.op("Add", [y, s])
    return b.model(head(b, b.op("Relu", [joined]), 8)), s, joined


def tensor_error(model: onnx.ModelProto, other: onnx.ModelProto, name: str) -> float:
    def tapped(proto):
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        del copy.graph.output[:]
        copy.graph.output.extend([onnx.ValueInfoProto(name=name)])
        return copy

    data = np.random.default_rng(1).standard_normal((16, 1, 1, 4, 8, 8)).astype(np.float32)
    ya = np.stack([o[0] for o in run_outputs(tapped(model), [{"x": d[0]} for d in data])])
    yb = np.stack([o[0] for o in run_outputs(tapped(other), [{"x": d[0]} for d in data])])
    return float(np.linalg.norm(ya - yb) / np.linalg.norm(ya))


def test_a_branch_feeding_a_residual_add_also_absorbs_the_skip_error():
    model, skip, joined = residual_model()
    analysis = analyze(model)
    first = next(n.name for n in analysis.view.nodes if n.op_type == "Conv" and n.input[0] == "x")
    inner = next(n.name for n in analysis.view.nodes if n.op_type == "Conv" and n.input[0] == skip)
    groups = {g.index: g for g in analysis.groups if {first, inner} & set(g.producers)}
    plan = Plan(removed={i: np.array([1, 5]) if first in g.producers else np.array([3]) for i, g in groups.items()})
    pruned = apply_plan(analysis, plan)
    calib = random_calib([1, 4, 8, 8], n=128)
    plain = reconstruct(analysis, plan, pruned, calib, compensate=False)
    compensated = reconstruct(analysis, plan, pruned, calib)
    assert [r.target for r in compensated.layers] == ["output", "residual sum"]
    assert tensor_error(model, compensated.model, joined) < tensor_error(model, plain.model, joined)
    assert tensor_error(model, compensated.model, skip) == pytest.approx(tensor_error(model, plain.model, skip))
    reference = zeroed_reference(analysis, plan)
    add_refits_to_reference(reference, analysis, plan, compensated.refits)
    assert verify(analysis.proto, reference, compensated.model, analysis.input_shapes).passed

"""Calibration data: image folders, .npy and .npz files, the seeded subset, batches, and one clear error per bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from compressor.calibration import CalibrationOptions, CalibrationSet, load_calibration, stream_tensors
from compressor.errors import CompressorError
from compressor.engine.loading import resolve_input_shapes
from tests.cli_run import run_cli
from tests.graphs import GraphBuilder, head

REPO = Path(__file__).resolve().parents[1]


def image_model(shape=(1, 3, 8, 8)) -> onnx.ModelProto:
    b = GraphBuilder(shape=shape)
    x = b.op("Relu", [b.bn(b.conv("x", shape[1], 8), 8)])
    return b.model(head(b, x, 8))


def two_input_model() -> onnx.ModelProto:
    b = GraphBuilder(shape=(1, 3, 8, 8))
    b.inputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8]))
    x = b.op("Add", ["x", "y"])
    x = b.op("Relu", [b.conv(x, 3, 8)])
    return b.model(head(b, x, 8))


def shapes(proto):
    return resolve_input_shapes(proto, None)


def write_images(folder: Path, colors, size=(8, 8), suffix=".png") -> list[Path]:
    paths = []
    for i, color in enumerate(colors):
        sub = folder / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{i}{suffix}"
        Image.new("RGB", size, tuple(color)).save(path)
        paths.append(path)
    return paths


def test_image_folder_is_searched_recursively_decoded_and_normalized(tmp_path):
    model = image_model()
    write_images(tmp_path, [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "top.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    calib = load_calibration(tmp_path, model, shapes(model))
    assert calib.count == 4
    batches = list(calib.batches(3))
    assert [b["x"].shape for b in batches] == [(3, 3, 8, 8), (1, 3, 8, 8)]
    assert all(b["x"].dtype == np.float32 for b in batches)
    red = batches[0]["x"][0]  # sorted paths: class0/0.png (red) comes first
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(red[:, 0, 0], (np.array([1.0, 0.0, 0.0]) - mean) / std, rtol=1e-5)


def test_image_options_order_layout_size_mean_std(tmp_path):
    model = image_model(shape=(1, 6, 6, 3))  # an NHWC input: channels last
    write_images(tmp_path, [(255, 0, 0)], size=(12, 9))
    options = CalibrationOptions(order="bgr", layout="nhwc", mean=(0.5,), std=(0.5,))
    calib = load_calibration(tmp_path, model, shapes(model), options)
    x = next(calib.batches())["x"]
    assert x.shape == (1, 6, 6, 3)
    np.testing.assert_allclose(x[0, 3, 3], [-1.0, -1.0, 1.0], atol=1e-6)  # red, BGR order, (v - 0.5) / 0.5
    sized = load_calibration(tmp_path, image_model(), shapes(image_model()), CalibrationOptions(size=(4, 5)))
    assert next(sized.batches())["x"].shape == (1, 3, 4, 5)


def test_npy_and_npz_feed_the_model_inputs(tmp_path):
    model = image_model()
    data = np.random.default_rng(0).standard_normal((10, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "calib.npy", data)
    calib = load_calibration(tmp_path / "calib.npy", model, shapes(model))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in calib.batches(4)]), data)
    pair = two_input_model()
    np.savez(tmp_path / "calib.npz", x=data, y=data * 2)
    calib = load_calibration(tmp_path / "calib.npz", pair, shapes(pair))
    batch = next(calib.batches(10))
    np.testing.assert_array_equal(batch["y"], data * 2)
    np.save(tmp_path / "double.npy", data.astype(np.float64))
    assert next(load_calibration(tmp_path / "double.npy", model, shapes(model)).batches())["x"].dtype == np.float32


def test_seeded_subset_and_split(tmp_path):
    model = image_model()
    data = np.arange(50, dtype=np.float32)[:, None, None, None] * np.ones((1, 3, 8, 8), dtype=np.float32)
    np.save(tmp_path / "calib.npy", data)

    def picked(seed):
        calib = load_calibration(tmp_path / "calib.npy", model, shapes(model), CalibrationOptions(count=12, seed=seed))
        return np.concatenate([b["x"][:, 0, 0, 0] for b in calib.batches(5)])

    first = picked(0)
    assert len(first) == 12 and len(set(first.tolist())) == 12
    np.testing.assert_array_equal(first, picked(0))
    assert not np.array_equal(first, picked(1))
    calib = CalibrationSet.from_arrays({"x": data})
    fit, held = calib.split(10)
    assert (fit.count, held.count) == (40, 10)
    assert next(held.batches(100))["x"][0, 0, 0, 0] == 40.0


def test_stream_tensors_taps_intermediate_tensors(tmp_path):
    model = image_model()
    conv_out = next(n.output[0] for n in model.graph.node if n.op_type == "Conv")
    data = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    seen = []
    count = stream_tensors(model, CalibrationSet.from_arrays({"x": data}), [conv_out, "x"],
                           lambda values: seen.append(values), batch_size=2)
    assert count == 5 and [v[conv_out].shape for v in seen] == [(2, 8, 8, 8), (2, 8, 8, 8), (1, 8, 8, 8)]
    np.testing.assert_array_equal(seen[2]["x"], data[4:])


@pytest.mark.parametrize("case, message", [
    ("empty folder", "no images"),
    ("unreadable image", "cannot read calibration image"),
    ("wrong shape", "has shape [4, 3, 9, 8]"),
    ("wrong dtype", "has dtype uint8"),
    ("npy for two inputs", "single-input model"),
    ("npz missing input", "no array for input(s) y"),
    ("not an array file", "cannot read calibration array"),
    ("missing path", "calibration data not found"),
    ("unknown suffix", "image folder, a .npy or a .npz"),
    ("bad order", "--calib-order"),
])
def test_bad_calibration_data_gets_one_clear_error(tmp_path, case, message):
    model, pair = image_model(), two_input_model()
    target, options, chosen = tmp_path / "data", CalibrationOptions(), model
    if case == "empty folder":
        target.mkdir()
        (target / "readme.txt").write_text("no images here")
    elif case == "unreadable image":
        target.mkdir()
        (target / "broken.jpg").write_bytes(b"this is not a jpeg")
    elif case == "wrong shape":
        target = tmp_path / "bad.npy"
        np.save(target, np.zeros((4, 3, 9, 8), dtype=np.float32))
    elif case == "wrong dtype":
        target = tmp_path / "bad.npy"
        np.save(target, np.zeros((4, 3, 8, 8), dtype=np.uint8))
    elif case == "npy for two inputs":
        target, chosen = tmp_path / "one.npy", pair
        np.save(target, np.zeros((4, 3, 8, 8), dtype=np.float32))
    elif case == "npz missing input":
        target, chosen = tmp_path / "one.npz", pair
        np.savez(target, x=np.zeros((4, 3, 8, 8), dtype=np.float32))
    elif case == "not an array file":
        target = tmp_path / "junk.npy"
        target.write_bytes(b"junk")
    elif case == "missing path":
        target = tmp_path / "nowhere"
    elif case == "unknown suffix":
        target = tmp_path / "data.csv"
        target.write_text("1,2,3")
    elif case == "bad order":
        target = tmp_path / "ok.npy"
        np.save(target, np.zeros((4, 3, 8, 8), dtype=np.float32))
        options = CalibrationOptions(order="gbr")
    with pytest.raises(CompressorError, match=None) as info:
        calib = load_calibration(target, chosen, shapes(chosen), options)
        list(calib.batches())
    assert message in str(info.value)


@pytest.mark.parametrize("extra, message", [
    (["--calib", "MISSING"], "calibration data not found"),
    (["--calib", "BROKEN"], "cannot read calibration image"),
    (["--calib", "BROKEN", "--calib-size", "0x4"], "--calib-size"),
    (["--calib", "BROKEN", "--calib-mean", "a,b"], "--calib-mean"),
    (["--reconstruct"], "--reconstruct needs calibration data"),
])
def test_cli_bad_calibration_is_one_error_line_and_writes_nothing(tmp_path, extra, message):
    model = tmp_path / "model.onnx"
    onnx.save(image_model(), model)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    extra = [str(tmp_path / "missing") if a == "MISSING" else str(broken) if a == "BROKEN" else a for a in extra]
    out = tmp_path / "out.onnx"
    proc = run_cli(str(model), "--method", "l1", "--ratio", "0.5", "-o", str(out), *extra)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip() and not line.startswith("compress: ")]
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "model.onnx"]


def test_calibration_set_must_feed_the_model_inputs():
    import compressor

    model = image_model()
    wrong_name = CalibrationSet.from_arrays({"image": np.zeros((4, 3, 8, 8), dtype=np.float32)})
    with pytest.raises(CompressorError, match=r"no samples for input\(s\) x"):
        compressor.compress(model, method="l1", ratio=0.5, calib=wrong_name)
    wrong_shape = CalibrationSet.from_arrays({"x": np.zeros((4, 3, 8, 9), dtype=np.float32)})
    with pytest.raises(CompressorError, match="has shape"):
        compressor.compress(model, method="l1", ratio=0.5, calib=wrong_shape)


def test_float64_arrays_are_cast_for_the_model():
    import compressor

    model = image_model()
    data = np.random.default_rng(0).standard_normal((24, 3, 8, 8))
    result = compressor.compress(model, method="l1", ratio=0.5, calib=CalibrationSet.from_arrays({"x": data}))
    assert result.report["verified"] and result.report["calibration"]["samples"] == 24


def test_verification_also_runs_on_real_calibration_samples():
    """With --calib, verification compares result and reference on a few calibration samples besides its seeded
    random inputs (issue 10: real inputs when the user provides them)."""
    import compressor

    data = np.random.default_rng(1).standard_normal((24, 3, 8, 8)).astype(np.float32)
    result = compressor.compress(image_model(), method="l1", ratio=0.5, calib=CalibrationSet.from_arrays({"x": data}))
    assert result.report["verified"]
    held_out = result.report["calibration"]["held_out_samples"]
    assert held_out == 3
    assert result.report["verification_inputs"] == {"seeded_random": 2, "caller": held_out}


def test_int8_takes_its_ranges_from_the_calibration_data():
    import compressor

    model = image_model()
    data = np.random.default_rng(0).standard_normal((24, 3, 8, 8)).astype(np.float32)
    result = compressor.compress(model, method="l1", ratio=0.5, calib=CalibrationSet.from_arrays({"x": data}),
                                 precision="int8")
    assert result.report["precision"] and result.report["calibration"]["samples"] == 24

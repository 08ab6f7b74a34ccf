"""`compress train --prune M --calib-count N`: the mask is planned with calibration data (train images, normalized as
the model sees them), exactly as the ONNX path plans with the same images and no reconstruction."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import compressor  # noqa: E402
from compressor.calibration.data import CalibrationSet  # noqa: E402
from compressor.errors import CompressorError  # noqa: E402
from compressor.latency import table  # noqa: E402
from compressor.training.export import INPUT_NAME, export_onnx  # noqa: E402
from compressor.training.loop import TrainConfig  # noqa: E402
from compressor.training.masks import masks_from_result, plan_masks  # noqa: E402
from compressor.training.models import build_model  # noqa: E402
from compressor.training.pipeline import TrainJob, calibration_images, run_job  # noqa: E402
from tests.test_latency import fake_ms  # noqa: E402
from tests.test_training import one_torch_thread, randomize_bn, synthetic_data  # noqa: E402,F401

PROBE = {"calib_probe_images": "16"}


def calib_batch(n: int = 24) -> np.ndarray:
    return calibration_images(synthetic_data(n_train=64), n, seed=0)


def same_masks(a, b) -> bool:
    return a.keep.keys() == b.keep.keys() and all(bool(torch.equal(a.keep[k], b.keep[k])) for k in a.keep)


def test_calibration_images_are_seeded_normalized_train_images():
    data = synthetic_data(n_train=64)
    x = calibration_images(data, 10, seed=3)
    assert x.shape == (10, 3, 32, 32) and x.dtype == np.float32
    assert np.array_equal(x, calibration_images(data, 10, seed=3))
    assert not np.array_equal(x, calibration_images(data, 10, seed=4))
    everything = data.normalize(data.train_images).numpy()
    assert all(any(np.array_equal(row, image) for image in everything) for row in x)
    assert len(calibration_images(data, 1000)) == 64  # at most the train split


def test_calibrated_plan_is_the_onnx_paths_plan_on_the_same_images(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(build_model("resnet8"))
    x = calib_batch()
    masks, report = plan_masks(model, "l1", 0.4, keep_bn=True, calib_images=x, method_options=PROBE)
    assert report["calibrated"] == {"images": 24, "reconstruct": False, "plan_images": 21}
    assert any("calibrated" in note for note in report["notes"])
    assert "layers_refitted" not in report["calibration"]  # no reconstruction

    export_onnx(model, tmp_path / "m.onnx", keep_bn=True)
    onnx_result = compressor.compress(str(tmp_path / "m.onnx"), "l1", 0.4, verify=False, reconstruct=False,
                                      calib=CalibrationSet.from_arrays({INPUT_NAME: x}), method_options=PROBE)
    assert same_masks(masks, masks_from_result(model, onnx_result)[0])
    plain, plain_report = plan_masks(model, "l1", 0.4, keep_bn=True)
    assert "calibrated" not in plain_report and not same_masks(masks, plain)


def test_calibrated_latency_plan(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path))
    monkeypatch.setattr(table, "measure_ms", fake_ms(0.2, 1.0))
    torch.manual_seed(0)
    model = randomize_bn(build_model("resnet8"))
    masks, report = plan_masks(model, "l1", 0.3, keep_bn=True, calib_images=calib_batch(), target="latency",
                               device="cpu:1", batch=1, method_options=PROBE)
    assert report["calibrated"]["images"] == 24 and report["latency"] and len(masks)


def test_graph_rw_feature_variant_plans_on_train_images_and_needs_them():
    torch.manual_seed(0)
    model = randomize_bn(build_model("resnet8"))
    options = {"rw_features": "calib"}
    with pytest.raises(CompressorError, match="calib-count"):
        plan_masks(model, "graph-rw", 0.3, keep_bn=True, method_options=options)
    masks, report = plan_masks(model, "graph-rw", 0.3, keep_bn=True, calib_images=calib_batch(),
                               method_options=options)
    assert len(masks) and any("feature maps" in note for note in report["notes"])
    assert abs(report["macs_reduction"] - 0.3) <= 0.05


def test_train_job_records_the_calibrated_plan(tmp_path):
    job = TrainJob(model="resnet8", data="unused", out=str(tmp_path / "c"), device="cpu", verify_images=16,
                   prune="l1", ratio=0.3, calib_count=16, prune_options={"method_options": PROBE},
                   config=TrainConfig(epochs=1, batch_size=32, lr=0.02))
    metrics = run_job(job, data=synthetic_data(n_train=64), log=None)
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["plan"]["calibrated"]["images"] == 16 == metrics["plan"]["calibrated"]["images"]
    assert saved["plan"]["method"] == "l1" and saved["macs_reduction"] > 0.2


def test_calib_count_without_prune_is_one_error_line(tmp_path, capsys):
    from cli.main import main

    with pytest.raises(CompressorError, match="--prune"):
        TrainJob(model="resnet8", data="unused", out=str(tmp_path / "x"), calib_count=8).validate()
    with pytest.raises(CompressorError, match="--calib-count"):
        TrainJob(model="resnet8", data="unused", out=str(tmp_path / "x"), prune="l1", ratio=0.3, calib_count=-1).validate()
    with pytest.raises(SystemExit) as done:
        main(["train", "--data", str(tmp_path), "-o", str(tmp_path / "x"), "--calib-count", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code not in (0, None) and len(err) == 1 and err[0].startswith("error:") and "--prune" in err[0]
    assert not list(tmp_path.iterdir())

"""Shared fixtures: paths to ../shared and cached ONNX exports of PyTorch models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMPRESSOR_SHARED", REPO.parent / "shared"))
CIFAR_DATA = SHARED / "data" / "cifar10"
CIFAR_MODELS = SHARED / "models" / "cifar10-resnet"


def export_onnx(model, example, path: Path, dynamo: bool) -> Path:
    """Export a torch model with the TorchScript (dynamo=False) or the dynamo exporter, weights inline."""
    import torch

    model.eval()
    with torch.no_grad():
        if dynamo:
            torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=18, external_data=False,
                              verbose=False)
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17)
    return path


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    """A session-wide folder for exported models."""
    return tmp_path_factory.mktemp("exports")


def assert_close_to_scale(actual, expected, rel: float) -> None:
    """max|actual - expected| <= rel * max|expected|: an error judged on the tensor's own scale, with no absolute
    floor that could exceed a tiny tensor or be missed by a large one."""
    import numpy as np

    actual = np.asarray(getattr(actual, "detach", lambda: actual)(), dtype=np.float64)
    expected = np.asarray(getattr(expected, "detach", lambda: expected)(), dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff, scale = float(np.max(np.abs(actual - expected))), float(np.max(np.abs(expected)))
    assert diff <= rel * scale, f"max abs diff {diff:.3g} exceeds {rel:g} x the scale {scale:.3g}"


def requires_shared(path: Path):
    """Skip marker for tests that need files from ../shared."""
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not available (set COMPRESSOR_SHARED)")

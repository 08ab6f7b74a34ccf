"""graph-rw's data-aware variant (rw_features=calib): the graph over calibration feature maps, on real ONNX Runtime
runs of small graphs with planted structure in the data (not in the weights)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import compressor
from compressor.calibration.data import CalibrationSet
from compressor.calibration.features import group_feature_maps
from compressor.calibration.planning import parse_settings
from compressor.engine.analysis import analyze
from compressor.engine.plan import PlanOptions
from compressor.errors import CompressorError
from compressor.methods import get
from compressor.methods import graph_rw as rw
from tests.graphs import GraphBuilder
from tests.test_latency import dynamic_batch

CHANNELS = 8
ISOLATED = 7  # its feature map shares nothing with the others, and its filter has by far the largest norm


def diagonal_net() -> onnx.ModelProto:
    """x (8 channels) → 1×1 conv with a diagonal weight (channel i scaled by s_i, ISOLATED by 10) → ReLU → 3×3 conv.

    The filters are orthogonal, so the weight graph has no edges at all; what links the channels is in the data."""
    b = GraphBuilder(shape=(1, CHANNELS, 6, 6), seed=0)
    scales = np.linspace(0.5, 1.5, CHANNELS)
    scales[ISOLATED] = 10.0
    w1 = b.const(np.diag(scales).reshape(CHANNELS, CHANNELS, 1, 1).astype(np.float32))
    hidden = b.op("Relu", [b.op("Conv", ["x", w1])])
    w2 = b.const((b.rng.standard_normal((4, CHANNELS, 3, 3)) * 0.3).astype(np.float32))
    return dynamic_batch(b.model(b.op("Conv", [hidden, w2], pads=[1, 1, 1, 1])))


def planted_data(n: int = 48, seed: int = 1) -> np.ndarray:
    """Positive inputs (the ReLU passes them): channels 0–6 mix three shared signals (channel 1 duplicates channel 0),
    channel ISOLATED is independent noise."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((3, n, 6, 6))
    mix = rng.uniform(0.2, 1.0, (CHANNELS, 3))
    x = np.einsum("ck,knhw->nchw", mix, shared)
    x[:, 1] = x[:, 0]
    x[:, ISOLATED] = rng.standard_normal((n, 6, 6))
    return (x + 8.0).astype(np.float32)


def calib_set(n: int = 48) -> CalibrationSet:
    return CalibrationSet.from_arrays({"x": planted_data(n)})


def test_feature_maps_are_the_consumers_centred_inputs():
    model = diagonal_net()
    analysis = analyze(model)
    (g,) = [g.index for g in analysis.groups if g.prunable.any()]
    features = group_feature_maps(analysis, [g], calib_set())[g]
    assert features.shape[0] == CHANNELS and 0 < features.shape[1] <= 2048
    assert np.allclose(features.mean(axis=1), 0.0, atol=1e-9 * np.abs(features).max())
    scale = np.linalg.norm(features, axis=1)
    # channel 1 duplicates channel 0 in the data (their filters differ in scale only): same feature map up to scale
    unit = features / scale[:, None]
    assert np.allclose(unit[0], unit[1], rtol=0, atol=1e-5)
    assert abs(float(unit[ISOLATED] @ unit[0])) < 0.3


def test_data_aware_scores_follow_the_feature_maps_not_the_weights():
    model = diagonal_net()
    analysis = analyze(model)
    (g,) = [g.index for g in analysis.groups if g.prunable.any()]
    calib = calib_set()
    weights = rw.scores_graph_rw(analysis, PlanOptions(ratio=0.2))[g]
    data = rw.scores_graph_rw(analysis, PlanOptions(ratio=0.2, extra={"rw_features": "calib"}, calibration=calib))[g]
    assert np.allclose(weights, 1.0 / CHANNELS)  # orthogonal filters: no edges, the uniform walk
    assert int(np.argmin(data)) == ISOLATED and data[ISOLATED] < 0.5 * np.median(data)
    assert min(data[0], data[1]) > np.median(data)  # the duplicated pair explains each other: visited most
    expected, _ = rw.filter_scores(group_feature_maps(analysis, [g], calib)[g], normalize=True)
    assert np.allclose(data, expected, rtol=1e-12)


def test_compress_with_calibration_prunes_by_the_feature_graph():
    model = diagonal_net()
    kwargs = dict(method="graph-rw", ratio=0.1, calib=calib_set(64), reconstruct=False,
                  method_options={"rw_features": "calib", "layer_rates": "uniform"})
    result = compressor.compress(model, **kwargs)
    (removed,) = [r for r in result.plan.removed.values() if len(r)]
    assert removed.tolist() == [ISOLATED]
    assert result.report["verified"] and any("feature maps" in n for n in result.report["notes"])
    l1 = compressor.compress(model, method="l1", ratio=0.1)
    assert ISOLATED not in np.concatenate(list(l1.plan.removed.values())).tolist()  # l1 keeps the large filter


def test_variant_implies_the_methods_own_scores_and_allocation():
    implied = parse_settings({"rw_features": "calib"})
    assert (implied.importance, implied.allocation) == ("off", "method")
    assert parse_settings({"rw_features": "calib", "calib_importance": "obs"}).importance == "obs"
    assert (parse_settings({"rw_features": "weights"}).importance, parse_settings({}).allocation) == ("obs", "sensitivity")


def test_variant_without_data_and_bad_values_are_errors():
    model = diagonal_net()
    with pytest.raises(CompressorError, match="needs calibration data"):
        compressor.compress(model, method="graph-rw", ratio=0.2, method_options={"rw_features": "calib"})
    with pytest.raises(CompressorError, match="rw_features"):
        rw.parse_graph_rw_options({"rw_features": "activations"})
    analysis = analyze(model)
    with pytest.raises(CompressorError, match="needs calibration data"):
        get("graph-rw").plan(analysis, PlanOptions(ratio=0.2, extra={"rw_features": "calib"}))

"""Latency targets in int8 on cpu:T: tables timed on quantized micro-models, candidates timed quantized, the
cache keyed by the int8 settings, the shipped model calibrated on the user's data, and the refusal on CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import compressor
from compressor import CompressorError
from compressor.deploy import PrecisionOptions, model_precision
from compressor.latency import LatencyRequest, ProfileSettings
from compressor.latency.cache import LatencyCache, context_of
from compressor.latency.request import in_precision
from compressor.runtime.targets import parse_target
from tests.cli_run import run_cli
from tests.graphs import GraphBuilder, head

FAST = ProfileSettings(warmup=1, min_runs=2, max_runs=3, seconds_per_point=0.001, calibration_runs=3,
                       calibration_seconds=0.01, check_warmup=1, check_runs=3, loop_iterations=1)
QUANTIZED = {onnx.TensorProto.UINT8, onnx.TensorProto.INT8}


def tiny_cnn() -> onnx.ModelProto:
    b = GraphBuilder(shape=(1, 4, 8, 8))
    x = b.op("Relu", [b.bn(b.conv("x", 4, 16), 16)])
    x = b.op("Relu", [b.bn(b.conv(x, 16, 16), 16)])
    return b.model(head(b, x, 16, classes=10))


def wider_cnn() -> onnx.ModelProto:
    """Wide enough (64 channels at 32x32) that narrowing it saves measurable time on a CPU."""
    b = GraphBuilder(shape=(1, 4, 32, 32))
    x = b.op("Relu", [b.bn(b.conv("x", 4, 64), 64)])
    x = b.op("Relu", [b.bn(b.conv(x, 64, 64), 64)])
    x = b.op("Relu", [b.bn(b.conv(x, 64, 64), 64)])
    return b.model(head(b, x, 64, classes=10))


def calibration(count: int = 32, seed: int = 1, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 4, size, size)).astype(np.float32)


def test_int8_tables_and_candidates_are_timed_quantized_and_cached_apart(tmp_path, monkeypatch):
    from compressor.latency import table
    import compressor.runtime.bench

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    timed, paired = [], []
    real_bench = compressor.runtime.bench.run_benchmark

    def recording(model, target, batch, settings, calibration=False, input_shapes=None):
        """Records what is timed; answers from the layer count and the weight bytes (real timings are noisy)."""
        ops = {n.op_type for n in model.graph.node}
        timed.append((calibration, ops, {i.type.tensor_type.elem_type for i in model.graph.input}))
        layers = sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
        return 0.01 + 0.1 * layers + 1e-4 * sum(len(init.raw_data) for init in model.graph.initializer)

    def recording_bench(models, *args, **kwargs):
        paired.append([model_precision(m) for m in models])
        return real_bench(models, *args, **kwargs)

    monkeypatch.setattr(table, "measure_ms", recording)
    monkeypatch.setattr(compressor.runtime.bench, "run_benchmark", recording_bench)
    monkeypatch.setattr("compressor.latency.request.ProfileSettings", lambda: FAST)
    calib = [{"x": calibration()}]
    result = compressor.compress(tiny_cnn(), "l1", 0.5, target="latency", device="cpu:1", precision="int8",
                                 precision_calib=calib, profile_budget=5.0)
    latency = result.report["latency"]
    assert latency["precision"] == "int8" and latency["timed_as"] == "int8-u8s8-per-channel"
    assert latency["table"]["context"]["precision"] == "int8-u8s8-per-channel"
    assert result.report["precision"]["precision"] == "int8" and model_precision(result.model) == "int8"
    layers = [(ops, inputs) for whole, ops, inputs in timed if not whole and ops & {"Conv", "Gemm"}]
    networks = [(ops, inputs) for whole, ops, inputs in timed if whole]
    assert layers and networks
    # a layer inside an int8 network: dequantized weights, its input already quantized (no leading QuantizeLinear)
    assert all("DequantizeLinear" in ops and inputs <= QUANTIZED for ops, inputs in layers)
    # whole networks as deployed: QDQ inside, fp32 inputs
    assert all({"QuantizeLinear", "DequantizeLinear"} <= ops and inputs == {onnx.TensorProto.FLOAT}
               for ops, inputs in networks)
    assert paired and all(p == ["int8", "int8"] for p in paired)  # candidates and baseline: timed quantized
    int8_cache = Path(latency["table"]["cache"])
    assert "int8" in int8_cache.name and json.loads(int8_cache.read_text())["context"]["precision"].startswith("int8")
    # the fp32 context shares nothing with the int8 one; a second int8 run reuses its own entries
    fp32 = compressor.compress(tiny_cnn(), "l1", 0.5, target="latency", device="cpu:1", profile_budget=5.0)
    assert fp32.report["latency"]["table"]["cache_hits"] == 0 and fp32.report["latency"]["precision"] == "fp32"
    assert Path(fp32.report["latency"]["table"]["cache"]) != int8_cache
    again = compressor.compress(tiny_cnn(), "l1", 0.5, target="latency", device="cpu:1", precision="int8",
                                precision_calib=calib, profile_budget=5.0)
    assert again.report["latency"]["table"]["cache_hits"] > 0


def test_cache_contexts_of_fp32_fp16_and_int8_settings_never_collide(tmp_path):
    request = LatencyRequest(parse_target("cpu:1"))
    variants = [in_precision(request, "fp32"), in_precision(request, "fp16"), in_precision(request, "int8"),
                in_precision(request, "int8", PrecisionOptions(activation_type="int8")),
                in_precision(request, "int8", PrecisionOptions(per_channel=False)),
                in_precision(request, "int8", PrecisionOptions(exclude=("Conv_0",)))]
    caches = [LatencyCache(context_of(r.target, r.batch, r.timed_precision), tmp_path) for r in variants]
    assert len({c.path for c in caches}) == len(caches)
    caches[0].put("same-structure", 1.0)
    caches[0].flush()
    assert all(c.get("same-structure") is None for c in
               [LatencyCache(context_of(r.target, r.batch, r.timed_precision), tmp_path) for r in variants[1:]])


def test_int8_timing_follows_the_shipped_activation_type():
    from compressor.engine.analysis import analyze
    from compressor.latency.micro import find_items, micro_model
    from compressor.latency.timed import timing_model

    analysis = analyze(tiny_cnn())
    item = find_items(analysis, set(range(len(analysis.groups))))[0]
    layer = micro_model(analysis, item, {}, 1, pooled=True)
    for activation, elem_type in (("uint8", onnx.TensorProto.UINT8), ("int8", onnx.TensorProto.INT8)):
        request = in_precision(LatencyRequest(parse_target("cpu:1")), "int8", PrecisionOptions(activation_type=activation))
        timed = timing_model(layer, request, whole=False)
        assert [i.type.tensor_type.elem_type for i in timed.graph.input] == [elem_type]
        session = ort.InferenceSession(timed.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {timed.graph.input[0].name: np.zeros((1, 4, 8, 8), onnx.helper.tensor_dtype_to_np_dtype(elem_type))}
        assert session.run(None, feed)[0].shape == (1, 16, 1, 1)


def test_int8_latency_target_is_refused_on_cuda():
    with pytest.raises(CompressorError, match="CUDA execution provider does not run QDQ int8"):
        in_precision(LatencyRequest(parse_target("cuda")), "int8")
    assert in_precision(LatencyRequest(parse_target("cuda")), "fp16").precision == "fp16"


def test_cli_int8_latency_target_writes_a_valid_int8_model(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    source, calib, out, report = (tmp_path / n for n in ("m.onnx", "calib.npy", "out.onnx", "r.json"))
    onnx.save(wider_cnn(), source)
    np.save(calib, calibration(48, size=32))
    done = run_cli(str(source), "--method", "l1", "--target", "latency", "--device", "cpu:1", "--precision", "int8",
                   "--calib", str(calib), "--ratio", "0.5", "--profile-budget", "3", "-o", str(out),
                   "--report", str(report), "--quiet")
    assert done.returncode == 0, done.stderr
    model = onnx.load(out)
    onnx.checker.check_model(model)
    assert model_precision(model) == "int8"
    data = json.loads(report.read_text())
    assert data["latency"]["precision"] == "int8" and data["latency"]["timed_as"].startswith("int8-u8s8")
    assert data["precision"]["precision"] == "int8" and data["precision"]["calibration_samples"] > 0
    assert data["macs_after"] < data["macs_before"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": calibration(1, seed=5, size=32)})[0].shape == (1, 10)


def test_a_network_is_converted_once_however_often_it_is_timed(monkeypatch):
    """The closed loop times the original against every candidate: its int8 conversion is remembered (by content),
    a different network or int8 setting converts anew, and micro-models are never remembered."""
    from compressor.deploy import int8 as deploy_int8
    from compressor.latency import timed

    conversions = []
    real = deploy_int8.to_int8

    def counting(proto, feeds, **kw):
        conversions.append(kw["activation_type"])
        return real(proto, feeds, **kw)

    monkeypatch.setattr(deploy_int8, "to_int8", counting)
    monkeypatch.setattr(timed, "_converted", type(timed._converted)())
    u8 = in_precision(LatencyRequest(parse_target("cpu:1")), "int8")
    s8 = in_precision(LatencyRequest(parse_target("cpu:1")), "int8", PrecisionOptions(activation_type="int8"))
    first = timed.timing_model(tiny_cnn(), u8, whole=True)
    again = timed.timing_model(tiny_cnn(), u8, whole=True)
    assert len(conversions) == 1 and again.SerializeToString() == first.SerializeToString()
    assert any(n.op_type == "DequantizeLinear" for n in again.graph.node)
    timed.timing_model(wider_cnn(), u8, whole=True)
    timed.timing_model(tiny_cnn(), s8, whole=True)
    timed.timing_model(tiny_cnn(), u8, whole=False)
    timed.timing_model(tiny_cnn(), u8, whole=False)
    assert conversions == ["uint8", "uint8", "int8", "uint8", "uint8"]

"""fp16 latency targets time the model the product ships: the user's op-type keeps and name exclusions reach the
timed networks (and the op-type keeps the micro-models), and the cache is keyed by them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

import compressor
from compressor.deploy import PrecisionOptions, convert_precision
from compressor.engine.analysis import analyze
from compressor.latency import LatencyRequest, ProfileSettings
from compressor.latency.cache import LatencyCache, context_of
from compressor.latency.micro import find_items, micro_model
from compressor.latency.request import in_precision
from compressor.runtime.targets import parse_target
from tests.test_precision import relative, run, small_classifier

FP16, FP32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
KEEPS = PrecisionOptions(exclude=("Conv_16",), fp32_ops=("Gemm",), min_top1_agreement=0.0, max_relative_error=1.0)


def fp16_request(options: PrecisionOptions | None = None) -> LatencyRequest:
    return in_precision(LatencyRequest(parse_target("cpu:1")), "fp16", options)


def weight_types(proto: onnx.ModelProto) -> dict[str, int]:
    """The element type of each Conv/Gemm node's weight, by node name."""
    types = {init.name: init.data_type for init in proto.graph.initializer}
    return {n.name: types[n.input[1]] for n in proto.graph.node if n.op_type in ("Conv", "Gemm")}


def cast_to(proto: onnx.ModelProto, node_name: str) -> int | None:
    """The type a Cast converts the data input of `node_name` to (None when no Cast feeds it)."""
    node = next(n for n in proto.graph.node if n.name == node_name)
    cast = next((n for n in proto.graph.node if n.op_type == "Cast" and node.input[0] in n.output), None)
    return None if cast is None else next(a.i for a in cast.attribute if a.name == "to")


def test_whole_network_timing_model_keeps_the_excluded_node_and_op_type_in_fp32(monkeypatch):
    from compressor.latency import timed

    monkeypatch.setattr(timed, "_converted", type(timed._converted)())
    model = small_classifier()
    network = timed.timing_model(model, fp16_request(KEEPS), whole=True)
    assert weight_types(network) == {"Conv_4": FP16, "Conv_16": FP32, "Gemm_32": FP32}
    assert cast_to(network, "Conv_16") == FP32 and cast_to(network, "Gemm_32") == FP32
    assert cast_to(network, "Conv_4") == FP16  # the fp32 input enters the fp16 network through a Cast
    assert {i.type.tensor_type.elem_type for i in [*network.graph.input, *network.graph.output]} == {FP32}
    shipped, report = convert_precision(model, "fp16", None, KEEPS)
    assert network.graph.SerializeToString() == shipped.graph.SerializeToString()  # the model that ships
    assert report["fp32_nodes"] == ["Conv_16"] and "Gemm" in report["fp32_ops"]
    feed = {"x": np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    assert relative(run(network, feed), run(model, feed)) < 1e-2
    default = timed.timing_model(model, fp16_request(), whole=True)
    assert set(weight_types(default).values()) == {FP16}


def test_micro_models_take_the_op_type_keeps_but_not_the_name_patterns():
    from compressor.latency.timed import timing_model

    analysis = analyze(small_classifier())
    item = next(i for i in find_items(analysis, set(range(len(analysis.groups)))) if "Conv_16" in i.nodes)
    layer = micro_model(analysis, item, {}, 1, pooled=True)
    by_name = timing_model(layer, fp16_request(KEEPS), whole=False)
    assert set(weight_types(by_name).values()) == {FP16}
    assert [i.type.tensor_type.elem_type for i in by_name.graph.input] == [FP16]
    by_type = timing_model(layer, fp16_request(PrecisionOptions(fp32_ops=("Conv",))), whole=False)
    assert set(weight_types(by_type).values()) == {FP32}
    for proto in (by_name, by_type):
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        feed = {proto.graph.input[0].name: np.zeros((1, 16, 8, 8), np.float16)}
        assert session.run(None, feed)[0].dtype == np.float16


def test_fp16_keep_settings_key_the_latency_cache_apart(tmp_path, monkeypatch):
    from compressor.latency import timed

    variants = [fp16_request(), fp16_request(PrecisionOptions(exclude=("Conv_16",))),
                fp16_request(PrecisionOptions(exclude=("Conv_4",))), fp16_request(PrecisionOptions(fp32_ops=("Gemm",))),
                fp16_request(PrecisionOptions(keep_io_types=False)), fp16_request(KEEPS)]
    labels = [r.timed_precision for r in variants]
    assert labels[0] == "fp16" and len(set(labels)) == len(labels)
    caches = [LatencyCache(context_of(r.target, r.batch, r.timed_precision), tmp_path) for r in variants]
    assert len({c.path for c in caches}) == len(caches)
    # the remembered conversions of whole networks are keyed by the settings too
    monkeypatch.setattr(timed, "_converted", type(timed._converted)())
    model = small_classifier()
    kept = timed.timing_model(model, variants[1], whole=True)
    plain = timed.timing_model(model, variants[0], whole=True)
    assert weight_types(kept)["Conv_16"] == FP32 and weight_types(plain)["Conv_16"] == FP16


def test_latency_target_times_network_and_candidates_with_the_user_keeps(tmp_path, monkeypatch):
    from compressor.latency import table
    import compressor.runtime.bench

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    networks, micro, paired = [], [], []
    real_bench = compressor.runtime.bench.run_benchmark

    def recording(model, target, batch, settings, calibration=False, input_shapes=None):
        """Records what is timed; answers from the layer count and the weight bytes (real timings are noisy)."""
        (networks if calibration else micro).append(model)
        layers = sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
        return 0.01 + 0.1 * layers + 1e-4 * sum(len(init.raw_data) for init in model.graph.initializer)

    def recording_bench(models, *args, **kwargs):
        paired.extend(models)
        return real_bench(models, *args, **kwargs)

    monkeypatch.setattr(table, "measure_ms", recording)
    monkeypatch.setattr(compressor.runtime.bench, "run_benchmark", recording_bench)
    fast = ProfileSettings(warmup=1, min_runs=2, max_runs=3, seconds_per_point=0.001, calibration_runs=3,
                           calibration_seconds=0.01, check_warmup=1, check_runs=3, loop_iterations=1)
    monkeypatch.setattr("compressor.latency.request.ProfileSettings", lambda: fast)
    result = compressor.compress(small_classifier(), "l1", 0.5, target="latency", device="cpu:1", precision="fp16",
                                 precision_options=KEEPS, profile_budget=5.0)
    latency = result.report["latency"]
    assert latency["timed_as"] == "fp16-fp32ops-Gemm-exclude-Conv_16"
    assert latency["table"]["context"]["precision"] == latency["timed_as"]
    assert networks and paired and micro
    expected = {"Conv_4": FP16, "Conv_16": FP32, "Gemm_32": FP32}
    for model in [*networks, *paired, result.model]:  # measured network, closed-loop pair, shipped model
        assert weight_types(model) == expected
    micro_convs = [types for types in map(weight_types, micro) if types]
    assert micro_convs and all(set(t.values()) == {FP16} for t in micro_convs if "Gemm_32" not in t)

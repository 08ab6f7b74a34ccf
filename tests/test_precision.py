"""fp16 and int8 after compression: round trips, the comparison with fp32, exclusions, refusals, bench."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compressor import CompressorError, VerificationError, compress
from compressor.runtime.bench import run_benchmark
from compressor.runtime.targets import parse_target
from compressor.deploy import PrecisionOptions, convert_precision, model_precision
from compressor.deploy.feeds import as_feeds
from tests.cli_run import run_cli
from tests.graphs import GraphBuilder, head

REPO = Path(__file__).resolve().parents[1]
RESNET20 = REPO / "examples" / "resnet20-cifar10.onnx"


def small_classifier() -> onnx.ModelProto:
    b = GraphBuilder(shape=(1, 4, 8, 8))
    x = b.op("Relu", [b.bn(b.conv("x", 4, 16), 16)])
    x = b.op("Relu", [b.bn(b.conv(x, 16, 16), 16)])
    return b.model(head(b, x, 16, classes=10))


def run(proto: onnx.ModelProto, feed: dict) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0].astype(np.float64)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def calibration(count: int = 64, seed: int = 0) -> np.ndarray:
    """CIFAR-like inputs: smooth per-image colour fields plus noise, normalized (seeded)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((count, 3, 4, 4)).repeat(8, axis=2).repeat(8, axis=3)
    return (base + 0.3 * rng.standard_normal((count, 3, 32, 32))).astype(np.float32)


@pytest.fixture(scope="module")
def resnet20_slim():
    return compress(RESNET20, method="l1", ratio=0.5, round_to=8)


def test_fp16_round_trip_keeps_io_types_and_agrees_with_fp32():
    fp32 = compress(small_classifier(), method="l1", ratio=0.5)
    result = compress(small_classifier(), method="l1", ratio=0.5, precision="fp16")
    model = result.model
    assert model_precision(model) == "fp16" and model_precision(fp32.model) == "fp32"
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.FLOAT}
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}
    feed = {"x": np.random.default_rng(5).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    assert relative(run(model, feed), run(fp32.model, feed)) < 1e-2
    report = result.report["precision"]
    assert report["precision"] == "fp16" and report["inputs"] == "seeded random"
    assert 0 < report["worst_relative_error"] < report["max_relative_error"] == 0.01
    assert report["top1_agreement"] and report["worst_top1_agreement"] >= 0.98
    assert result.report["bytes_after"] == model.ByteSize() < fp32.model.ByteSize()
    assert result.report["verified"]  # the surgery was proven in fp32 first


def test_fp16_without_io_types_takes_fp16_inputs_and_excluded_nodes_stay_fp32(resnet20_slim):
    options = PrecisionOptions(keep_io_types=False, exclude=("node_linear",))
    model, report = convert_precision(resnet20_slim.model, "fp16", None, options)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    gemm = next(n for n in model.graph.node if n.name == "node_linear")
    weights = {init.name: init.data_type for init in model.graph.initializer}
    assert weights[gemm.input[1]] == onnx.TensorProto.FLOAT
    assert report["fp32_nodes"] == ["node_linear"]
    feed = {"input": calibration(4)}
    out16 = run(model, {"input": feed["input"].astype(np.float16)})
    assert relative(out16, run(resnet20_slim.model, feed)) < 1e-2


def test_int8_round_trip_on_resnet20_is_qdq_per_channel_and_close_to_fp32(tmp_path, resnet20_slim):
    calib = tmp_path / "calib.npy"
    np.save(calib, calibration(96))
    model, report = convert_precision(resnet20_slim.model, "int8", calib, PrecisionOptions())
    assert model_precision(model) == "int8"
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    conv_count = sum(1 for n in resnet20_slim.model.graph.node if n.op_type == "Conv")
    assert report["quantized_ops"]["Conv"] == conv_count
    # per channel: a Conv weight's scale has one entry per output channel
    inits = {i.name: i for i in model.graph.initializer}
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) == 4]
    assert scales and all(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)
    # U8S8: activations quantized to uint8
    activation_zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert {z.data_type for z in activation_zero_points} == {onnx.TensorProto.UINT8}
    feed = {"input": calibration(32, seed=9)}
    err = relative(run(model, feed), run(resnet20_slim.model, feed))
    assert err < 0.25
    assert report["inputs"] == "calibration" and report["calibration_samples"] == 96 and report["samples"] == 64
    assert report["worst_relative_error"] < 0.25


def test_int8_s8s8_and_exclusion(resnet20_slim):
    feeds = [{"input": calibration(16, seed=s)} for s in range(3)]
    options = PrecisionOptions(activation_type="int8", exclude=("node_linear",))
    model, report = convert_precision(resnet20_slim.model, "int8", iter(feeds), options)  # a one-shot iterator
    inits = {i.name: i for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert {z.data_type for z in zero_points} == {onnx.TensorProto.INT8}
    gemm = next(n for n in model.graph.node if n.name == "node_linear")
    assert inits[gemm.input[1]].data_type == onnx.TensorProto.FLOAT  # excluded: float weights, no DequantizeLinear
    assert report["excluded_nodes"] == ["node_linear"] and "Gemm" not in report["quantized_ops"]
    assert report["calibration_samples"] == 48


def test_int8_without_calibration_is_refused_before_any_work():
    with pytest.raises(CompressorError, match="calibration data"):
        compress(RESNET20, method="l1", ratio=0.5, precision="int8")


def test_converted_model_beyond_the_limit_is_refused(resnet20_slim):
    options = PrecisionOptions(max_relative_error=1e-9)
    with pytest.raises(VerificationError, match="strays from the fp32 model.*nothing written"):
        convert_precision(resnet20_slim.model, "fp16", None, options)


def test_calibration_data_errors(tmp_path, resnet20_slim):
    model = resnet20_slim.model
    wrong_rank = tmp_path / "rank.npy"
    np.save(wrong_rank, np.zeros((4, 3, 32), np.float32))
    with pytest.raises(CompressorError, match="rank"):
        as_feeds(wrong_rank, model)
    wrong_name = tmp_path / "names.npz"
    np.savez(wrong_name, image=np.zeros((4, 3, 32, 32), np.float32), other=np.zeros((4, 1), np.float32))
    with pytest.raises(CompressorError, match="do not match the model inputs"):
        as_feeds(wrong_name, model)
    with pytest.raises(CompressorError, match="not found"):
        as_feeds(tmp_path / "missing.npy", model)
    good = tmp_path / "good.npz"
    np.savez(good, input=calibration(70))
    feeds = as_feeds(good, model, batch=32)
    assert [len(f["input"]) for f in feeds] == [32, 32, 6] and list(feeds) == list(feeds)  # re-iterable


def test_cli_precision_writes_report_and_refusals_write_nothing(tmp_path):
    calib = tmp_path / "calib.npy"
    np.save(calib, calibration(64))
    out, report = tmp_path / "slim.int8.onnx", tmp_path / "report.json"
    proc = run_cli(str(RESNET20), "-m", "l1", "-r", "0.5", "-o", str(out), "--precision", "int8", "--precision-calib",
                   str(calib), "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    assert "int8: relative output error" in proc.stdout
    assert model_precision(onnx.load(out)) == "int8" and json.loads(report.read_text())["precision"]["precision"] == "int8"
    for extra in (["--precision", "int8"], ["--precision", "fp16", "--precision-max-error", "1e-12"],
                  ["--precision", "bf16"], ["--precision", "fp16", "--exclude-quant", "no_such_node"],
                  ["--precision", "fp16", "--fp16-keep-op", "NoSuchOp"], ["--fp16-keep-op", "Gemm"]):
        target = tmp_path / "refused.onnx"
        proc = run_cli(str(RESNET20), "-m", "l1", "-r", "0.5", "-o", str(target), *extra)
        lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("compress: ")]  # stages
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), (extra, proc.stderr)
        assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "report.json", "slim.int8.onnx"]


def test_cli_fp16_keep_op_keeps_that_op_type_in_fp32(tmp_path):
    out = tmp_path / "slim.fp16.onnx"
    proc = run_cli(str(RESNET20), "-m", "l1", "-r", "0.5", "-o", str(out), "--precision", "fp16", "--fp16-keep-op", "Gemm")
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(out)
    weights = {i.name: i.data_type for i in model.graph.initializer}
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert weights[gemm.input[1]] == onnx.TensorProto.FLOAT and weights[conv.input[1]] == onnx.TensorProto.FLOAT16


def test_bench_times_fp16_and_int8_models_and_reports_their_precision(tmp_path, resnet20_slim):
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(resnet20_slim.model, fp32)
    fp16 = tmp_path / "fp16.onnx"
    onnx.save(convert_precision(resnet20_slim.model, "fp16", None, PrecisionOptions(keep_io_types=False))[0], fp16)
    report = run_benchmark([fp32, fp16], ["cpu:1"], [2], warmup=1, runs=3, rounds=1, isolate=False, environment=False)
    by_model = {m.model: m for m in report.measurements}
    assert by_model["fp16"].precision == "fp16" and by_model["fp32"].precision == "fp32"
    assert by_model["fp16"].input_shapes == {"input": [2, 3, 32, 32]} and by_model["fp16"].runs == 3
    assert [m.precision for m in report.models] == ["fp32", "fp16"]
    assert " fp16 " in report.to_text()


def test_target_provider_options_are_parsed_labelled_and_validated():
    target = parse_target("cuda:1,prefer_nhwc=1,use_tf32=0")
    assert target.label == "cuda:1,prefer_nhwc=1,use_tf32=0" and parse_target(target.label) == target
    from compressor.runtime.sessions import execution_providers

    (name, options), = execution_providers(target)
    assert name == "CUDAExecutionProvider" and options["prefer_nhwc"] == "1" and options["use_tf32"] == "0"
    with pytest.raises(CompressorError, match="bad target option"):
        parse_target("cuda,enable_cuda_graph=1")
    with pytest.raises(CompressorError, match="bad target option"):
        parse_target("cpu:1,prefer_nhwc=1")


# ------------------------------------------------------------------------------------ latency tables know fp16
def test_latency_tables_are_timed_in_fp16_and_cached_apart_from_fp32(tmp_path, monkeypatch):
    import compressor
    from compressor.latency import ProfileSettings, table
    from compressor.latency.cache import LatencyCache

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    timed = []

    def recording(model, target, batch, settings, calibration=False, input_shapes=None):
        """Records what is timed; answers from the layer count and the weight bytes (real timings are noisy)."""
        inputs = {i.type.tensor_type.elem_type for i in model.graph.input}
        weights = {init.data_type for init in model.graph.initializer if len(init.dims) == 4}
        timed.append((calibration, inputs, weights))
        layers = sum(n.op_type in ("Conv", "Gemm") for n in model.graph.node)
        return 0.01 + 0.1 * layers + 1e-4 * sum(len(init.raw_data) for init in model.graph.initializer)

    monkeypatch.setattr(table, "measure_ms", recording)
    import compressor.runtime.bench

    paired, real_bench = [], compressor.runtime.bench.run_benchmark

    def recording_bench(models, *args, **kwargs):
        paired.append([model_precision(m) for m in models])
        return real_bench(models, *args, **kwargs)

    monkeypatch.setattr(compressor.runtime.bench, "run_benchmark", recording_bench)
    fast = ProfileSettings(warmup=1, min_runs=2, max_runs=3, seconds_per_point=0.001, calibration_runs=3,
                           calibration_seconds=0.01, check_warmup=1, check_runs=3, loop_iterations=0)
    monkeypatch.setattr("compressor.latency.request.ProfileSettings", lambda: fast)
    result = compressor.compress(small_classifier(), "l1", 0.5, target="latency", device="cpu:1", precision="fp16",
                                 profile_budget=5.0)
    assert result.report["precision"]["precision"] == "fp16" and model_precision(result.model) == "fp16"
    assert result.report["latency"]["table"]["context"]["precision"] == "fp16"
    micro = [entry for entry in timed if not entry[0]]
    network = [entry for entry in timed if entry[0]]
    assert micro and network
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert all(inputs == {fp16} for _, inputs, _ in micro)  # layers inside an fp16 network: fp16 throughout
    assert all(inputs == {fp32} and weights <= {fp16} for _, inputs, weights in network)  # deployed: fp32 I/O
    assert any(weights == {fp16} for _, _, weights in micro)
    assert paired == [["fp16", "fp16"]]  # the check times original and result converted, side by side
    # the fp32 context has its own cache file: nothing measured in fp16 is reused for fp32
    fp16_cache = Path(result.report["latency"]["table"]["cache"])
    assert "fp16" in fp16_cache.name and fp16_cache.is_file()
    timed.clear()
    compressor.compress(small_classifier(), "l1", 0.5, target="latency", device="cpu:1", profile_budget=5.0)
    assert timed and all(inputs == {fp32} for _, inputs, _ in timed)


def test_a_calibration_set_with_batches_feeds_int8(resnet20_slim):
    class CalibrationSetLike:  # the recovery work's CalibrationSet exposes batches(batch_size) -> feed dicts
        def __init__(self, images):
            self.images = images

        def batches(self, batch_size):
            for start in range(0, len(self.images), batch_size):
                yield {"input": self.images[start:start + batch_size].astype(np.float64)}  # cast to float32 on use

    model, report = convert_precision(resnet20_slim.model, "int8", CalibrationSetLike(calibration(40)),
                                      PrecisionOptions(calib_batch=16))
    assert report["calibration_samples"] == 40 and report["samples"] == 40 and model_precision(model) == "int8"

"""`compress bench` and compressor.runtime.bench on tiny CPU models: structure and sanity of results, never timings."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.errors import CompressorError
from compressor.runtime import bench, inputs, sessions, targets
from compressor.runtime.bench import measure, run_benchmark
from compressor.runtime.inputs import InputSpec, input_specs
from compressor.runtime.report import plot_report
from compressor.runtime.targets import Target, parse_target


def tiny_cnn(width: int, batch_dim="N", seed: int = 0) -> onnx.ModelProto:
    """Conv(3->width, 3x3) -> Relu -> GlobalAveragePool -> Flatten -> MatMul(width->10) on 3x16x16 images."""
    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array(rng.standard_normal((width, 3, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.standard_normal((width, 10)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    graph = helper.make_graph(nodes, f"tiny{width}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 10])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    paths = [folder / "wide.onnx", folder / "narrow.onnx"]
    onnx.save(tiny_cnn(16), paths[0])
    onnx.save(tiny_cnn(8), paths[1])
    return [str(p) for p in paths]


@pytest.fixture(scope="module")
def cpu_report(model_pair):
    return run_benchmark(model_pair, ["cpu:1"], [1, 2], warmup=1, runs=6, rounds=3)


# ----------------------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, expected", [
    ("cuda", Target("cuda", 0)), ("cuda:1", Target("cuda", 1)), ("CPU:4", Target("cpu", threads=4)),
    ("cpu:1", Target("cpu", threads=1)), ("tensorrt", Target("tensorrt", 0)), (" tensorrt:2 ", Target("tensorrt", 2)),
])
def test_parse_target_accepts_the_documented_forms(text, expected):
    target = parse_target(text)
    assert target == expected
    assert parse_target(target.label) == target


@pytest.mark.parametrize("text", ["gpu", "cpu", "cpu:0", "cpu:x", "cuda:-1", "cuda:a", "", "cpu:1:2", "tensorrt:"])
def test_parse_target_rejects_bad_targets(text):
    with pytest.raises(CompressorError, match="target"):
        parse_target(text)


def test_input_specs_take_batch_and_default_other_dynamic_dims():
    model = tiny_cnn(4)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"  # make H dynamic too
    assert input_specs(model, 8) == [InputSpec("x", (8, 3, 1, 16), "float32")]
    assert input_specs(model, 8, {"x": [1, 3, 32, 16]}) == [InputSpec("x", (8, 3, 32, 16), "float32")]
    assert input_specs(model, 2, {"": [1, 3, 5, 16]}) == [InputSpec("x", (2, 3, 5, 16), "float32")]
    with pytest.raises(CompressorError, match="unknown input"):
        input_specs(model, 1, {"y": [1, 3, 16, 16]})
    with pytest.raises(CompressorError, match="rank"):
        input_specs(model, 1, {"x": [1, 3]})


def test_fixed_batch_model_refuses_another_batch():
    model = tiny_cnn(4, batch_dim=1)
    assert input_specs(model, 1)[0].shape == (1, 3, 16, 16)
    with pytest.raises(CompressorError, match="fixed batch size of 1"):
        input_specs(model, 32)


def test_make_inputs_are_seeded_and_typed():
    specs = [InputSpec("a", (2, 3), "float32"), InputSpec("b", (4,), "int64"), InputSpec("c", (2,), "bool")]
    first, second = inputs.make_inputs(specs, seed=3), inputs.make_inputs(specs, seed=3)
    for name in "abc":
        np.testing.assert_array_equal(first[name], second[name])
    assert [first[n].dtype for n in "abc"] == [np.float32, np.int64, np.bool_]


def test_runs_are_spread_over_rounds():
    assert bench.runs_per_round(10, 3) == [4, 3, 3]
    assert bench.runs_per_round(2, 5) == [1, 1]


# ------------------------------------------------------------------------------------------------------ CPU results
def test_cpu_report_fields_and_sanity(cpu_report, model_pair):
    assert [(m.model, m.target, m.batch) for m in cpu_report.measurements] == [
        ("wide", "cpu:1", 1), ("narrow", "cpu:1", 1), ("wide", "cpu:1", 2), ("narrow", "cpu:1", 2)]
    for m in cpu_report.measurements:
        assert m.provider == "CPUExecutionProvider"
        assert m.runs == 6 and len(m.round_medians_ms) == 3
        assert 0 < m.p50_ms <= m.p90_ms <= m.p99_ms
        assert m.throughput > 0 and m.session_create_s > 0 and m.first_run_s > 0
        assert m.memory["kind"] == "cpu-rss" and m.memory["peak_mb"] > 0 and m.memory_mb > 0
        assert m.input_shapes == {"x": [m.batch, 3, 16, 16]}
        data = m.to_dict()
        for key in ("p50_ms", "p90_ms", "p99_ms", "throughput_per_s", "session_create_s", "memory_mb", "latencies_ms",
                    "macs", "params", "file_bytes"):
            assert key in data
    assert cpu_report.models[0].path == model_pair[0]


def test_macs_params_and_ratios_against_first_model(cpu_report):
    wide, narrow = cpu_report.models
    assert (wide.macs, wide.params) == (16 * 27 * 256 + 16 * 10, 16 * 27 + 16 * 10)
    assert (narrow.macs, narrow.params) == (8 * 27 * 256 + 8 * 10, 8 * 27 + 8 * 10)
    ratios = cpu_report.ratios()
    assert [(r["model"], r["baseline"], r["batch"]) for r in ratios] == [("narrow", "wide", 1), ("narrow", "wide", 2)]
    for r in ratios:
        assert r["macs_ratio"] == 0.5 and r["params_ratio"] == 0.5
        base, other = cpu_report.cell(r["target"], r["batch"])
        assert r["speedup_p50"] == pytest.approx(base.p50_ms / other.p50_ms)
        assert r["size_ratio"] == pytest.approx(other.file_bytes / base.file_bytes)
        assert r["paired_speedup"] > 0


def test_models_are_interleaved_round_by_round(cpu_report):
    for batch in (1, 2):
        order = [(s["round"], s["model_index"]) for s in cpu_report.schedule if s["batch"] == batch]
        assert order == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert sum(s["runs"] for s in cpu_report.schedule) == 6 * 4


def test_report_outputs(cpu_report, tmp_path):
    text, markdown = cpu_report.to_text(), cpu_report.to_markdown()
    for name in ("wide", "narrow"):
        assert name in text and name in markdown
    assert "## Environment" in markdown and "onnxruntime" in markdown
    env = cpu_report.environment
    for key in ("onnxruntime", "available_providers", "cpu_model", "cpu_count", "python", "date_utc"):
        assert key in env
    assert cpu_report.settings["session_options"]["cpu:1"]["intra_op_num_threads"] == 1
    data = json.loads(json.dumps(cpu_report.to_dict()))
    assert len(data["measurements"]) == 4 and len(data["ratios"]) == 2
    pytest.importorskip("matplotlib")
    plot_report(cpu_report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measure_in_process_on_a_proto():
    m = measure(tiny_cnn(4), "cpu:1", batch=3, warmup=1, runs=5, isolate=False)
    assert m.batch == 3 and m.runs == 5 and m.p50_ms <= m.p90_ms <= m.p99_ms
    assert m.memory["kind"] == "cpu-rss-in-process"
    assert m.model == "tiny4"


def test_pin_reports_the_cores(model_pair):
    if not hasattr(__import__("os"), "sched_setaffinity"):
        pytest.skip("no CPU affinity on this OS")
    m = measure(model_pair[1], "cpu:1", warmup=0, runs=2, pin=True, with_cost=False)
    assert m.pinned_cores is not None and len(m.pinned_cores) == 1


def test_sessions_sharing_pinned_cores_stop_spinning_when_a_run_returns():
    cpu = parse_target("cpu:4")
    shared = sessions.benchmark_session_options(cpu, shares_cores=True)
    assert shared.get_session_config_entry("session.force_spinning_stop") == "1"
    alone = sessions.benchmark_session_options(cpu)
    with pytest.raises(Exception):  # never set: ONNX Runtime's default (threads spin on between runs)
        alone.get_session_config_entry("session.force_spinning_stop")
    assert alone.intra_op_num_threads == shared.intra_op_num_threads == 4


def test_worker_errors_come_back_as_one_line(tmp_path):
    model = tiny_cnn(4)
    model.graph.node[1].op_type = "NoSuchOp"
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    with pytest.raises(CompressorError, match="cannot create a session"):
        measure(str(path), "cpu:1", warmup=0, runs=1, with_cost=False)


def test_unreadable_and_missing_models(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    with pytest.raises(CompressorError, match="cannot read ONNX model"):
        run_benchmark([str(tmp_path / "junk.onnx")], ["cpu:1"])
    with pytest.raises(CompressorError, match="not found"):
        run_benchmark([str(tmp_path / "missing.onnx")], ["cpu:1"])
    with pytest.raises(CompressorError, match="runs"):
        run_benchmark([tiny_cnn(4)], ["cpu:1"], runs=0)


# ----------------------------------------------------------------------------------------------------- GPU code path
def test_missing_gpu_provider_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(CompressorError, match="CUDAExecutionProvider is not available"):
        run_benchmark([tiny_cnn(4)], ["cuda"])


def test_silent_fallback_to_cpu_is_refused(monkeypatch):
    class FellBack:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(sessions, "preload_cuda_libraries", lambda: None)
    monkeypatch.setattr(sessions, "new_session", lambda model, options, providers: FellBack())
    with pytest.raises(CompressorError, match="fell back to CPUExecutionProvider"):
        sessions.SessionRunner(tiny_cnn(4).SerializeToString(), Target("cuda"), input_specs(tiny_cnn(4), 1))


class FakeGpuProbe:
    """Device memory that grows by 10 MiB at every reading."""

    source = "fake"

    def __init__(self):
        self.used = 1 << 30

    def used_bytes(self):
        self.used += 10 << 20
        return self.used


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """Route the cuda target's IOBinding path to CPU memory and the CPU provider, with a fake GPU memory probe."""
    monkeypatch.setitem(targets.PROVIDERS, "cuda", "CPUExecutionProvider")
    monkeypatch.setitem(targets.IO_DEVICE, "cuda", "cpu")
    monkeypatch.setattr(sessions, "execution_providers", lambda target, cuda_graph=False: [("CPUExecutionProvider", {})])
    monkeypatch.setattr(sessions, "preload_cuda_libraries", lambda: None)
    monkeypatch.setattr(bench, "primed_gpu_probe", lambda target: FakeGpuProbe())


def test_gpu_path_binds_io_and_measures_device_memory(cuda_on_cpu):
    model = tiny_cnn(4)
    specs = input_specs(model, 2)
    runner = sessions.SessionRunner(model.SerializeToString(), Target("cuda"), specs, seed=1)
    assert runner.binding is not None
    runner.time_runs(2)
    bound = runner.binding.copy_outputs_to_cpu()[0]
    np.testing.assert_allclose(bound, runner.session.run(None, runner.feeds)[0], rtol=1e-6)

    report = run_benchmark([model, tiny_cnn(2)], ["cuda"], [2], warmup=1, runs=4, rounds=2)
    assert [m.model for m in report.measurements] == ["tiny4", "tiny2"]
    for m in report.measurements:
        assert m.target == "cuda:0" and m.memory["kind"] == "gpu" and m.memory["source"] == "fake"
        assert m.memory["added_mb"] == 10.0  # one reading before the session, one after its warm-up
        assert m.memory["cell_growth_during_runs_mb"] == 10.0
        assert m.p50_ms <= m.p90_ms <= m.p99_ms
    assert "gpus" in report.environment
    assert report.settings["session_options"]["cuda:0"]["io_binding"]


def test_cuda_graph_session_writes_into_the_bound_outputs_from_its_first_run(cuda_on_cpu, monkeypatch):
    """A CUDA graph records the buffers of the runs it is made from: the graph session must never run with outputs
    that ONNX Runtime allocates itself (a plain sibling session learns the output shapes instead)."""
    created, runs = [], []
    plain_new_session = sessions.new_session

    def recording_session(model, options, providers):
        session = plain_new_session(model, options, providers)
        index = len(created)
        created.append(session)
        plain_run = session.run_with_iobinding

        def run(binding, *args):
            runs.append((index, None if index else [v.data_ptr() for v in binding.get_outputs()]))
            return plain_run(binding, *args)

        session.run_with_iobinding = run
        return session

    monkeypatch.setattr(sessions, "new_session", recording_session)
    model = tiny_cnn(4)
    runner = sessions.SessionRunner(model.SerializeToString(), Target("cuda"), input_specs(model, 2), seed=1,
                                    cuda_graph=True)
    runner.time_runs(2)
    assert len(created) == 2 and created[0] is runner.session  # the graph session, then the shape learner
    bound = [v.data_ptr() for v in runner._device_outputs.values()]
    graph_runs = [ptrs for index, ptrs in runs if index == 0]
    assert graph_runs and all(ptrs == bound for ptrs in graph_runs)
    np.testing.assert_allclose(runner.outputs()[0], runner.session.run(None, runner.feeds)[0], rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------- CLI
def run_cli(argv):
    from cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def test_cli_writes_json_markdown_and_plot(model_pair, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "r"
    code = run_cli(["bench", *model_pair, "--target", "cpu:1", "--batch", "1", "--runs", "4", "--warmup", "1",
                    "--rounds", "2", "--json", f"{out}.json", "--md", f"{out}.md", "--plot", f"{out}.png",
                    "--input-shape", "x:1x3x16x16"])
    assert code in (0, None)
    stdout = capsys.readouterr().out
    assert "wide" in stdout and "narrow" in stdout and "p50 ms" in stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert [m["model"] for m in data["measurements"]] == ["wide", "narrow"]
    assert data["settings"]["runs"] == 4 and data["ratios"][0]["baseline"] == "wide"
    assert (tmp_path / "r.md").read_text().startswith("# Benchmark")
    assert (tmp_path / "r.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--target", "gpu"], "bad target 'gpu'"),
    (["--batch", "0"], "batch sizes must be at least 1"),
    (["--input-shape", "x:1xq"], "input-shape"),
])
def test_cli_bad_options_fail_with_one_line(model_pair, capsys, args, message):
    assert run_cli(["bench", model_pair[0], "--runs", "1", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_gpu_path_without_memory_probe(cuda_on_cpu):
    m = measure(tiny_cnn(4), "cuda", warmup=1, runs=3, memory=False, with_cost=False)
    assert m.memory == {"kind": "gpu", "source": None, "added_mb": None, "peak_mb": None}
    assert m.memory_mb is None and m.p50_ms <= m.p99_ms


def test_merge_reports_keeps_cells_and_per_target_settings(model_pair):
    from compressor.runtime.report import merge_reports

    first = run_benchmark(model_pair, ["cpu:1"], [1], warmup=0, runs=2, rounds=1, isolate=False, with_cost=False)
    second = run_benchmark(model_pair, ["cpu:2"], [2], warmup=0, runs=3, rounds=1, isolate=False, with_cost=False)
    merged = merge_reports([first, second])
    assert merged.cells() == [("cpu:1", 1), ("cpu:2", 2)]
    assert merged.settings["targets"] == ["cpu:1", "cpu:2"]
    assert merged.settings["runs"] == {"cpu:1": 2, "cpu:2": 3}
    assert len(merged.ratios()) == 2
    with pytest.raises(CompressorError, match="different models"):
        merge_reports([first, run_benchmark(model_pair[:1], ["cpu:1"], runs=1, isolate=False, with_cost=False)])


def test_images_per_second_and_speedup_use_the_same_statistic(cpu_report):
    """img/s is batch / p50 like the speedup, so the two columns of one row always agree (issue 10)."""
    for m in cpu_report.measurements:
        assert m.throughput == pytest.approx(m.batch * 1000.0 / m.p50_ms, rel=1e-12)
    for row in cpu_report.ratios():
        assert row["throughput_ratio"] == pytest.approx(row["speedup_p50"], rel=1e-12)
    header = cpu_report.to_text().splitlines()[0]
    assert "img/s (p50)" in header and "speedup (p50)" in header

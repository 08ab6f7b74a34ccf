"""Issue 10: no file is ever lost or overwritten, every error is one line, interrupts leave nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from compressor.errors import CompressorError
from compressor.files import PendingWrites, check_output_paths
from tests.graphs import GraphBuilder, head
from tests.test_cli import REPO, digest, is_progress, run_cli, small_model


def listing(folder: Path) -> dict[str, str]:
    """Every file under `folder` (temp files included) with its content digest."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr without the progress display's stage lines."""
    return [line for line in proc.stderr.strip().splitlines() if line.strip() and not is_progress(line)]


def assert_refused(proc: subprocess.CompletedProcess, *words: str, code: int = 2) -> None:
    lines = error_lines(proc)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture()
def work(tmp_path) -> Path:
    small_model(tmp_path / "model.onnx")
    return tmp_path


def with_external_data(folder: Path) -> Path:
    model = onnx.load(folder / "model.onnx")
    onnx.save_model(model, folder / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.weights", size_threshold=0)
    return folder / "ext.onnx"


# ------------------------------------------------------------------------------------------------------ data safety
@pytest.mark.parametrize("case", ["report_is_input", "report_is_output", "report_symlink_to_input",
                                  "report_dotdot_to_input", "output_hardlink_to_input", "output_is_external_data",
                                  "report_is_external_data", "output_data_is_input", "report_missing_dir",
                                  "report_is_directory", "bench_provider_missing"])
def test_outputs_checked_before_any_work(case, work):
    model, out = work / "model.onnx", work / "out.onnx"
    args = [str(model), "-m", "l1", "-r", "0.5", "-o", str(out)]
    if case == "report_is_input":
        args += ["--report", str(model)]
    elif case == "report_is_output":
        args += ["--report", str(out)]
    elif case == "report_symlink_to_input":
        (work / "link.json").symlink_to(model)
        args += ["--report", str(work / "link.json")]
    elif case == "report_dotdot_to_input":
        (work / "sub").mkdir()
        args += ["--report", str(work / "sub" / ".." / "model.onnx")]
    elif case == "output_hardlink_to_input":
        os.link(model, work / "hard.onnx")
        args[-1] = str(work / "hard.onnx")
    elif case in ("output_is_external_data", "report_is_external_data"):
        args[0] = str(with_external_data(work))
        target = str(work / "ext.onnx.weights")
        args += ["--report", target] if case == "report_is_external_data" else []
        if case == "output_is_external_data":
            args[-1] = target
    elif case == "output_data_is_input":  # -o X writes X.data for large models: X.data must not be an input
        (work / "model.onnx").rename(work / "m.onnx.data")
        args[0] = str(work / "m.onnx.data")
        args[-1] = str(work / "m.onnx")
    elif case == "report_missing_dir":
        args += ["--report", str(work / "nodir" / "r.json")]
    elif case == "report_is_directory":
        (work / "d").mkdir()
        args += ["--report", str(work / "d")]
    elif case == "bench_provider_missing":
        import onnxruntime as ort

        missing = [t for t, p in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider"))
                   if p not in ort.get_available_providers()]
        if not missing:
            pytest.skip("this onnxruntime build has every GPU provider")
        args += ["--bench", missing[0], "--report", str(work / "r.json")]
    before = listing(work)
    proc = run_cli(*args)
    assert_refused(proc)
    assert not any(is_progress(line) for line in proc.stderr.splitlines()), "refused only after work started"
    assert listing(work) == before  # the input bytes are unchanged and no file appeared


def test_pending_writes_leave_neither_file_on_failure(tmp_path):
    model = onnx.load(small_model(tmp_path / "in.onnx"))
    before = listing(tmp_path)
    with pytest.raises(RuntimeError):
        with PendingWrites() as pending:
            staged = pending.stage_model(model, tmp_path / "out.onnx")
            assert onnx.load(staged).graph.node  # the staged model is complete and loadable before the commit
            pending.stage_text(tmp_path / "report.json", "{}")
            raise RuntimeError("a late step failed")
    assert listing(tmp_path) == before
    with PendingWrites() as pending:
        pending.stage_model(model, tmp_path / "out.onnx")
        pending.stage_text(tmp_path / "report.json", "{}")
        pending.commit()
    assert sorted(listing(tmp_path)) == ["in.onnx", "out.onnx", "report.json"]
    assert digest(tmp_path / "in.onnx") == before["in.onnx"]


def test_output_checks_name_the_clash(tmp_path):
    model = small_model(tmp_path / "m.onnx")
    with pytest.raises(CompressorError, match="--report .* is the input"):
        check_output_paths([model], {"-o": tmp_path / "o.onnx", "--report": tmp_path / "x" / ".." / "m.onnx"})
    with pytest.raises(CompressorError, match="also -o"):
        check_output_paths([model], {"-o": tmp_path / "o.onnx", "--report": tmp_path / "o.onnx"})
    check_output_paths([model], {"-o": tmp_path / "o.onnx", "--report": tmp_path / "r.json", "--plot": None})


def test_bench_outputs_checked_against_its_models(work):
    model = work / "model.onnx"
    before = listing(work)
    assert_refused(run_cli("bench", str(model), "--target", "cpu:1", "--runs", "2", "--json", str(model)))
    assert listing(work) == before


# ------------------------------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("args, words", [
    (["MODEL", "--ratio", "abc", "-o", "OUT"], ["--ratio", "compress --help"]),
    ([], ["MODEL.onnx", "compress --help"]),
    (["MODEL", "--ratio", "0.5", "-o", "OUT", "--no-such-flag"], ["--no-such-flag", "compress --help"]),
    (["inspect"], ["compress inspect --help"]),
])
def test_usage_errors_are_one_line_exit_2(args, words, work):
    args = [str(work / "model.onnx") if a == "MODEL" else str(work / "out.onnx") if a == "OUT" else a for a in args]
    before = listing(work)
    assert_refused(run_cli(*args), *words)
    assert listing(work) == before


@pytest.mark.parametrize("shape, words", [
    ("x:1x3x8x8", ["dim 1 is 3", "fixes it to 4"]),  # wrong channel count
    ("x:1x4x8", ["rank 3", "rank 4"]),
    ("1x4x8x8x1", ["rank 5"]),
])
def test_input_shape_checked_against_the_model(shape, words, work):
    before = listing(work)
    proc = run_cli(str(work / "model.onnx"), "-r", "0.5", "-o", str(work / "out.onnx"), "--input-shape", shape)
    assert_refused(proc, "--input-shape", *words)
    assert listing(work) == before


def test_input_shape_may_set_free_dims(tmp_path):
    b = GraphBuilder(shape=(1, 4, "h", "w"))
    x = b.op("Relu", [b.conv("x", 4, 8)])
    onnx.save(b.model(head(b, b.op("Relu", [b.conv(x, 8, 8)]), 8)), tmp_path / "dyn.onnx")
    proc = run_cli(str(tmp_path / "dyn.onnx"), "-r", "0.3", "-o", str(tmp_path / "o.onnx"), "--input-shape",
                   "x:1x4x12x12", "--report", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    assert '"x": [\n      1,\n      4,\n      12,\n      12' in (tmp_path / "r.json").read_text()


def test_quantized_model_is_refused_with_advice(work):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.feeds = iter([{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(work / "model.onnx"), str(work / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(work / "int8.onnx").graph.node)
    before = listing(work)
    proc = run_cli(str(work / "int8.onnx"), "-r", "0.5", "-o", str(work / "out.onnx"))
    assert_refused(proc, "quantized models are not supported yet", "before quantiz")
    assert listing(work) == before


@pytest.mark.parametrize("method, words", [
    ("l1", ["'bogus'", "l1", "takes no options"]),
    ("graph-rw", ["'bogus'", "graph-rw", "rw_damping", "layer_rates"]),
])
def test_unknown_method_option_lists_the_methods_options(method, words, work):
    before = listing(work)
    proc = run_cli(str(work / "model.onnx"), "-m", method, "-r", "0.5", "-o", str(work / "out.onnx"), "-O", "bogus=1")
    assert_refused(proc, *words)
    assert listing(work) == before


def test_known_method_options_still_work(work):
    proc = run_cli(str(work / "model.onnx"), "-m", "graph-rw", "-r", "0.5", "-o", str(work / "out.onnx"),
                   "-O", "rw-damping=0.8", "-O", "layer_rates=uniform")
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------------------------------- interrupts
def slow_model(path: Path) -> Path:
    """Wide convs on a free spatial size: at 1x16x512x512 each ONNX Runtime run takes about a second."""
    b = GraphBuilder(shape=(1, 16, "h", "w"))
    x = b.op("Relu", [b.conv("x", 16, 64)])
    for _ in range(3):
        x = b.op("Relu", [b.conv(x, 64, 64)])
    onnx.save(b.model(head(b, x, 64)), path)
    return path


@pytest.mark.parametrize("signum, stage, extra", [
    (signal.SIGINT, "verify", []),
    (signal.SIGTERM, "verify", []),
    (signal.SIGTERM, "bench", ["--no-verify", "--bench", "cpu:1"]),  # the model is staged: its temp file must go
])
def test_interrupt_prints_one_line_and_leaves_nothing(signum, stage, extra, tmp_path):
    model = slow_model(tmp_path / "slow.onnx")
    before = listing(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [str(model), "-r", "0.5", "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json"),
            "--input-shape", "x:1x16x512x512", *extra]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.strip() == f"compress: {stage}":
            break
    assert seen and seen[-1].strip() == f"compress: {stage}", "".join(seen)
    time.sleep(1.0)
    assert proc.poll() is None, "finished before the signal: the model is too fast for this test"
    proc.send_signal(signum)
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    lines = [line for line in rest.strip().splitlines() if line.strip() and not is_progress(line)]
    assert proc.returncode == 128 + signum
    assert lines == ["error: interrupted"], rest
    assert listing(tmp_path) == before  # no model, no report, no temp file


# -------------------------------------------------------------------------------------------------- small things
def test_progress_is_one_line_per_stage_off_a_terminal(work):
    proc = run_cli(str(work / "model.onnx"), "-r", "0.5", "-o", str(work / "out.onnx"))
    assert proc.returncode == 0, proc.stderr
    stages = [line.split(": ", 1)[1] for line in proc.stderr.splitlines() if is_progress(line)]
    assert stages == ["analyze", "plan", "surgery", "verify", "report"]
    quiet = run_cli(str(work / "model.onnx"), "-r", "0.5", "-o", str(work / "out2.onnx"), "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""


def test_summary_explains_the_difference_to_the_original(work):
    proc = run_cli(str(work / "model.onnx"), "-r", "0.5", "-o", str(work / "out.onnx"))
    assert "vs original" not in proc.stdout
    assert "differ from the unpruned original" in proc.stdout and "expected" in proc.stdout
    assert "relative error" in proc.stdout and "tolerance" in proc.stdout

"""The `compress` command: success output and reports, and one clean stderr line for every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from tests.cli_run import run_cli
from tests.graphs import GraphBuilder, head

REPO = Path(__file__).resolve().parents[1]


def small_model(path: Path) -> Path:
    b = GraphBuilder()
    x = b.op("Relu", [b.bn(b.conv("x", 4, 16), 16)])
    x = b.op("Relu", [b.bn(b.conv(x, 16, 16), 16)])
    onnx.save(b.model(head(b, x, 16)), path)
    return path


def is_progress(line: str) -> bool:
    """A stage line of the progress display (stderr is not a terminal in tests)."""
    return line.startswith("compress: ")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def model(tmp_path) -> Path:
    return small_model(tmp_path / "model.onnx")


def test_compress_writes_model_report_and_summary(model, tmp_path):
    before = digest(model)
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    proc = run_cli(str(model), "--method", "l1", "--ratio", "0.5", "-o", str(out), "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    assert "MACs" in proc.stdout and "verified" in proc.stdout
    data = json.loads(report.read_text())
    for key in ("method", "ratio", "macs_before", "macs_after", "params_before", "params_after", "bytes_before",
                "bytes_after", "verified", "relative_error_vs_reference", "relative_tolerance", "relative_error_vs_original", "groups",
                "blocks_removed", "seconds"):
        assert key in data
    assert data["verified"] and data["macs_after"] < data["macs_before"]
    assert {"name", "channels_before", "channels_after"} <= set(data["groups"][0])
    onnx.checker.check_model(onnx.load(out))
    assert digest(model) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_inspect_lists_groups_blocks_and_layers(model):
    proc = run_cli("inspect", str(model))
    assert proc.returncode == 0, proc.stderr
    assert "groups" in proc.stdout and "residual blocks" in proc.stdout and "Conv" in proc.stdout


def test_help_lists_subcommands():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "inspect" in proc.stdout and "bench" in proc.stdout


@pytest.mark.parametrize(
    "case",
    ["missing", "corrupt", "truncated", "ratio_high", "ratio_zero", "no_ratio", "method", "same_output",
     "unwritable", "nothing_prunable", "bad_shape", "bad_target", "directory"],
)
def test_bad_input_is_one_line_nonzero_and_writes_nothing(case, model, tmp_path):
    out = tmp_path / "out.onnx"
    args = [str(model), "-m", "l1", "-r", "0.5", "-o", str(out)]
    if case == "missing":
        args[0] = str(tmp_path / "nope.onnx")
    elif case == "corrupt":
        bad = tmp_path / "corrupt.onnx"
        bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
        args[0] = str(bad)
    elif case == "truncated":
        bad = tmp_path / "truncated.onnx"
        bad.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
        args[0] = str(bad)
    elif case == "ratio_high":
        args[4] = "1.5"
    elif case == "ratio_zero":
        args[4] = "0"
    elif case == "no_ratio":
        del args[3:5]
    elif case == "method":
        args[2] = "magic"
    elif case == "same_output":
        args[-1] = str(model)
    elif case == "unwritable":
        args[-1] = str(tmp_path / "no" / "such" / "dir" / "out.onnx")
    elif case == "nothing_prunable":
        b = GraphBuilder()
        onnx.save(b.model(b.conv("x", 4, 8)), tmp_path / "single.onnx")
        args[0] = str(tmp_path / "single.onnx")
    elif case == "bad_shape":
        args += ["--input-shape", "x:1xAx8"]
    elif case == "bad_target":
        args += ["--target", "flops"]
    elif case == "directory":
        args[-1] = str(tmp_path)
    before = digest(model)
    proc = run_cli(*args)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip() and not is_progress(line)]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert digest(model) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(
        p.name for p in tmp_path.iterdir() if p.is_file() and not p.name.startswith(".")
    )


def test_compress_path_never_imports_torch(model, tmp_path):
    code = (
        "import sys, compressor; compressor.compress(sys.argv[1], method='l1', ratio=0.5); "
        "import cli.compress_cmd, compressor.runtime.bench; "
        "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""Triton model repositories: config parsed by Triton's protobuf, model loaded back with ONNX Runtime, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from compressor import CompressorError
from compressor.deploy.triton_config import TritonSettings, model_config_module
from compressor.deploy.triton_repo import write_triton_repository
from tests.cli_run import run_cli
from tests.graphs import GraphBuilder, head

REPO = Path(__file__).resolve().parents[1]
RESNET20 = REPO / "examples" / "resnet20-cifar10.onnx"


def parse_config(path: Path):
    config = model_config_module().ModelConfig()
    text_format.Parse(path.read_text(), config)
    return config


def fixed_batch_model() -> onnx.ModelProto:
    b = GraphBuilder(shape=(1, 4, 8, 8))
    x = b.op("Relu", [b.conv("x", 4, 8)])
    return b.model(head(b, x, 8, classes=3))


def test_repository_for_a_dynamic_batch_model_parses_and_loads_back(tmp_path):
    repo = tmp_path / "repo"
    proc = run_cli("triton", str(RESNET20), "--repo", str(repo), "--name", "r20", "--version", "3",
                   "--max-batch-size", "16", "--dynamic-batching", "--instances", "2", "--kind", "gpu", "--trt-fp16")
    assert proc.returncode == 0, proc.stderr
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == ["r20", "r20/3", "r20/3/model.onnx",
                                                                         "r20/config.pbtxt"]
    config = parse_config(repo / "r20" / "config.pbtxt")
    pb2 = model_config_module()
    assert config.name == "r20" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    assert [(i.name, pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
        ("input", "TYPE_FP32", [3, 32, 32])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [10])]
    assert config.HasField("dynamic_batching")
    assert [(g.count, pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [(2, "KIND_GPU")]
    accelerator, = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and dict(accelerator.parameters) == {"precision_mode": "FP16"}
    # the repository's model is the input model and runs at the config's shapes
    session = ort.InferenceSession(str(repo / "r20" / "3" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    reference = ort.InferenceSession(str(RESNET20), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"input": x})[0], reference.run(None, {"input": x})[0])
    # a second version beside the first keeps it; an existing version is never overwritten
    proc = run_cli("triton", str(RESNET20), "--repo", str(repo), "--name", "r20", "--version", "4", "--kind", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert (repo / "r20" / "3" / "model.onnx").is_file() and (repo / "r20" / "4" / "model.onnx").is_file()
    assert parse_config(repo / "r20" / "config.pbtxt").max_batch_size == 8  # the default for a dynamic batch axis
    proc = run_cli("triton", str(RESNET20), "--repo", str(repo), "--name", "r20", "--version", "4")
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: ") and "already exists" in proc.stderr
    assert not [p for p in repo.rglob(".*")]  # no staging folders left


def test_fixed_batch_model_with_batching_is_refused_and_writes_nothing(tmp_path):
    model = tmp_path / "fixed.onnx"
    onnx.save(fixed_batch_model(), model)
    repo = tmp_path / "repo"
    proc = run_cli("triton", str(model), "--repo", str(repo), "--max-batch-size", "4")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "fixed batch dimension of 1" in lines[0], proc.stderr
    assert not repo.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx"]
    # without batching the config keeps the full dims
    staged = write_triton_repository(fixed_batch_model(), repo, "fixed")
    config = parse_config(repo / "fixed" / "config.pbtxt")
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 4, 8, 8]
    assert staged.run_shapes == {"x": [1, 4, 8, 8]}


@pytest.mark.parametrize("settings, message", [
    (TritonSettings(kind="cpu", trt_fp16=True), "--trt-fp16 needs --kind gpu"),
    (TritonSettings(max_batch_size=0, dynamic_batching=True), "--dynamic-batching needs"),
    (TritonSettings(instances=0), "--instances"),
    (TritonSettings(kind="tpu"), "--kind"),
])
def test_bad_settings_are_refused(tmp_path, settings, message):
    with pytest.raises(CompressorError, match=message):
        write_triton_repository(onnx.load(RESNET20), tmp_path / "repo", "m", settings=settings)
    assert not (tmp_path / "repo").exists()


def test_model_with_external_data_becomes_a_model_folder(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    onnx.save_model(onnx.load(RESNET20), str(source / "big.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="big.onnx.data", size_threshold=0)
    proc = run_cli("triton", str(source / "big.onnx"), "--repo", str(tmp_path / "repo"))
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "repo" / "big" / "1" / "model.onnx"
    assert folder.is_dir() and sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})[0].shape == (2, 10)


def test_compress_with_triton_repo_and_fp16(tmp_path):
    out, repo = tmp_path / "slim.onnx", tmp_path / "repo"
    proc = run_cli(str(RESNET20), "-m", "l1", "-r", "0.5", "-o", str(out), "--precision", "fp16", "--triton-repo",
                   str(repo))
    assert proc.returncode == 0, proc.stderr
    assert "triton:" in proc.stdout
    config = parse_config(repo / "slim" / "config.pbtxt")
    assert config.name == "slim" and model_config_module().DataType.Name(config.input[0].data_type) == "TYPE_FP32"
    assert (repo / "slim" / "1" / "model.onnx").read_bytes() == out.read_bytes()
    # a repository that would hold the output is refused before any work
    inside = repo / "slim2" / "1" / "model.onnx"
    proc = run_cli(str(RESNET20), "-m", "l1", "-r", "0.5", "-o", str(tmp_path / "slim2.onnx"), "--triton-repo",
                   str(tmp_path / "missing" / "repo"))
    assert proc.returncode != 0 and "does not exist" in proc.stderr and not (tmp_path / "slim2.onnx").exists()
    assert not inside.exists()

"""Write a Triton model repository: `REPO/NAME/config.pbtxt` and `REPO/NAME/VERSION/model.onnx`.

Everything is staged in a temporary folder beside its destination, validated (the config parsed with Triton's
protobuf and matched to the model; the staged model loaded with ONNX Runtime and run at the config's shapes), and
only then renamed into place. A model with external data becomes a folder `VERSION/model.onnx/` holding
`model.onnx` and `model.onnx.data` (the layout Triton's ONNX Runtime backend loads).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from compressor.deploy.triton_config import TritonSettings, build_config_text, validate_config_text
from compressor.errors import CompressorError, first_line

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
NUMPY_TYPES = {"TYPE_BOOL": "bool", "TYPE_UINT8": "uint8", "TYPE_UINT16": "uint16", "TYPE_UINT32": "uint32",
               "TYPE_UINT64": "uint64", "TYPE_INT8": "int8", "TYPE_INT16": "int16", "TYPE_INT32": "int32",
               "TYPE_INT64": "int64", "TYPE_FP16": "float16", "TYPE_FP32": "float32", "TYPE_FP64": "float64"}


def check_repository_target(repo: Path, name: str, version: int, protected: list[Path] = ()) -> None:
    """Refuse, before any work, a repository path that is a file, an existing version folder, or a model folder that
    would hold one of the `protected` paths (the input model, other outputs)."""
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise CompressorError(f"Triton repository path is not a directory: {repo}")
    if not repo.exists() and not repo.parent.is_dir():
        raise CompressorError(f"parent directory of the Triton repository does not exist: {repo.parent}")
    if version < 1:
        raise CompressorError(f"--version must be at least 1 (got {version})")
    model_dir = (repo / name).resolve()
    if (model_dir / str(version)).exists():
        raise CompressorError(f"{repo / name / str(version)} already exists: choose another --version or --repo")
    for path in protected:
        resolved = Path(path).resolve()
        if resolved == model_dir or model_dir in resolved.parents:
            raise CompressorError(f"{path} lies inside the Triton model folder {repo / name}: choose another --repo")


@dataclass
class StagedModel:
    """A validated model folder waiting in a temporary directory; `commit` moves it into the repository."""

    staging: Path
    model_dir: Path
    version: int
    config_text: str
    run_shapes: dict[str, list[int]]

    def commit(self) -> Path:
        """Rename the staged folder into place (a new version beside existing ones keeps them); returns NAME/."""
        try:
            self.model_dir.parent.mkdir(exist_ok=True)
            if not self.model_dir.exists():
                os.replace(self.staging / "model", self.model_dir)
            else:
                os.replace(self.staging / "model" / str(self.version), self.model_dir / str(self.version))
                os.replace(self.staging / "model" / "config.pbtxt", self.model_dir / "config.pbtxt")
        except OSError as exc:
            raise CompressorError(f"cannot write the Triton repository {self.model_dir.parent}: {exc}") from exc
        finally:
            self.discard()
        return self.model_dir

    def discard(self) -> None:
        """Remove the staging folder (nothing of it is left behind)."""
        shutil.rmtree(self.staging, ignore_errors=True)


def stage_triton_model(model: onnx.ModelProto, repo: Path, name: str, version: int = 1,
                       settings: TritonSettings = TritonSettings(),
                       input_shapes: dict[str, list[int]] | None = None, external_data: bool = False) -> StagedModel:
    """Build, write and validate one model folder in a staging directory next to the repository.

    `input_shapes` fills dynamic dims other than the batch for the load-back run (default 1); `external_data` writes
    the weights to a data file (always done for models over the protobuf limit).
    """
    repo = Path(repo)
    check_repository_target(repo, name, version)
    text = build_config_text(model, name, settings)
    config = validate_config_text(text, name, model)
    parent = repo if repo.is_dir() else repo.parent
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".staging", dir=parent))
    except OSError as exc:
        raise CompressorError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
    try:
        folder = staging / "model"
        (folder / str(version)).mkdir(parents=True)
        (folder / "config.pbtxt").write_text(text)
        model_path = _write_model(model, folder / str(version), external_data)
        validate_config_text((folder / "config.pbtxt").read_text(), name, onnx.load(str(model_path), load_external_data=False))
        shapes = load_and_run(model_path, config, input_shapes)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, CompressorError):
            raise
        raise CompressorError(f"cannot write the Triton model folder: {exc}") from exc
    return StagedModel(staging, repo / name, version, text, shapes)


def write_triton_repository(model: onnx.ModelProto, repo: Path, name: str, version: int = 1,
                            settings: TritonSettings = TritonSettings(),
                            input_shapes: dict[str, list[int]] | None = None, external_data: bool = False) -> StagedModel:
    """Stage, validate and commit one model into a Triton repository; returns the committed StagedModel record."""
    staged = stage_triton_model(model, repo, name, version, settings, input_shapes, external_data)
    staged.commit()
    return staged


def uses_external_data(path: Path) -> bool:
    """Whether the model file keeps weights in an external data file."""
    header = onnx.load(str(path), load_external_data=False)
    return any(init.data_location == onnx.TensorProto.EXTERNAL for init in header.graph.initializer)


def _write_model(model: onnx.ModelProto, version_dir: Path, external_data: bool) -> Path:
    """model.onnx, or model.onnx/ with model.onnx and model.onnx.data (external data asked for, or a model over the
    protobuf size limit)."""
    if external_data or model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        folder = version_dir / "model.onnx"
        folder.mkdir()
        path = folder / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data")
        return path
    path = version_dir / "model.onnx"
    onnx.save_model(model, str(path))
    return path


def load_and_run(model_path: Path, config, input_shapes: dict[str, list[int]] | None) -> dict[str, list[int]]:
    """Load the written model with ONNX Runtime (CPU) and run it at the config's shapes (the full batch when batched);
    check that every output has the config's type and dims. Returns the input shapes it ran."""
    from compressor.deploy.triton_config import model_config_module, model_dims
    from compressor.runtime.sessions import cpu_session

    pb2 = model_config_module()
    try:
        session = cpu_session(str(model_path))
    except CompressorError as exc:
        raise CompressorError(f"the model written to the repository does not load: {exc}") from exc
    batch = [config.max_batch_size] if config.max_batch_size > 0 else []
    rng = np.random.default_rng(0)
    feeds, shapes = {}, {}
    for tensor in config.input:
        wanted = (input_shapes or {}).get(tensor.name)
        dims = [d if d > 0 else (wanted[len(batch) + i] if wanted else 1) for i, d in enumerate(model_dims(tensor))]
        shape = batch + dims
        dtype = np.dtype(NUMPY_TYPES.get(pb2.DataType.Name(tensor.data_type), "float32"))
        feeds[tensor.name] = (rng.standard_normal(shape) if dtype.kind == "f" else np.zeros(shape)).astype(dtype)
        shapes[tensor.name] = shape
    try:
        values = session.run([t.name for t in config.output], feeds)
    except Exception as exc:  # noqa: BLE001
        first = first_line(exc)
        raise CompressorError(f"the repository model does not run at the config's shapes {shapes}: {first}") from exc
    for tensor, value in zip(config.output, values):
        expected_type = NUMPY_TYPES.get(pb2.DataType.Name(tensor.data_type))
        got = list(value.shape)
        dims = batch + model_dims(tensor)
        dims_ok = len(got) == len(dims) and all(d < 0 or d == g for d, g in zip(dims, got))
        if not dims_ok or (expected_type and value.dtype != np.dtype(expected_type)):
            raise CompressorError(f"output '{tensor.name}' came back {value.dtype}{got}, the config says "
                                  f"{pb2.DataType.Name(tensor.data_type)}{dims}")
    return shapes

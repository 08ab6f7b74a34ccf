"""Triton `config.pbtxt` for an ONNX model, built and checked with Triton's own ModelConfig protobuf.

The message class comes from `tritonclient` (`tritonclient.grpc.model_config_pb2`). That module is generated
protobuf code and needs only `protobuf`, but the `tritonclient.grpc` package imports grpcio first; without the
`[grpc]` extra (whose protobuf pin would downgrade the protobuf that onnx uses) the generated file is loaded
directly from the installed package.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import onnx

from compressor.errors import CompressorError
from compressor.runtime.inputs import graph_inputs

PLATFORM = "onnxruntime_onnx"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")
TRITON_TYPES = {
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32", onnx.TensorProto.UINT64: "TYPE_UINT64", onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.STRING: "TYPE_STRING", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
}
DEFAULT_MAX_BATCH = 8  # for models with a dynamic first axis; fixed-batch models get 0 (no batching)


@dataclass(frozen=True)
class TritonSettings:
    """What the config says besides the model's tensors."""

    max_batch_size: int | None = None  # None: DEFAULT_MAX_BATCH with a dynamic first axis, else 0
    dynamic_batching: bool = False
    instances: int = 1
    kind: str = "gpu"  # gpu or cpu
    trt_fp16: bool = False  # ONNX Runtime's TensorRT accelerator with precision_mode FP16


def model_config_module():
    """tritonclient's generated `model_config_pb2` module (see the module docstring for why it may be loaded by path)."""
    try:
        from tritonclient.grpc import model_config_pb2

        return model_config_pb2
    except (ImportError, RuntimeError):
        pass
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise CompressorError("Triton repositories need tritonclient (pip install 'compressor[triton]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        raise CompressorError(f"tritonclient has no grpc/model_config_pb2.py at {path.parent}")
    loaded = importlib.util.spec_from_file_location("tritonclient_model_config_pb2", path)
    module = importlib.util.module_from_spec(loaded)
    try:
        loaded.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - protobuf's runtime version check raises its own type
        raise CompressorError(f"tritonclient's model_config_pb2 does not load with this protobuf: {exc}") from exc
    return module


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    """Declared dims, -1 for dynamic ones."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in value.type.tensor_type.shape.dim]


def tensor_entries(proto: onnx.ModelProto, batched: bool) -> dict[str, list[tuple[str, str, list[int]]]]:
    """(name, Triton type, dims) of every fed input and every output; the batch axis is left out when `batched`."""
    entries: dict[str, list[tuple[str, str, list[int]]]] = {"input": [], "output": []}
    for kind, values in (("input", graph_inputs(proto)), ("output", list(proto.graph.output))):
        for value in values:
            elem = value.type.tensor_type.elem_type
            if elem not in TRITON_TYPES:
                raise CompressorError(f"{kind} '{value.name}' has an element type Triton cannot serve ({elem})")
            dims = _dims(value)
            if batched:
                if not dims or dims[0] != -1:
                    first = dims[0] if dims else "none (a scalar)"
                    raise CompressorError(
                        f"{kind} '{value.name}' has a fixed batch dimension of {first}: max_batch_size > 0 needs a "
                        "dynamic first axis (re-export with a dynamic batch axis, or use --max-batch-size 0)")
                dims = dims[1:]
            entries[kind].append((value.name, TRITON_TYPES[elem], dims))
    return entries


def has_dynamic_batch(proto: onnx.ModelProto) -> bool:
    """True when every fed input and output has a dynamic first axis."""
    values = graph_inputs(proto) + list(proto.graph.output)
    return all(_dims(v)[:1] == [-1] for v in values)


def resolve_max_batch(proto: onnx.ModelProto, settings: TritonSettings) -> int:
    """The max_batch_size the config gets (explicit, else the default for the model's batch axis)."""
    if settings.max_batch_size is not None:
        if settings.max_batch_size < 0:
            raise CompressorError(f"--max-batch-size cannot be negative (got {settings.max_batch_size})")
        return settings.max_batch_size
    return DEFAULT_MAX_BATCH if has_dynamic_batch(proto) else 0


def build_config_text(proto: onnx.ModelProto, name: str, settings: TritonSettings) -> str:
    """The config.pbtxt text for `proto` served as `name`."""
    from google.protobuf import text_format

    if not NAME_PATTERN.match(name):
        raise CompressorError(f"bad Triton model name '{name}': use letters, digits, '_', '-' and '.'")
    if settings.kind not in ("gpu", "cpu"):
        raise CompressorError(f"--kind must be gpu or cpu (got '{settings.kind}')")
    if settings.instances < 1:
        raise CompressorError(f"--instances must be at least 1 (got {settings.instances})")
    if settings.trt_fp16 and settings.kind != "gpu":
        raise CompressorError("--trt-fp16 needs --kind gpu (TensorRT runs on the GPU)")
    max_batch = resolve_max_batch(proto, settings)
    if settings.dynamic_batching and max_batch == 0:
        raise CompressorError("--dynamic-batching needs --max-batch-size > 0 (and a model with a dynamic batch axis)")
    pb2 = model_config_module()
    config = pb2.ModelConfig(name=name, platform=PLATFORM, max_batch_size=max_batch)
    entries = tensor_entries(proto, max_batch > 0)
    for kind, written in (("input", config.input), ("output", config.output)):
        for tensor_name, dtype, dims in entries[kind]:
            tensor = written.add(name=tensor_name, data_type=pb2.DataType.Value(dtype), dims=dims or [1])
            if not dims:  # a scalar per sample: Triton needs dims, the reshape tells it the model's shape
                tensor.reshape.SetInParent()
    kind = pb2.ModelInstanceGroup.Kind.Value("KIND_GPU" if settings.kind == "gpu" else "KIND_CPU")
    config.instance_group.add(count=settings.instances, kind=kind)
    if settings.dynamic_batching:
        config.dynamic_batching.SetInParent()
    if settings.trt_fp16:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters["precision_mode"] = "FP16"
    return text_format.MessageToString(config)


def model_dims(tensor) -> list[int]:
    """The dims the model sees for a config input/output (its reshape when it has one)."""
    return list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)


def validate_config_text(text: str, folder_name: str, proto: onnx.ModelProto):
    """Parse config.pbtxt with Triton's protobuf and check it against the folder and the model; returns the message."""
    from google.protobuf import text_format

    pb2 = model_config_module()
    config = pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise CompressorError(f"config.pbtxt does not parse as a Triton ModelConfig: {exc}") from exc
    if config.name != folder_name:
        raise CompressorError(f"config name '{config.name}' differs from its folder '{folder_name}'")
    if config.platform != PLATFORM:
        raise CompressorError(f"config platform '{config.platform}' is not {PLATFORM}")
    expected = tensor_entries(proto, config.max_batch_size > 0)
    for kind, written in (("input", config.input), ("output", config.output)):
        got = [(t.name, pb2.DataType.Name(t.data_type), model_dims(t)) for t in written]
        if got != expected[kind]:
            raise CompressorError(f"config {kind}s {got} do not match the model's {expected[kind]}")
    return config

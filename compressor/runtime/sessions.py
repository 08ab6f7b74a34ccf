"""The one place ONNX Runtime sessions are created: CPU sessions for verification and shape probing, and the timed
sessions of `compress bench` and latency profiling (`SessionRunner`, IOBinding on GPU targets)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx

from compressor.errors import CompressorError, first_line
from compressor.runtime.inputs import InputSpec, make_inputs
from compressor.runtime.targets import IO_DEVICE, Target, check_provider_available

BUILT_MODEL_OPSET = 17  # the opset of the small models this package builds to time things (primer, overhead)


def built_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    """A model around a graph this package built for timing (opset 17, IR version 8)."""
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", BUILT_MODEL_OPSET)], ir_version=8)


def session_options_dict(target: Target, cuda_graph: bool = False) -> dict[str, Any]:
    """The session and provider options a target's sessions use, as recorded in every report."""
    options: dict[str, Any] = {
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "execution_mode": "ORT_SEQUENTIAL",
        "inter_op_num_threads": 1,
        "intra_op_num_threads": target.threads if target.kind == "cpu" else 0,
        "providers": [[name, opts] for name, opts in execution_providers(target, cuda_graph)],
    }
    if target.on_gpu:
        options["io_binding"] = "inputs and outputs preallocated on the device"
    return options


def execution_providers(target: Target, cuda_graph: bool = False) -> list[tuple[str, dict[str, str]]]:
    """The provider list (with options) for an ONNX Runtime session on `target`."""
    if target.kind == "cpu":
        return [("CPUExecutionProvider", {})]
    cuda = {
        "device_id": str(target.device_id),
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "enable_cuda_graph": "1" if cuda_graph else "0",
    }
    if target.kind == "tensorrt":
        trt = {"device_id": str(target.device_id), "trt_cuda_graph_enable": "1" if cuda_graph else "0",
               **dict(target.options)}
        return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", cuda)]
    return [("CUDAExecutionProvider", {**cuda, **dict(target.options)})]


def preload_cuda_libraries() -> None:
    """Let onnxruntime load CUDA/cuDNN from the pip packages (e.g. those PyTorch brought), where it can."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - best effort; session creation reports what is really missing
            pass


def onnxruntime_module() -> Any:
    """The onnxruntime module; a CompressorError that says what to install when it is missing."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise CompressorError(
            "onnxruntime is not installed: pip install 'compressor[cpu]' (or '[gpu]' for onnxruntime-gpu)"
        ) from exc
    return onnxruntime


def new_session(model: str | bytes, options: Any, providers: list) -> Any:
    """The one place an ONNX Runtime InferenceSession is created (a path or serialized model)."""
    return onnxruntime_module().InferenceSession(model, sess_options=options, providers=providers)


def cpu_session(proto: onnx.ModelProto | str, threads: int = 0, optimization: str = "basic",
                spinning: bool = True) -> Any:
    """A CPU session for an in-memory model or a model file (verification, shape probing, load-back checks);
    `optimization` is ORT's graph optimization level: "disable", "basic" or "all"; spinning=False: idle threads
    sleep instead of spinning (many short runs on a busy machine, as calibration does)."""
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options.graph_optimization_level = levels[optimization]
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        model = proto if isinstance(proto, str) else proto.SerializeToString()
        return new_session(model, options, ["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise CompressorError(f"ONNX Runtime cannot load the model: {first_line(exc)}") from exc


def benchmark_session_options(target: Target, shares_cores: bool = False) -> Any:
    """The SessionOptions of every timed session (`compress bench`, latency profiling): all optimizations,
    sequential execution, one inter-op thread and the CPU target's intra-op threads. shares_cores: the session's
    threads are pinned to the same cores as other live sessions (interleaved pinned timing), so they stop spinning as
    soon as a run returns instead of spinning on into the next model's runs."""
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if target.kind == "cpu":
        options.intra_op_num_threads = int(target.threads or 1)
        if shares_cores:
            options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3
    return options


_ORT_TYPES = {"float": "float32", "float16": "float16", "double": "float64", "bfloat16": None, "bool": "bool"}


def numpy_dtype(ort_type: str) -> np.dtype:
    """numpy dtype of an ONNX Runtime type string such as 'tensor(float)' or 'tensor(int64)'."""
    inner = ort_type[len("tensor("):-1] if ort_type.startswith("tensor(") else ort_type
    name = _ORT_TYPES.get(inner, inner)
    if name is None:
        raise CompressorError(f"outputs of type {ort_type} cannot be bound for benchmarking")
    return np.dtype(name)


class SessionRunner:
    """One ONNX Runtime session of one model on one target with fixed inputs, ready to be timed.

    GPU targets bind inputs and preallocated outputs on the device, so a timed run moves no data over PCIe and
    (with `cuda_graph`) keeps the fixed addresses a CUDA graph needs. Raises a CompressorError when the session
    runs on another provider than the target's (ONNX Runtime falls back to CPU silently).
    """

    def __init__(self, model: str | bytes, target: Target, specs: list[InputSpec], seed: int = 0, cuda_graph: bool = False,
                 shares_cores: bool = False):
        check_provider_available(target)
        if target.on_gpu:
            preload_cuda_libraries()
        self.target = target
        start = time.perf_counter()
        try:
            self.session = new_session(model, benchmark_session_options(target, shares_cores),
                                       execution_providers(target, cuda_graph))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise CompressorError(f"target {target}: onnxruntime cannot create a session: {first_line(exc)}") from exc
        self.create_s = time.perf_counter() - start
        self.provider = self.session.get_providers()[0]
        if self.provider != target.provider:
            raise CompressorError(
                f"target {target}: the session fell back to {self.provider} instead of {target.provider}; "
                "no figure is reported for it (check the CUDA/cuDNN libraries and the device)"
            )
        self.feeds = make_inputs(specs, seed)
        device = IO_DEVICE.get(target.kind)
        start = time.perf_counter()
        self.binding = self._bind_on_device(device, target.device_id, model, cuda_graph) if device else None
        if self.binding is None:
            self.run_once()
        self.first_run_s = time.perf_counter() - start  # allocations, and cuDNN's algorithm search on GPU targets

    def _bind_on_device(self, device: str, device_id: int, model: str | bytes, cuda_graph: bool) -> Any:
        import onnxruntime as ort

        # The OrtValues must outlive the binding: the session reads and writes their device memory.
        self._device_inputs = {name: ort.OrtValue.ortvalue_from_numpy(x, device, device_id) for name, x in self.feeds.items()}
        output_names = [out.name for out in self.session.get_outputs()]

        def with_inputs(session: Any) -> Any:
            binding = session.io_binding()
            for name, value in self._device_inputs.items():
                binding.bind_ortvalue_input(name, value)
            return binding

        # One regular run learns the output shapes. A CUDA graph records the buffers of the runs it is made from, so
        # a graph session must write into the preallocated outputs from its very first run: a plain session learns.
        learner = (new_session(model, benchmark_session_options(self.target), execution_providers(self.target))
                   if cuda_graph else self.session)
        probe = with_inputs(learner)
        for name in output_names:
            probe.bind_output(name, device, device_id)
        learner.run_with_iobinding(probe)
        self._device_outputs = {
            name: ort.OrtValue.ortvalue_from_shape_and_type(value.shape(), numpy_dtype(value.data_type()), device, device_id)
            for name, value in zip(output_names, probe.get_outputs())
        }
        binding = with_inputs(self.session)
        for name, value in self._device_outputs.items():
            binding.bind_ortvalue_output(name, value)
        return binding

    def run_once(self) -> None:
        """One inference; returns when the results are complete (on the device for GPU targets)."""
        if self.binding is None:
            self.session.run(None, self.feeds)
        else:
            self.session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()

    def outputs(self) -> list[np.ndarray]:
        """The outputs of one inference on the runner's inputs (`self.feeds`), copied to the host."""
        if self.binding is None:
            return self.session.run(None, self.feeds)
        self.run_once()
        return [np.asarray(value) for value in self.binding.copy_outputs_to_cpu()]

    def time_runs(self, count: int) -> list[float]:
        """Wall-clock milliseconds of `count` consecutive inferences."""
        samples = []
        for _ in range(count):
            start = time.perf_counter_ns()
            self.run_once()
            samples.append((time.perf_counter_ns() - start) / 1e6)
        return samples

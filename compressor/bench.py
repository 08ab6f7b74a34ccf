"""Latency and memory of ONNX models under ONNX Runtime: the measuring half of `compress bench`.

A session is one model on one target at one batch size. GPU sessions (cuda, tensorrt) run in this process with
inputs and outputs resident on the device (IOBinding); CPU sessions run in a fresh child process
(`python -m compressor.bench --worker`) so that the child's peak RSS belongs to that one model.
`run_benchmark` opens the sessions of all models for one target and batch, then times them in interleaved rounds
(A B A B ...) so that drift (clocks, heat, other tenants) hits every model alike.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import onnx

from compressor.bench_report import BenchReport, Measurement, ModelInfo, capture_environment
from compressor.errors import CompressorError

ModelRef = Union[str, os.PathLike, onnx.ModelProto]
ProgressFn = Callable[[int, int, str], None]  # (done, total, what is running now)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
# Where IOBinding keeps inputs and outputs; CPU sessions take numpy feeds, as a deployed CPU service would.
IO_DEVICE = {"cuda": "cuda", "tensorrt": "cuda"}

_TARGET_PATTERN = re.compile(r"^(cpu|cuda|tensorrt)(?::(\d+))?$")


@dataclass(frozen=True)
class Target:
    """Where a model runs: `kind` cpu|cuda|tensorrt, the GPU `device_id`, or the CPU intra-op `threads`."""

    kind: str
    device_id: int = 0
    threads: int | None = None

    @property
    def label(self) -> str:
        """Canonical spelling, e.g. cuda:0, cpu:4, tensorrt:0."""
        return f"cpu:{self.threads}" if self.kind == "cpu" else f"{self.kind}:{self.device_id}"

    @property
    def provider(self) -> str:
        """The ONNX Runtime execution provider that must run the model's nodes."""
        return PROVIDERS[self.kind]

    @property
    def on_gpu(self) -> bool:
        """True for cuda and tensorrt targets."""
        return self.kind != "cpu"

    def __str__(self) -> str:
        return self.label


def parse_target(text: str) -> Target:
    """Parse `cuda`, `cuda:N`, `cpu:T` (T >= 1 intra-op threads), `tensorrt` or `tensorrt:N` into a Target."""
    spelled = str(text).strip().lower()
    match = _TARGET_PATTERN.match(spelled)
    if not match:
        raise CompressorError(f"bad target '{text}': use cuda, cuda:N, cpu:T (T threads, e.g. cpu:1) or tensorrt")
    kind, number = match.group(1), match.group(2)
    if kind == "cpu":
        if number is None or int(number) < 1:
            raise CompressorError(f"bad target '{text}': a CPU target needs a thread count of at least 1, e.g. cpu:1 or cpu:4")
        return Target("cpu", threads=int(number))
    return Target(kind, device_id=int(number or 0))


def default_targets() -> list[Target]:
    """[cuda:0] when this onnxruntime has the CUDA provider, else [cpu:1]."""
    import onnxruntime as ort

    return [Target("cuda")] if PROVIDERS["cuda"] in ort.get_available_providers() else [Target("cpu", threads=1)]


# ---------------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputSpec:
    """One concrete model input: name, shape and numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def read_graph_inputs(model: ModelRef) -> list[onnx.ValueInfoProto]:
    """The fed inputs of a model path or proto, without loading external weights; CompressorError when unreadable."""
    if isinstance(model, onnx.ModelProto):
        return graph_inputs(model)
    path = Path(model)
    if not path.is_file():
        raise CompressorError(f"model file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise many types for a bad file
        raise CompressorError(f"cannot read ONNX model {path}: {str(exc).strip()[:200] or type(exc).__name__}") from exc
    if not proto.graph.node:
        raise CompressorError(f"{path} is not an ONNX model (no graph nodes)")
    return graph_inputs(proto)


def input_specs(model: onnx.ModelProto, batch: int | None, input_shapes: dict[str, list[int]] | None = None) -> list[InputSpec]:
    """Concrete shapes for the model's inputs: a dynamic first dim takes `batch` (1 when None), other dynamic dims
    take the value in `input_shapes[name]` or 1. A fixed first dim that differs from `batch` is an error."""
    return _specs_from_inputs(graph_inputs(model), batch, input_shapes)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds (graph inputs that are not initializers)."""
    initializers = {init.name for init in model.graph.initializer}
    return [onnx.ValueInfoProto.FromString(inp.SerializeToString()) for inp in model.graph.input if inp.name not in initializers]


def _specs_from_inputs(inputs: list[onnx.ValueInfoProto], batch: int | None, input_shapes: dict | None) -> list[InputSpec]:
    given = dict(input_shapes or {})
    if "" in given and len(inputs) == 1:  # a bare 1x3x224x224 names the only input
        given[inputs[0].name] = given.pop("")
    unknown = set(given) - {inp.name for inp in inputs}
    if unknown:
        names = ", ".join(inp.name for inp in inputs)
        raise CompressorError(f"--input-shape names unknown input(s) {', '.join(sorted(unknown))} (model inputs: {names})")
    specs = []
    for inp in inputs:
        tensor_type = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
        wanted = given.get(inp.name)
        if wanted is not None and len(wanted) != len(dims):
            raise CompressorError(f"input '{inp.name}' has rank {len(dims)}, --input-shape gives {len(wanted)} dims")
        shape = []
        for axis, dim in enumerate(dims):
            if axis == 0:
                if dim is not None and batch is not None and dim != batch:
                    raise CompressorError(f"input '{inp.name}' has a fixed batch size of {dim}; cannot run batch {batch}")
                shape.append(dim or batch or 1)
            elif dim is not None:
                if wanted is not None and wanted[axis] != dim:
                    raise CompressorError(
                        f"input '{inp.name}' has a fixed dim {axis} of {dim}, --input-shape gives {wanted[axis]}")
                shape.append(dim)
            else:
                shape.append(int(wanted[axis]) if wanted is not None else 1)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        specs.append(InputSpec(inp.name, tuple(shape), dtype))
    return specs


def make_inputs(specs: list[InputSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs: standard normal for floats, small non-negative integers, random booleans."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.random(spec.shape) < 0.5
        else:
            feeds[spec.name] = rng.integers(0, 8, size=spec.shape).astype(dtype)
    return feeds


# -------------------------------------------------------------------------------------------------------- sessions
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
        trt = {"device_id": str(target.device_id), "trt_cuda_graph_enable": "1" if cuda_graph else "0"}
        return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", cuda)]
    return [("CUDAExecutionProvider", cuda)]


def check_provider_available(target: Target) -> None:
    """Raise a CompressorError when this onnxruntime build lacks the provider the target needs."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if target.provider not in available:
        hint = " (install onnxruntime-gpu instead of onnxruntime)" if target.on_gpu else ""
        raise CompressorError(
            f"target {target}: {target.provider} is not available in onnxruntime {ort.__version__}{hint}; "
            f"available: {', '.join(available)}"
        )


def checked_targets(texts: list[str]) -> list[Target]:
    """Parse target strings and check this onnxruntime build can run each one (before any work starts)."""
    targets = [parse_target(t) for t in texts]
    for target in targets:
        check_provider_available(target)
    return targets


def preload_cuda_libraries() -> None:
    """Let onnxruntime load CUDA/cuDNN from the pip packages (e.g. those PyTorch brought), where it can."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - best effort; session creation reports what is really missing
            pass


def _new_session(model: str | bytes, options: Any, providers: list) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(model, sess_options=options, providers=providers)


def _ort_session_options(target: Target) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if target.kind == "cpu":
        options.intra_op_num_threads = int(target.threads or 1)
    options.log_severity_level = 3
    return options


_ORT_TYPES = {"float": "float32", "float16": "float16", "double": "float64", "bfloat16": None, "bool": "bool"}


def _numpy_dtype(ort_type: str) -> np.dtype:
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

    def __init__(self, model: str | bytes, target: Target, specs: list[InputSpec], seed: int = 0, cuda_graph: bool = False):
        check_provider_available(target)
        if target.on_gpu:
            preload_cuda_libraries()
        self.target = target
        start = time.perf_counter()
        try:
            self.session = _new_session(model, _ort_session_options(target), execution_providers(target, cuda_graph))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CompressorError(f"target {target}: onnxruntime cannot create a session: {first_line}") from exc
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
        self.binding = self._bind_on_device(device, target.device_id) if device else None
        if self.binding is None:
            self.run_once()
        self.first_run_s = time.perf_counter() - start  # allocations, and cuDNN's algorithm search on GPU targets

    def _bind_on_device(self, device: str, device_id: int) -> Any:
        import onnxruntime as ort

        binding = self.session.io_binding()
        # The OrtValues must outlive the binding: the session reads and writes their device memory.
        self._device_inputs = {name: ort.OrtValue.ortvalue_from_numpy(x, device, device_id) for name, x in self.feeds.items()}
        for name, value in self._device_inputs.items():
            binding.bind_ortvalue_input(name, value)
        output_names = [out.name for out in self.session.get_outputs()]
        for name in output_names:
            binding.bind_output(name, device, device_id)
        self.session.run_with_iobinding(binding)  # one regular run learns the output shapes (before any graph capture)
        learned = binding.get_outputs()
        self._device_outputs = {
            name: ort.OrtValue.ortvalue_from_shape_and_type(value.shape(), _numpy_dtype(value.data_type()), device, device_id)
            for name, value in zip(output_names, learned)
        }
        binding.clear_binding_outputs()
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

    def time_runs(self, count: int) -> list[float]:
        """Wall-clock milliseconds of `count` consecutive inferences."""
        samples = []
        for _ in range(count):
            start = time.perf_counter_ns()
            self.run_once()
            samples.append((time.perf_counter_ns() - start) / 1e6)
        return samples


# ----------------------------------------------------------------------------------------- memory and cpu probes
def nvml_device(device_id: int) -> Any:
    """The NVML handle of CUDA device `device_id` (honouring CUDA_VISIBLE_DEVICES), or None without pynvml/NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if visible and device_id < len(visible):
            entry = visible[device_id]
            if entry.isdigit():
                return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
            return pynvml.nvmlDeviceGetHandleByUUID(entry)
        return pynvml.nvmlDeviceGetHandleByIndex(device_id)
    except Exception:  # noqa: BLE001 - no NVML library, no driver, or an unknown device: the caller falls back
        return None


def _load_cudart() -> Any:
    import ctypes

    candidates = []
    try:  # prefer the libcudart that onnxruntime already loaded
        with open("/proc/self/maps") as maps:
            candidates += [line.split()[-1] for line in maps if "libcudart.so" in line.rsplit("/", 1)[-1]]
    except OSError:
        pass
    candidates += ["libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"]
    for name in dict.fromkeys(candidates):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


class GpuMemoryProbe:
    """Device memory in use on one GPU, read through NVML (nvidia-ml-py) or else cudaMemGetInfo (libcudart, ctypes).

    `source` says which ("nvml", "cudaMemGetInfo") or is None when neither is there; used_bytes() then gives None.
    """

    def __init__(self, device_id: int):
        self.device_id = device_id
        self.source: str | None = None
        self._handle = nvml_device(device_id)
        self._cudart = None
        if self._handle is not None:
            self.source = "nvml"
        else:
            self._cudart = _load_cudart()
            if self._cudart is not None and self._cudart_used() is not None:
                self.source = "cudaMemGetInfo"

    def _cudart_used(self) -> int | None:
        import ctypes

        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if self._cudart.cudaSetDevice(ctypes.c_int(self.device_id)) != 0:
            return None
        if self._cudart.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
            return None
        return int(total.value - free.value)

    def used_bytes(self) -> int | None:
        """Bytes in use on the device now (all processes for NVML; this process's view for cudaMemGetInfo)."""
        if self.source == "nvml":
            import pynvml

            return int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        if self.source == "cudaMemGetInfo":
            return self._cudart_used()
        return None


def _primer_model() -> onnx.ModelProto:
    """A tiny Conv-Gemm network whose session brings up the CUDA context, cuDNN and cuBLAS."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w", (4, 3, 3, 3)), ("fc", (4, 2)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"])]
    graph = helper.make_graph(nodes, "primer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def primed_gpu_probe(target: Target) -> GpuMemoryProbe:
    """Open a tiny session on a GPU target first, so that the CUDA context and libraries exist before any model is
    measured (the first model is not charged for them), and return a memory probe for that device."""
    primer = _primer_model()
    runner = SessionRunner(primer.SerializeToString(), target, input_specs(primer, 1))
    runner.time_runs(2)
    probe = GpuMemoryProbe(target.device_id)
    probe.primer = runner  # kept alive while the probe is in use
    return probe


def current_rss_bytes() -> int | None:
    """Resident set size of this process now, or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return None


def peak_rss_bytes() -> tuple[int | None, str | None]:
    """Peak resident set size of this process so far and how it was read (VmHWM, getrusage, psutil).

    Linux's VmHWM belongs to this program's own address space; getrusage's ru_maxrss can carry over the parent's
    size at fork, so it only serves where /proc is missing.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024), "getrusage"
    except ImportError:
        pass
    try:
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss)), "psutil"
    except ImportError:
        return None, None


def _one_cpu_per_core(cpus: list[int]) -> list[int]:
    """The first logical CPU of each physical core among `cpus` (hyperthread siblings dropped), in order."""
    seen, chosen = set(), []
    for cpu in cpus:
        try:
            topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            core = ((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip())
        except OSError:
            return cpus
        if core not in seen:
            seen.add(core)
            chosen.append(cpu)
    return chosen


def pin_to_cores(threads: int) -> list[int] | None:
    """Pin this process to `threads` CPUs, one per physical core where possible; None where the OS cannot."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    chosen = _one_cpu_per_core(allowed)[:threads]
    if len(chosen) < threads:
        chosen = allowed[:threads]
    os.sched_setaffinity(0, chosen)
    return chosen


# ------------------------------------------------------------------------------------------------ session handles
@dataclass
class _Opened:
    """What every session handle reports once created and warmed up."""

    create_s: float
    first_run_s: float
    provider: str
    memory: dict[str, Any] = field(default_factory=dict)
    pinned_cores: list[int] | None = None


class _LocalSession:
    """A session in this process. For GPU targets it reads device memory before creation and after warm-up, so the
    sessions of a cell must be opened one after another (the others idle)."""

    def __init__(self, model: str | bytes, target: Target, specs: list[InputSpec], seed: int, cuda_graph: bool,
                 warmup: int, gpu_probe: GpuMemoryProbe | None):
        read = gpu_probe.used_bytes if gpu_probe is not None else (lambda: None) if target.on_gpu else current_rss_bytes
        used_before = read()
        self.runner = SessionRunner(model, target, specs, seed=seed, cuda_graph=cuda_graph)
        self.runner.time_runs(warmup)
        used_after = read()
        added = _mb(None if used_after is None or used_before is None else used_after - used_before)
        if target.on_gpu:
            self.memory = {"kind": "gpu", "source": gpu_probe.source if gpu_probe else None, "added_mb": added, "peak_mb": None}
        else:
            self.memory = {"kind": "cpu-rss-in-process", "source": "rss delta", "added_mb": added, "peak_mb": None}
        self.opened = _Opened(self.runner.create_s, self.runner.first_run_s, self.runner.provider)

    def time_runs(self, count: int) -> list[float]:
        return self.runner.time_runs(count)

    def finish(self) -> dict[str, Any]:
        """Memory figures: what the session added by the end of its warm-up."""
        return dict(self.memory)

    def close(self) -> None:
        self.runner = None


class _ChildSession:
    """A session in a fresh `python -m compressor.bench --worker` process, driven over JSON lines."""

    def __init__(self, model_path: str, target: Target, specs: list[InputSpec], seed: int, cuda_graph: bool,
                 warmup: int, pin: bool):
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "compressor.bench", "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, env=env, text=True, bufsize=1,
        )
        request = {"model": model_path, "target": target.label, "specs": [[s.name, list(s.shape), s.dtype] for s in specs],
                   "seed": seed, "cuda_graph": cuda_graph, "warmup": warmup, "pin": pin}
        reply = self._ask(request)
        self.opened = _Opened(reply["create_s"], reply["first_run_s"], reply["provider"], pinned_cores=reply.get("pinned_cores"))
        self._rss_before = reply.get("rss_before")

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.close()
            self._stderr.seek(0)
            tail = " | ".join(self._stderr.read().strip().splitlines()[-3:])
            raise CompressorError(f"benchmark worker died: {tail or 'no message'}")
        reply = json.loads(line)
        if not reply.get("ok"):
            self.close()
            raise CompressorError(reply.get("error", "benchmark worker failed"))
        return reply

    def time_runs(self, count: int) -> list[float]:
        return self._ask({"op": "run", "count": count})["ms"]

    def finish(self) -> dict[str, Any]:
        reply = self._ask({"op": "memory"})
        peak, before = reply.get("peak_rss"), self._rss_before
        added = None if peak is None or before is None else peak - before
        return {"kind": "cpu-rss", "source": reply.get("source"), "peak_mb": _mb(peak), "added_mb": _mb(added)}

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._stderr.close()


def _mb(value: float | None) -> float | None:
    return None if value is None else value / 2**20


def _worker_main() -> None:
    """Child side of _ChildSession: one session, commands on stdin, one JSON reply per line on stdout."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
    sys.stdout = sys.stderr

    def reply(**fields: Any) -> None:
        protocol.write(json.dumps(fields) + "\n")

    try:
        request = json.loads(sys.stdin.readline())
        pinned = pin_to_cores(parse_target(request["target"]).threads or 1) if request["pin"] else None
        rss_before = current_rss_bytes()
        specs = [InputSpec(name, tuple(shape), dtype) for name, shape, dtype in request["specs"]]
        runner = SessionRunner(request["model"], parse_target(request["target"]), specs, seed=request["seed"],
                               cuda_graph=request["cuda_graph"])
        runner.time_runs(request["warmup"])
        reply(ok=True, create_s=runner.create_s, first_run_s=runner.first_run_s, provider=runner.provider,
              rss_before=rss_before, pinned_cores=pinned)
        for line in sys.stdin:
            command = json.loads(line)
            if command["op"] == "run":
                reply(ok=True, ms=runner.time_runs(int(command["count"])))
            elif command["op"] == "memory":
                peak, source = peak_rss_bytes()
                reply(ok=True, peak_rss=peak, source=source)
            else:
                break
    except CompressorError as exc:
        reply(ok=False, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - the parent turns this into one line
        reply(ok=False, error=f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------------------------- measuring
@dataclass
class _Job:
    """One model prepared for benchmarking."""

    index: int
    info: ModelInfo
    inputs: list[onnx.ValueInfoProto]
    source: str  # the path a session loads


_COST_CACHE: dict[tuple, tuple[int | None, int | None]] = {}


def _model_cost(model: ModelRef, specs: list[InputSpec]) -> tuple[int | None, int | None]:
    """MACs and params per image from compressor.cost, or (None, None) where it cannot tell; cached per file."""
    shapes = {spec.name: list(spec.shape) for spec in specs}
    key = None
    if not isinstance(model, onnx.ModelProto):
        stat = os.stat(model)
        key = (os.path.realpath(model), stat.st_mtime_ns, stat.st_size, json.dumps(shapes, sort_keys=True))
        if key in _COST_CACHE:
            return _COST_CACHE[key]
    try:
        from compressor.cost import model_cost

        cost = model_cost(model, shapes)
        result = (int(cost.macs), int(cost.params))
    except Exception:  # noqa: BLE001 - MACs are a column of the report, never a reason to refuse measuring
        result = (None, None)
    if key is not None:
        _COST_CACHE[key] = result
    return result


def _prepare_jobs(models: list[ModelRef], names: list[str] | None, input_shapes: dict | None, scratch: str,
                  with_cost: bool) -> list[_Job]:
    names = list(names) if names else _default_names(models)
    if len(names) != len(models):
        raise CompressorError(f"{len(names)} names given for {len(models)} models")
    jobs = []
    for index, (model, name) in enumerate(zip(models, names)):
        inputs = read_graph_inputs(model)
        macs, params = _model_cost(model, _specs_from_inputs(inputs, None, input_shapes)) if with_cost else (None, None)
        if isinstance(model, onnx.ModelProto):
            path = os.path.join(scratch, f"model{index}.onnx")
            onnx.save(model, path)
            file_bytes, shown_path = os.path.getsize(path), None
        else:
            path, file_bytes, shown_path = str(model), os.path.getsize(model), str(model)
        info = ModelInfo(index=index, name=name, path=shown_path, file_bytes=file_bytes, macs=macs, params=params)
        jobs.append(_Job(index, info, inputs, path))
    return jobs


def _default_names(models: list[ModelRef]) -> list[str]:
    names = [Path(m).stem if not isinstance(m, onnx.ModelProto) else (m.graph.name or f"model{i}") for i, m in enumerate(models)]
    duplicated = {n for n in names if names.count(n) > 1}
    return [f"{n}#{i}" if n in duplicated else n for i, n in enumerate(names)]


def _growth_mb(probe: GpuMemoryProbe | None, before: int | None) -> float | None:
    after = probe.used_bytes() if probe is not None else None
    return None if after is None or before is None else _mb(after - before)


def _runs_per_round(runs: int, rounds: int) -> list[int]:
    rounds = max(1, min(rounds, runs))
    return [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]


def _check_counts(warmup: int, runs: int, batches: list[int]) -> None:
    if runs < 1:
        raise CompressorError(f"--runs must be at least 1 (got {runs})")
    if warmup < 0:
        raise CompressorError(f"--warmup cannot be negative (got {warmup})")
    if not batches or min(batches) < 1:
        raise CompressorError(f"batch sizes must be at least 1 (got {batches})")


def _open_session(job: _Job, target: Target, specs: list[InputSpec], *, seed: int, cuda_graph: bool, warmup: int,
                  pin: bool, isolate: bool, gpu_probe: GpuMemoryProbe | None):
    if isolate:
        return _ChildSession(job.source, target, specs, seed, cuda_graph, warmup, pin)
    return _LocalSession(job.source, target, specs, seed, cuda_graph, warmup, gpu_probe)


def _measurement(job: _Job, target: Target, batch: int, specs: list[InputSpec], handle, rounds_ms: list[list[float]],
                 memory: dict[str, Any], warmup: int, cuda_graph: bool) -> Measurement:
    return Measurement(
        model=job.info.name, model_index=job.index, target=target.label, provider=handle.opened.provider, batch=batch,
        input_shapes={s.name: list(s.shape) for s in specs}, warmup=warmup,
        latencies_ms=[ms for chunk in rounds_ms for ms in chunk],
        round_medians_ms=[float(np.median(chunk)) for chunk in rounds_ms], session_create_s=handle.opened.create_s,
        first_run_s=handle.opened.first_run_s,
        memory=memory, file_bytes=job.info.file_bytes, macs=job.info.macs, params=job.info.params,
        cuda_graph=cuda_graph and target.on_gpu, pinned_cores=handle.opened.pinned_cores,
    )


def _bench_cell(jobs: list[_Job], specs_by_job: list[list[InputSpec]], target: Target, batch: int, chunks: list[int],
                open_options: dict[str, Any], schedule: list[dict], advance: Callable[[str], None]) -> list[Measurement]:
    """Open every model's session on one target and batch, time them in interleaved rounds, close them."""
    handles = []
    try:
        for job, specs in zip(jobs, specs_by_job):
            handles.append(_open_session(job, target, specs, **open_options))
            advance(f"{target} batch {batch}: opened {job.info.name}")
        gpu_probe = open_options["gpu_probe"]
        used_before_runs = gpu_probe.used_bytes() if gpu_probe else None
        timed: list[list[list[float]]] = [[] for _ in jobs]
        for round_index, count in enumerate(chunks):
            for job, handle in zip(jobs, handles):
                timed[job.index].append(handle.time_runs(count))
                schedule.append({"target": target.label, "batch": batch, "round": round_index, "model_index": job.index,
                                 "runs": count})
                advance(f"{target} batch {batch}: round {round_index + 1}/{len(chunks)} {job.info.name}")
        growth = _growth_mb(gpu_probe, used_before_runs)
        measurements = []
        for job, specs, handle in zip(jobs, specs_by_job, handles):
            figures = handle.finish()
            if growth is not None:
                figures["cell_growth_during_runs_mb"] = growth  # all sessions of the cell together
            measurements.append(_measurement(job, target, batch, specs, handle, timed[job.index], figures,
                                             open_options["warmup"], open_options["cuda_graph"]))
        return measurements
    finally:
        for handle in handles:
            handle.close()


def measure(model: ModelRef, target: Target | str, batch: int = 1, warmup: int = 10, runs: int = 50, *,
            input_shapes: dict[str, list[int]] | None = None, seed: int = 0, cuda_graph: bool = False, pin: bool = False,
            isolate: bool | None = None, with_cost: bool = True, memory: bool = True) -> Measurement:
    """Measure one session: latency samples and percentiles, throughput, session creation time, memory, MACs.

    `isolate` runs the session in a fresh child process (default: yes for CPU targets, so peak RSS is the model's own;
    pass False for many quick in-process measurements). GPU memory is what the session adds on the device;
    `memory=False` skips the GPU memory probe (and the primer session it needs), `with_cost=False` the MAC count.
    """
    report = run_benchmark([model], [target], [batch], warmup=warmup, runs=runs, rounds=1, input_shapes=input_shapes,
                           seed=seed, cuda_graph=cuda_graph, pin=pin, isolate=isolate, with_cost=with_cost,
                           memory=memory, environment=False)
    return report.measurements[0]


def run_benchmark(models: list[ModelRef], targets: list[Target | str], batches: list[int] = (1,), *, warmup: int = 10,
                  runs: int = 50, rounds: int = 5, input_shapes: dict[str, list[int]] | None = None, seed: int = 0,
                  cuda_graph: bool = False, pin: bool = False, isolate: bool | None = None,
                  names: list[str] | None = None, progress: ProgressFn | None = None, with_cost: bool = True,
                  memory: bool = True, environment: bool = True) -> BenchReport:
    """Benchmark every model on every target at every batch size, interleaving the models round by round.

    For each target and batch, the sessions of all models are opened one after another (each warmed up right away,
    so the memory a session adds is measured while the others are idle), then `runs` timed inferences per model are
    spread over `rounds` rounds in the order A B A B ... Ratios against the first model are in the report.
    """
    if not models:
        raise CompressorError("no models to benchmark")
    parsed = [t if isinstance(t, Target) else parse_target(t) for t in targets]
    if not parsed:
        raise CompressorError("no targets to benchmark on")
    batches = [int(b) for b in batches]
    _check_counts(warmup, runs, batches)
    for target in parsed:
        check_provider_available(target)
    chunks = _runs_per_round(runs, rounds)
    cells = [(t, b) for t in parsed for b in batches]
    total = len(cells) * len(models) * (1 + len(chunks))
    done = 0

    def advance(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, what)

    measurements, schedule = [], []
    with tempfile.TemporaryDirectory(prefix="compressor-bench-") as scratch:
        jobs = _prepare_jobs(list(models), names, input_shapes, scratch, with_cost)
        if progress:
            progress(0, total, "opening sessions")
        for target, batch in cells:
            use_child = (target.kind == "cpu") if isolate is None else isolate
            gpu_probe = primed_gpu_probe(target) if memory and target.on_gpu and not use_child else None
            open_options = {"seed": seed, "cuda_graph": cuda_graph, "warmup": warmup, "pin": pin, "isolate": use_child,
                            "gpu_probe": gpu_probe}
            specs_by_job = [_specs_from_inputs(job.inputs, batch, input_shapes) for job in jobs]
            measurements += _bench_cell(jobs, specs_by_job, target, batch, chunks, open_options, schedule, advance)
    settings = {"warmup": warmup, "runs": runs, "rounds": len(chunks), "seed": seed, "cuda_graph": cuda_graph, "pin": pin,
                "input_shapes": input_shapes or {}, "batches": batches, "targets": [t.label for t in parsed],
                "session_options": {t.label: session_options_dict(t, cuda_graph) for t in parsed}}
    env = capture_environment(parsed) if environment else {}
    return BenchReport(models=[job.info for job in jobs], measurements=measurements, schedule=schedule,
                       settings=settings, environment=env)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker_main()
    else:
        sys.exit("usage: python -m compressor.bench --worker   (internal: one benchmark session per child process)")

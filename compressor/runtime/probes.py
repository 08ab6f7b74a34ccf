"""What the machine is and what a session costs it: NVML/cudart GPU memory, process RSS, CPU pinning, and the
environment recorded with every benchmark (ONNX Runtime build, GPU and CPU models, thread settings)."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compressor.runtime.inputs import input_specs
from compressor.runtime.sessions import SessionRunner, built_model
from compressor.runtime.targets import Target


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


def load_cudart() -> Any:
    """libcudart through ctypes (the copy onnxruntime loaded first), or None."""
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
            self._cudart = load_cudart()
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


def primer_model() -> onnx.ModelProto:
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
    return built_model(graph)


def primed_gpu_probe(target: Target) -> GpuMemoryProbe:
    """Open a tiny session on a GPU target first, so that the CUDA context and libraries exist before any model is
    measured (the first model is not charged for them), and return a memory probe for that device."""
    primer = primer_model()
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


def one_cpu_per_core(cpus: list[int]) -> list[int]:
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
    chosen = one_cpu_per_core(allowed)[:threads]
    if len(chosen) < threads:
        chosen = allowed[:threads]
    os.sched_setaffinity(0, chosen)
    return chosen


def cpu_model() -> str | None:
    """The CPU's model name (from /proc/cpuinfo, else platform.processor()), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def gpu_description(device_id: int) -> dict[str, Any]:
    """Name, driver and memory of CUDA device `device_id` from NVML or nvidia-smi (None values when neither works)."""
    handle = nvml_device(device_id)
    if handle is not None:
        import pynvml

        name = pynvml.nvmlDeviceGetName(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        as_text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731 - older pynvml gives bytes
        return {"name": as_text(name), "driver": as_text(driver), "memory_mb": round(total / 2**20), "source": "nvml"}
    if shutil.which("nvidia-smi"):
        try:
            line = subprocess.run(["nvidia-smi", f"--id={device_id}", "--query-gpu=name,driver_version,memory.total",
                                   "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
            name, driver, memory = [part.strip() for part in line.split(",")][:3]
            return {"name": name, "driver": driver, "memory": memory, "source": "nvidia-smi"}
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return {"name": None, "driver": None, "source": None}


def capture_environment(targets: list[Any]) -> dict[str, Any]:
    """ONNX Runtime version and providers, GPU name and driver for GPU targets, CPU model, cores, thread settings,
    Python, platform and the date (UTC)."""
    import onnxruntime as ort

    env: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "onnxruntime_build": ort.get_build_info() if hasattr(ort, "get_build_info") else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                   "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }
    with contextlib.suppress(ImportError):
        import psutil

        env["physical_cores"] = psutil.cpu_count(logical=False)
        env["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    gpu_ids = sorted({t.device_id for t in targets if t.on_gpu})
    if gpu_ids:
        env["gpus"] = {str(i): gpu_description(i) for i in gpu_ids}
    return env

"""Session handles the benchmark runner drives: a session in this process, or one in a fresh child process
(`python -m compressor.runtime.handles --worker`, JSON lines on stdin/stdout) so that its peak RSS is the model's own.
Both answer time_runs(count), finish() (memory figures) and close()."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from compressor.errors import CompressorError
from compressor.runtime.inputs import InputSpec
from compressor.runtime.probes import GpuMemoryProbe, current_rss_bytes, peak_rss_bytes, pin_to_cores
from compressor.runtime.sessions import SessionRunner
from compressor.runtime.targets import Target, parse_target


class SessionHandle(Protocol):
    """What the benchmark runner drives: a created and warmed-up session (LocalSession or ChildSession)."""

    opened: Opened

    def time_runs(self, count: int) -> list[float]:
        """Wall-clock milliseconds of `count` consecutive inferences."""

    def finish(self) -> dict[str, Any]:
        """The memory figures of the session."""

    def close(self) -> None:
        """Release the session (and its process)."""


@dataclass
class Opened:
    """What every session handle reports once created and warmed up."""

    create_s: float
    first_run_s: float
    provider: str
    memory: dict[str, Any] = field(default_factory=dict)
    pinned_cores: list[int] | None = None


class LocalSession:
    """A session in this process. For GPU targets it reads device memory before creation and after warm-up, so the
    sessions of a cell must be opened one after another (the others idle)."""

    def __init__(self, model: str | bytes, target: Target, specs: list[InputSpec], seed: int, cuda_graph: bool,
                 warmup: int, gpu_probe: GpuMemoryProbe | None):
        read = gpu_probe.used_bytes if gpu_probe is not None else (lambda: None) if target.on_gpu else current_rss_bytes
        used_before = read()
        self.runner = SessionRunner(model, target, specs, seed=seed, cuda_graph=cuda_graph)
        self.runner.time_runs(warmup)
        used_after = read()
        added = megabytes(None if used_after is None or used_before is None else used_after - used_before)
        if target.on_gpu:
            self.memory = {"kind": "gpu", "source": gpu_probe.source if gpu_probe else None, "added_mb": added, "peak_mb": None}
        else:
            self.memory = {"kind": "cpu-rss-in-process", "source": "rss delta", "added_mb": added, "peak_mb": None}
        self.opened = Opened(self.runner.create_s, self.runner.first_run_s, self.runner.provider)

    def time_runs(self, count: int) -> list[float]:
        """Wall-clock milliseconds of `count` consecutive inferences."""
        return self.runner.time_runs(count)

    def finish(self) -> dict[str, Any]:
        """Memory figures: what the session added by the end of its warm-up."""
        return dict(self.memory)

    def close(self) -> None:
        """Drop the session."""
        self.runner = None


class ChildSession:
    """A session in a fresh `python -m compressor.runtime.handles --worker` process, driven over JSON lines."""

    def __init__(self, model_path: str, target: Target, specs: list[InputSpec], seed: int, cuda_graph: bool,
                 warmup: int, pin: bool):
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "compressor.runtime.handles", "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, env=env, text=True, bufsize=1,
        )
        request = {"model": model_path, "target": target.label, "specs": [[s.name, list(s.shape), s.dtype] for s in specs],
                   "seed": seed, "cuda_graph": cuda_graph, "warmup": warmup, "pin": pin}
        reply = self._ask(request)
        self.opened = Opened(reply["create_s"], reply["first_run_s"], reply["provider"], pinned_cores=reply.get("pinned_cores"))
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
        """Wall-clock milliseconds of `count` consecutive inferences, timed in the child."""
        return self._ask({"op": "run", "count": count})["ms"]

    def finish(self) -> dict[str, Any]:
        """Memory figures: the child's peak RSS, and what the session added to its RSS."""
        reply = self._ask({"op": "memory"})
        peak, before = reply.get("peak_rss"), self._rss_before
        added = None if peak is None or before is None else peak - before
        return {"kind": "cpu-rss", "source": reply.get("source"), "peak_mb": megabytes(peak), "added_mb": megabytes(added)}

    def close(self) -> None:
        """Ask the child to exit (kill it if it does not) and drop its stderr file."""
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=10)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._stderr.close()


def megabytes(value: float | None) -> float | None:
    """Bytes as MiB, None kept."""
    return None if value is None else value / 2**20


def worker_main() -> None:
    """Child side of ChildSession: one session, commands on stdin, one JSON reply per line on stdout."""
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
                               cuda_graph=request["cuda_graph"], shares_cores=bool(pinned))
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


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker_main()
    else:
        sys.exit("usage: python -m compressor.runtime.handles --worker   (internal: one benchmark session per child process)")

"""The on-disk latency cache: measured milliseconds per model structure, one JSON file per measuring context.

A context is what makes a measurement valid elsewhere: the target (cuda:N or cpu:T), the batch size, the precision
the models are timed in (fp32, fp16), the ONNX Runtime version and the device's name (GPU name, or CPU model). Entries are keyed by `micro.structure_key` of the
measured model (the layer signature: ops, attributes, shapes; no names or weights), so the same layer in another
model, or in a second run, is never measured twice.

Location: `cache_dir` when given, else `$COMPRESSOR_CACHE/latency`, else `~/.cache/compressor/latency`.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from compressor.errors import CompressorError
from compressor.files import write_text


def default_cache_dir() -> Path:
    """$COMPRESSOR_CACHE/latency, or ~/.cache/compressor/latency."""
    root = os.environ.get("COMPRESSOR_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "compressor") / "latency"


def device_name(target) -> str:
    """A human name of the device behind `target`: the GPU's name for cuda targets, the CPU model for cpu ones."""
    from compressor.runtime.probes import cpu_model, gpu_description

    if target.on_gpu:
        name = gpu_description(target.device_id).get("name")
        return name or f"unknown GPU {target.device_id}"
    return cpu_model() or "unknown CPU"


def context_of(target, batch: int, precision: str = "fp32") -> dict[str, str | int]:
    """The measuring context: target, batch, precision of the timed models, ONNX Runtime version, device name."""
    import onnxruntime as ort

    return {"target": target.label, "batch": int(batch), "precision": precision, "onnxruntime": ort.__version__,
            "device": device_name(target)}


class LatencyCache:
    """Measured milliseconds per structure key for one context; reads once, writes through (atomically)."""

    def __init__(self, context: dict, cache_dir: str | os.PathLike | None = None):
        self.context = dict(context)
        self.folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        slug = "-".join(re.sub(r"[^A-Za-z0-9.]+", "_", str(self.context[k])).strip("_")
                        for k in ("target", "batch", "precision", "onnxruntime", "device"))
        self.path = self.folder / f"{slug}.json"
        self.entries: dict[str, dict] = self._read()
        self.hits = 0

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # a damaged cache is re-measured, never trusted
        if data.get("context") != self.context:
            return {}
        return dict(data.get("entries", {}))

    def get(self, key: str) -> float | None:
        """Cached milliseconds for `key`, or None."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.hits += 1
        return float(entry["ms"])

    def put(self, key: str, ms: float, what: str = "", extra: dict | None = None) -> None:
        """Record a measurement, with `extra` fields (e.g. what converting and opening it took); `flush` writes."""
        self.entries[key] = {"ms": float(ms), "what": what, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
        self._dirty = True

    def flush(self) -> None:
        """Merge this context's entries into the file (other processes' entries are kept)."""
        if not getattr(self, "_dirty", False):
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(), **self.entries}
            text = json.dumps({"context": self.context, "entries": merged}, indent=1, sort_keys=True)
            write_text(self.path, text)
        except (OSError, CompressorError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise CompressorError(f"cannot write the latency cache {self.path}: {reason} "
                                  "(set COMPRESSOR_CACHE to a writable folder)") from exc
        self._dirty = False

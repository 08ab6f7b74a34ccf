"""Activation taps: stream named intermediate tensors of a model over calibration data with ONNX Runtime.

One session runs the part of the model the named tensors need (a prefix: nodes nobody asked for are cut), with those
tensors as its outputs; `consume` gets them batch by batch, so memory holds one batch of activations at a time.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

from compressor.calibration.data import CalibrationSet
from compressor.errors import CompressorError
from compressor.runtime.sessions import cpu_session

Consumer = Callable[[dict[str, np.ndarray]], None]
Progress = Callable[[str], None]


def prefix_model(proto: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of `proto` holding only the nodes `outputs` depend on, with `outputs` as its graph outputs.

    The batch axis of every graph input is made symbolic so calibration batches of any size can be fed.
    """
    graph = proto.graph
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    known = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    unknown = [n for n in outputs if n not in producer and n not in known]
    if unknown:
        raise CompressorError(f"cannot tap tensor(s) not in the model: {', '.join(unknown[:3])}")
    needed: set[int] = set()
    stack = [producer[n] for n in outputs if n in producer]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        stack.extend(producer[name] for name in graph.node[i].input if name in producer)
    prefix = onnx.ModelProto()
    prefix.CopyFrom(proto)
    del prefix.graph.node[:]
    prefix.graph.node.extend(graph.node[i] for i in sorted(needed))
    used = {name for i in needed for name in graph.node[i].input} | set(outputs)
    kept_inputs = [i for i in prefix.graph.input if i.name in used]
    del prefix.graph.input[:]
    prefix.graph.input.extend(kept_inputs)
    for inp in prefix.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "calibration_batch"
    del prefix.graph.output[:]
    prefix.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    del prefix.graph.value_info[:]
    return prefix


def declared_batch(proto: onnx.ModelProto) -> int | None:
    """The fixed batch size the model declares on its first input (None when dynamic)."""
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
        return None
    return None


class TapSession:
    """An ONNX Runtime session returning the named tensors of `proto` for feeds of calibration batches."""

    def __init__(self, proto: onnx.ModelProto, tensor_names: list[str]):
        self.names = list(dict.fromkeys(tensor_names))
        graph_inputs = {i.name for i in proto.graph.input}
        self.computed = [n for n in self.names if n not in graph_inputs]
        self.fixed_batch = declared_batch(proto)
        self.session = cpu_session(prefix_model(proto, self.computed), spinning=False) if self.computed else None
        self.feed_names = {i.name for i in self.session.get_inputs()} if self.session else set()

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The tapped tensors for one batch (the graph inputs among them come straight from the feed)."""
        values = {n: feed[n] for n in self.names if n in feed}
        if self.session is None:
            return values
        inner = {k: v for k, v in feed.items() if k in self.feed_names}
        try:
            outs = self.session.run(self.computed, inner)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types; a fixed batch axis is the usual cause
            outs = self._run_in_fixed_batches(inner, exc)
        values.update(zip(self.computed, outs))
        return values

    def _run_in_fixed_batches(self, feed: dict[str, np.ndarray], error: Exception) -> list[np.ndarray]:
        size = self.fixed_batch
        n = len(next(iter(feed.values())))
        if not size or size == n:
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise CompressorError(f"ONNX Runtime failed on the calibration data: {first}") from error
        chunks: list[list[np.ndarray]] = []
        for start in range(0, n, size):
            part = {k: v[start:start + size] for k, v in feed.items()}
            short = size - len(next(iter(part.values())))
            if short:
                part = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in part.items()}
            outs = self.session.run(self.computed, part)
            chunks.append([o[: size - short] for o in outs])
        return [np.concatenate([c[i] for c in chunks]) for i in range(len(self.computed))]


def stream_tensors(proto: onnx.ModelProto, calib: CalibrationSet, tensor_names: list[str], consume: Consumer,
                   batch_size: int | None = None, progress: Progress | None = None, label: str = "calibration") -> int:
    """Run `proto` over `calib` and call `consume({name: array})` for each batch with the named tensors.

    Returns the number of samples streamed. `progress` gets one message per batch ("label: i/n batches").
    """
    taps = TapSession(proto, tensor_names)
    size = max(1, int(batch_size or calib.options.batch))
    total = -(-calib.count // size)
    seen = 0
    for i, feed in enumerate(calib.batches(size), start=1):
        consume(taps.run(feed))
        seen += len(next(iter(feed.values())))
        if progress:
            progress(f"{label}: {i}/{total} batches")
    return seen

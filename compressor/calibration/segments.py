"""Pass-by-pass evaluation of a model over a calibration set, each pass computing only what it has not computed yet.

Pass k asks for tensors W_k. It runs the nodes between the tensors already cached (or the graph inputs) and W_k, and
caches, for every calibration sample, the tensors later passes will read. The model may change between passes (layers
refitted) as long as no cached tensor depends on what changes: reconstruction asks pass k for the inputs of level-k
layers, which depend on refits of lower levels only. Cached activations live in memory-mapped temporary files, so
memory holds one batch of activations; the files hold the activations crossing the current cut for all samples.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterator

import numpy as np
import onnx

from compressor.calibration.data import CalibrationSet
from compressor.calibration.taps import TapSession


def _closure(graph: onnx.GraphProto, wanted: set[str], available: set[str]) -> tuple[list[int], set[str]]:
    """Indices of the nodes needed to compute `wanted` from `available`, and the available tensors they read."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    constants = {t.name for t in graph.initializer}
    needed: set[int] = set()
    reads: set[str] = set()
    stack = list(wanted)
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or not name or name in constants:
            continue
        seen.add(name)
        if name in available:
            reads.add(name)
            continue
        index = producer.get(name)
        if index is None or index in needed:
            continue
        needed.add(index)
        stack.extend(graph.node[index].input)
    return sorted(needed), reads


class SegmentedRunner:
    """Runs a model over `calib` pass by pass; `schedule[k]` names the tensors pass k hands to its consumer."""

    def __init__(self, calib: CalibrationSet, schedule: list[list[str]], batch_size: int | None = None):
        self.calib = calib
        self.schedule = [list(dict.fromkeys(w)) for w in schedule]
        self.batch_size = max(1, int(batch_size or calib.options.batch))
        self.cache: dict[str, np.ndarray] = {}
        self._dir = tempfile.mkdtemp(prefix="compressor-calib-")
        self._files = 0

    def close(self) -> None:
        """Drop the cached activations and their files."""
        self.cache.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "SegmentedRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run_pass(self, k: int, proto: onnx.ModelProto) -> Iterator[dict[str, np.ndarray]]:
        """Yield `schedule[k]` computed on the current `proto`, batch by batch (calibration order).

        Exhaust the iterator: the cache for later passes is complete only at its end.
        """
        graph = proto.graph
        inputs = {i.name for i in graph.input}
        available = set(self.cache) | inputs
        wanted = set(self.schedule[k])
        nodes, reads = _closure(graph, wanted, available)
        produced = {out for i in nodes for out in graph.node[i].output if out}
        later = set().union(*self.schedule[k + 1:]) if k + 1 < len(self.schedule) else set()
        _, keep = _closure(graph, later, available | produced)
        computed = sorted((wanted | keep) & produced)
        session = TapSession(self._segment(proto, nodes, reads - inputs), computed) if computed else None
        fresh: dict[str, np.ndarray] = {}
        reads_inputs = bool((reads | wanted | keep) & inputs)
        offset = 0
        for feed in self._feeds(reads_inputs):
            size = len(next(iter(feed.values()))) if feed else min(self.batch_size, self.calib.count - offset)
            feed.update({name: np.asarray(self.cache[name][offset:offset + size]) for name in reads - inputs})
            values = dict(feed)
            if session is not None:
                values.update(session.run(feed))
            for name in keep & (produced | inputs):
                if name not in self.cache:
                    target = fresh.setdefault(name, self._allocate(name, values[name]))
                    target[offset:offset + size] = values[name]
            yield {name: values[name] for name in wanted}
            offset += size
        self.cache = {name: self.cache.get(name, fresh.get(name)) for name in keep}

    def _segment(self, proto: onnx.ModelProto, nodes: list[int], cached: set[str]) -> onnx.ModelProto:
        """The model of `nodes` alone (with only the initializers they read), the cached tensors among its inputs."""
        graph = proto.graph
        chosen = [graph.node[i] for i in nodes]
        used = {name for node in chosen for name in node.input}
        inputs = [i for i in graph.input if i.name in used]
        for name in sorted(cached):
            value = self.cache[name]
            elem = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
            inputs.append(onnx.helper.make_tensor_value_info(name, elem, ["batch", *value.shape[1:]]))
        initializers = [t for t in graph.initializer if t.name in used]
        segment = onnx.helper.make_graph(chosen, "segment", inputs, [], initializers)
        return onnx.helper.make_model(segment, opset_imports=proto.opset_import, ir_version=proto.ir_version)

    def _feeds(self, with_inputs: bool) -> Iterator[dict[str, np.ndarray]]:
        if with_inputs:
            yield from self.calib.batches(self.batch_size)
            return
        for _ in range(0, self.calib.count, self.batch_size):
            yield {}

    def _allocate(self, name: str, example: np.ndarray) -> np.ndarray:
        """A memory-mapped array for every sample of tensor `name`. Its file is unlinked at once: the space lives
        as long as the mapping (freed when the cache drops the tensor, even if the process is killed)."""
        self._files += 1
        path = os.path.join(self._dir, f"t{self._files}.npy")
        array = np.lib.format.open_memmap(path, mode="w+", dtype=example.dtype,
                                          shape=(self.calib.count,) + tuple(example.shape[1:]))
        os.unlink(path)
        return array

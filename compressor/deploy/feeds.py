"""Input batches for calibration and comparison: arrays from .npy/.npz files (read by the calibration data layer,
compressor.calibration.data), re-iterable feeds, seeded inputs.

The interface between a data source and the precision stage is an iterable of feed dicts ({input name: array},
batch first). Any object with a `batches(batch_size)` method (a calibration set) serves as well.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx

from compressor.calibration.data import read_arrays
from compressor.errors import CompressorError
from compressor.runtime.inputs import ONNX_TO_NUMPY, graph_inputs, random_inputs

Feed = dict[str, np.ndarray]
DEFAULT_BATCH = 32


def load_feed_arrays(path: str | os.PathLike, proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Read calibration inputs: a .npy (single-input model) or a .npz with one array per input name (a .npz of one
    array feeds a single-input model whatever its name). The file is read by compressor.calibration.data.

    Arrays are batch first and are cast to the input's element type; a rank or fixed-dimension mismatch with the
    model's inputs is a CompressorError.
    """
    inputs = graph_inputs(proto)
    arrays = read_arrays(path, [inp.name for inp in inputs])
    if len(inputs) == 1 and len(arrays) == 1:
        arrays = {inputs[0].name: next(iter(arrays.values()))}
    return check_arrays(arrays, inputs, Path(path).name)


def check_arrays(arrays: dict[str, np.ndarray], inputs: list[onnx.ValueInfoProto], source: str) -> dict[str, np.ndarray]:
    """Arrays matched to the model's inputs (names, rank, fixed dims, equal sample counts), cast to their dtypes."""
    names = [inp.name for inp in inputs]
    missing, extra = set(names) - set(arrays), set(arrays) - set(names)
    if missing or extra:
        raise CompressorError(f"{source}: arrays {sorted(arrays)} do not match the model inputs {names}")
    checked, counts = {}, set()
    for inp in inputs:
        array = np.asarray(arrays[inp.name])
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        if array.ndim != len(dims):
            raise CompressorError(f"{source}: input '{inp.name}' has rank {len(dims)}, the array has shape "
                                  f"{list(array.shape)}")
        for axis, dim in enumerate(dims[1:], start=1):
            if dim and array.shape[axis] != dim:
                raise CompressorError(f"{source}: input '{inp.name}' needs dim {axis} = {dim}, the array has shape "
                                      f"{list(array.shape)}")
        dtype = ONNX_TO_NUMPY.get(inp.type.tensor_type.elem_type, np.float32)
        checked[inp.name] = np.ascontiguousarray(array.astype(dtype, copy=False))
        counts.add(array.shape[0])
    if len(counts) != 1 or 0 in counts:
        raise CompressorError(f"{source}: every input needs the same non-zero number of samples (got {sorted(counts)})")
    return checked


def fixed_batch(proto: onnx.ModelProto) -> int | None:
    """The model's fixed first dimension when all inputs declare one, else None (dynamic batch)."""
    firsts = set()
    for inp in graph_inputs(proto):
        dims = inp.type.tensor_type.shape.dim
        firsts.add(dims[0].dim_value if dims and dims[0].HasField("dim_value") else None)
    return firsts.pop() if len(firsts) == 1 and None not in firsts else None


def split_arrays(arrays: dict[str, np.ndarray], batch: int) -> list[Feed]:
    """Feeds of `batch` samples each (the last may be shorter) from equally long arrays."""
    count = len(next(iter(arrays.values())))
    return [{name: a[start:start + batch] for name, a in arrays.items()} for start in range(0, count, batch)]


class Feeds:
    """A re-iterable sequence of feed dicts (iterating twice gives the same batches)."""

    def __init__(self, batches: list[Feed]):
        if not batches:
            raise CompressorError("calibration data holds no batch")
        self.batches = batches

    def __iter__(self) -> Iterator[Feed]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def samples(self) -> int:
        """Number of samples over all batches."""
        return sum(len(next(iter(feed.values()))) for feed in self.batches)

    def rebatched(self, batch: int) -> "Feeds":
        """The same samples regrouped in batches of exactly `batch` (a model with a fixed batch dimension);
        a final partial batch is dropped."""
        joined = {name: np.concatenate([f[name] for f in self.batches]) for name in self.batches[0]}
        whole = len(next(iter(joined.values()))) // batch * batch
        if whole == 0:
            raise CompressorError(f"the model has a fixed batch of {batch}; calibration data has fewer samples")
        return Feeds(split_arrays({n: a[:whole] for n, a in joined.items()}, batch))

    def head(self, samples: int) -> "Feeds":
        """The first `samples` samples (whole batches, the last one cut)."""
        kept, left = [], samples
        for feed in self.batches:
            if left <= 0:
                break
            kept.append({name: a[:left] for name, a in feed.items()})
            left -= len(next(iter(feed.values())))
        return Feeds(kept)


def as_feeds(source, proto: onnx.ModelProto, batch: int = DEFAULT_BATCH) -> Feeds | None:
    """Turn calibration data into re-iterable Feeds matching `proto`'s inputs.

    `source` is None, a .npy/.npz path, an object with `batches(batch_size)` (a calibration set), or an iterable of
    feed dicts (a one-shot generator is read once and kept).
    """
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        feeds = Feeds(split_arrays(load_feed_arrays(source, proto), batch))
    else:
        batches: Iterable[Feed] = source.batches(batch) if hasattr(source, "batches") and callable(source.batches) \
            else source
        inputs = graph_inputs(proto)
        feeds = Feeds([check_arrays(dict(feed), inputs, "calibration batch") for feed in batches])
    size = fixed_batch(proto)
    if size is not None and any(len(next(iter(f.values()))) != size for f in feeds):
        feeds = feeds.rebatched(size)
    return feeds


def seeded_feeds(proto: onnx.ModelProto, input_shapes: dict[str, list[int]], samples: int, seed: int) -> Feeds:
    """Seeded standard-normal inputs under the analysis input shapes: one feed of `samples` samples when the batch
    is dynamic, else as many fixed-batch feeds as `samples` needs."""
    size = fixed_batch(proto)
    if size is None:
        shapes = {name: [samples, *shape[1:]] for name, shape in input_shapes.items()}
        return Feeds([random_inputs(proto, shapes, seed)])
    return Feeds([random_inputs(proto, input_shapes, seed + i) for i in range(max(1, -(-samples // size)))])

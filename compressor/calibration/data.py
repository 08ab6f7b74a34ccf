"""Calibration data: a folder of images, a `.npy` array or a `.npz` archive, streamed in batches.

Memory stays bounded: images are decoded with Pillow one batch at a time, a `.npy` file is memory-mapped, and only
the `.npz` arrays (one per model input, as NumPy cannot memory-map a zip member) are held in memory whole.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from compressor.errors import CompressorError
from compressor.runtime.inputs import ONNX_TO_NUMPY

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ORDERS = ("rgb", "bgr")
LAYOUTS = ("nchw", "nhwc")
ARRAY_SUFFIXES = (".npy", ".npz")


@dataclass
class CalibrationOptions:
    """How calibration data is read and preprocessed.

    size: (height, width) images are resized (shorter side) and center-cropped to; None: the model's input size.
    mean/std: per-channel normalization of pixels scaled to [0, 1]. order: channel order; layout: nchw or nhwc.
    count: how many samples a seeded random subset keeps; seed: its seed; batch: samples per ONNX Runtime run.
    """

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    order: str = "rgb"
    layout: str = "nchw"
    count: int = 1024
    seed: int = 0
    batch: int = 32

    def validate(self) -> None:
        """Raise CompressorError for out-of-range options."""
        if self.order not in ORDERS:
            raise CompressorError(f"--calib-order must be one of {', '.join(ORDERS)}, got '{self.order}'")
        if self.layout not in LAYOUTS:
            raise CompressorError(f"--calib-layout must be one of {', '.join(LAYOUTS)}, got '{self.layout}'")
        if self.count < 1:
            raise CompressorError(f"--calib-count must be at least 1, got {self.count}")
        if self.batch < 1:
            raise CompressorError(f"the calibration batch size must be at least 1, got {self.batch}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise CompressorError(f"--calib-size must be HEIGHTxWIDTH or one positive size, got {self.size}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise CompressorError("--calib-mean and --calib-std need the same number of values (one per channel)")
        if any(s == 0 for s in self.std):
            raise CompressorError("--calib-std values must be non-zero")


@dataclass
class CalibrationSet:
    """A seeded subset of calibration samples, read lazily: `batches(n)` yields feeds for ONNX Runtime.

    Samples come from in-memory or memory-mapped arrays (one per input name) or from image files decoded on demand.
    """

    arrays: dict[str, np.ndarray] | None = None
    images: list[Path] | None = None
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    input_name: str = ""
    image_shape: tuple[int, ...] = ()
    options: CalibrationOptions = field(default_factory=CalibrationOptions)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], options: CalibrationOptions | None = None) -> "CalibrationSet":
        """A set over ready-made arrays {input name: [N, ...]} (all of one length N); every sample is used."""
        if not arrays:
            raise CompressorError("calibration data holds no arrays")
        lengths = {name: len(a) for name, a in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise CompressorError(f"calibration arrays differ in sample count: {lengths}")
        n = next(iter(lengths.values()))
        if n == 0:
            raise CompressorError("calibration data holds no samples")
        return cls(arrays=dict(arrays), indices=np.arange(n, dtype=np.int64), options=options or CalibrationOptions())

    @property
    def count(self) -> int:
        """Number of samples in the set."""
        return len(self.indices)

    @property
    def names(self) -> list[str]:
        """The model input names each batch feeds."""
        return list(self.arrays) if self.arrays is not None else [self.input_name]

    def subset(self, indices: np.ndarray) -> "CalibrationSet":
        """The same source restricted to `indices` (positions into this set)."""
        return CalibrationSet(self.arrays, self.images, self.indices[np.asarray(indices, dtype=np.int64)],
                              self.input_name, self.image_shape, self.options)

    def check_inputs(self, proto: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> None:
        """Raise CompressorError unless the set feeds every model input with samples of the right shape and type
        (floating arrays of another precision are cast batch by batch)."""
        inputs = {i.name: i for i in proto.graph.input}
        missing = sorted(set(inputs) - set(self.names))
        if missing:
            raise CompressorError(f"calibration data has no samples for input(s) {', '.join(missing)} "
                                  f"(it holds: {', '.join(self.names)})")
        for name, array in (self.arrays or {}).items():
            if name in inputs:
                self.arrays[name] = _check_array(array, name, inputs[name], input_shapes)

    def split(self, n_held_out: int) -> tuple["CalibrationSet", "CalibrationSet"]:
        """(fit set, held-out set): the last `n_held_out` samples are held out (at least one stays for fitting)."""
        n_held_out = int(min(max(n_held_out, 0), self.count - 1))
        cut = self.count - n_held_out
        return self.subset(np.arange(cut)), self.subset(np.arange(cut, self.count))

    def batches(self, batch_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of at most `batch_size` samples (default: options.batch), float32 unless the model wants another type."""
        size = max(1, int(batch_size or self.options.batch))
        for start in range(0, self.count, size):
            chosen = self.indices[start:start + size]
            if self.arrays is not None:
                yield {name: np.ascontiguousarray(a[chosen]) for name, a in self.arrays.items()}
            else:
                yield {self.input_name: np.stack([self._decode(self.images[i]) for i in chosen.tolist()])}

    def _decode(self, path: Path) -> np.ndarray:
        return decode_image(path, self.image_shape, self.options)


def decode_image(path: Path, shape: tuple[int, ...], options: CalibrationOptions) -> np.ndarray:
    """One image file → a normalized float32 array of `shape` (C,H,W for nchw, H,W,C for nhwc)."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = (shape[0], shape[1], shape[2]) if options.layout == "nchw" else (shape[2], shape[0], shape[1])
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            img = _resize_center_crop(img, height, width)
            pixels = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise CompressorError(f"cannot read calibration image {path}: {exc}") from exc
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if options.order == "bgr":
        pixels = pixels[:, :, ::-1]
    mean = np.asarray(options.mean, dtype=np.float32)
    std = np.asarray(options.std, dtype=np.float32)
    if len(mean) not in (1, channels):
        raise CompressorError(f"--calib-mean has {len(mean)} values but the model input has {channels} channels")
    pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1) if options.layout == "nchw" else pixels, dtype=np.float32)


def _resize_center_crop(img, height: int, width: int):
    from PIL import Image

    if img.size == (width, height):
        return img
    scale = max(height / img.height, width / img.width)
    resized = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))),
                         Image.Resampling.BILINEAR)
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def load_calibration(source, proto: onnx.ModelProto, input_shapes: dict[str, list[int]],
                     options: CalibrationOptions | None = None) -> CalibrationSet:
    """Open calibration data for the model: an image folder, a `.npy` (single-input model) or a `.npz` (per input).

    Checks every array against the model's inputs (shape after the batch axis, floating dtype) and picks a seeded
    subset of `options.count` samples. Raises CompressorError with one clear message for bad data.
    """
    options = options or CalibrationOptions()
    options.validate()
    path = Path(source)
    inputs = {i.name: i for i in proto.graph.input}
    if not path.exists():
        raise CompressorError(f"calibration data not found: {path}")
    if path.is_dir():
        calib = _image_folder(path, inputs, input_shapes, options)
    elif path.suffix.lower() in ARRAY_SUFFIXES:
        arrays = read_arrays(path, list(inputs))
        missing = sorted(set(inputs) - set(arrays))
        if missing:
            raise CompressorError(f"{path} has no array for input(s) {', '.join(missing)} "
                                  f"(it holds: {', '.join(arrays) or 'nothing'})")
        checked = {name: _check_array(arrays[name], name, inputs[name], input_shapes) for name in inputs}
        calib = CalibrationSet.from_arrays(checked, options)
    else:
        raise CompressorError(f"calibration data must be an image folder, a .npy or a .npz file: {path}")
    return _seeded_subset(calib, options)


def _seeded_subset(calib: CalibrationSet, options: CalibrationOptions) -> CalibrationSet:
    if calib.count <= options.count:
        return calib
    chosen = np.random.default_rng(options.seed).choice(calib.count, size=options.count, replace=False)
    return calib.subset(np.sort(chosen))


def _image_folder(path: Path, inputs: dict, input_shapes: dict[str, list[int]], options: CalibrationOptions) -> CalibrationSet:
    if len(inputs) != 1:
        raise CompressorError(f"an image folder calibrates a single-input model; this one has {len(inputs)} inputs: "
                              "use a .npz with one array per input name")
    name = next(iter(inputs))
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CompressorError(f"no images (jpg, jpeg, png, bmp, webp) found under {path}")
    shape = list(input_shapes[name])
    if len(shape) != 4:
        raise CompressorError(f"images calibrate a 4-D image input; input '{name}' has shape {shape}")
    if _numpy_dtype(inputs[name]) is None or not np.issubdtype(_numpy_dtype(inputs[name]), np.floating):
        raise CompressorError(f"input '{name}' is not a floating-point tensor: give preprocessed data as .npy/.npz")
    channel_axis = 1 if options.layout == "nchw" else 3
    spatial = [a for a in (1, 2, 3) if a != channel_axis]
    if options.size is not None:
        for axis, value in zip(spatial, options.size):
            shape[axis] = int(value)
    channels = shape[channel_axis]
    if channels not in (1, 3):
        raise CompressorError(f"input '{name}' has {channels} channels on axis {channel_axis} ({options.layout}); "
                              "images give 1 or 3 (check --calib-layout)")
    calib = CalibrationSet(images=files, indices=np.arange(len(files), dtype=np.int64), input_name=name,
                           image_shape=tuple(shape[1:]), options=options)
    return calib


def read_arrays(path: str | Path, input_names: list[str]) -> dict[str, np.ndarray]:
    """The arrays of an input file, the project's one reader of `.npy`/`.npz` data: a `.npy` (memory-mapped) feeds
    the single input of `input_names`; a `.npz` gives every array it holds, by name (callers match them to inputs).

    Raises CompressorError for a missing or unreadable file, another suffix, or a `.npy` for a model of several inputs.
    """
    path = Path(path)
    if not path.is_file():
        raise CompressorError(f"calibration data not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if len(input_names) != 1:
            raise CompressorError(f"a .npy calibration file needs a single-input model; this one has "
                                  f"{len(input_names)} inputs: use a .npz with one array per input name")
        try:
            return {input_names[0]: np.load(path, mmap_mode="r", allow_pickle=False)}
        except (OSError, ValueError) as exc:
            raise CompressorError(f"cannot read calibration array {path}: {exc}") from exc
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise CompressorError(f"cannot read calibration archive {path}: {exc}") from exc
    raise CompressorError(f"calibration data must be a .npy or .npz file, not {path.name}")


def _numpy_dtype(value_info: onnx.ValueInfoProto):
    return ONNX_TO_NUMPY.get(value_info.type.tensor_type.elem_type)


def _check_array(array: np.ndarray, name: str, value_info: onnx.ValueInfoProto, input_shapes: dict[str, list[int]]) -> np.ndarray:
    expected = list(input_shapes[name])
    wanted = _numpy_dtype(value_info)
    if array.ndim != len(expected) or list(array.shape[1:]) != expected[1:]:
        raise CompressorError(f"calibration array for input '{name}' has shape {list(array.shape)}; the model needs "
                              f"[N, {', '.join(str(d) for d in expected[1:])}]")
    if len(array) == 0:
        raise CompressorError(f"calibration array for input '{name}' holds no samples")
    if wanted is not None and np.issubdtype(wanted, np.floating) != np.issubdtype(array.dtype, np.floating):
        raise CompressorError(f"calibration array for input '{name}' has dtype {array.dtype}; the model input is "
                              f"{np.dtype(wanted).name} (give preprocessed {np.dtype(wanted).name} data)")
    if wanted is not None and array.dtype != wanted:
        return _CastView(array, wanted)
    return array


class _CastView:
    """An array read lazily and cast per batch (keeps memory-mapped data unloaded)."""

    def __init__(self, array: np.ndarray, dtype):
        self.array = array
        self.dtype = np.dtype(dtype)
        self.shape = array.shape

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self.array[index], dtype=self.dtype)

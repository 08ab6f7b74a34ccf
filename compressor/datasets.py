"""CIFAR-10 from the JPEG tarballs of `shared/data/cifar10` (numpy only, no torch).

The tarballs hold `train/<class>/NNNN.jpg` and `test/<class>/NNNN.jpg`; labels follow CIFAR10_CLASSES.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from compressor.errors import CompressorError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
CIFAR10_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def cifar10_members(data_dir: str | Path, split: str) -> list[tuple[str, int, bytes]]:
    """(member name, label, JPEG bytes) of every image of one split ('train' or 'test'), sorted by member name."""
    if split not in ("train", "test"):
        raise CompressorError(f"unknown CIFAR-10 split '{split}' (train or test)")
    path = Path(data_dir) / f"cifar10-{split}.tar.xz"
    if not path.is_file():
        raise CompressorError(f"CIFAR-10 tarball not found: {path}")
    class_index = {name: i for i, name in enumerate(CIFAR10_CLASSES)}
    entries = []
    with tarfile.open(path, "r:xz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and member.name.endswith(".jpg") and len(parts) >= 2 and parts[-2] in class_index:
                entries.append((member.name, class_index[parts[-2]], tar.extractfile(member).read()))
    if not entries:
        raise CompressorError(f"no CIFAR-10 images found in {path}")
    entries.sort(key=lambda entry: entry[0])
    return entries


def balanced_subset(images: np.ndarray, labels: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` items of a permutation seeded with 0, in their original order (all when limit is None)."""
    if limit is not None and limit < len(labels):
        keep = np.sort(np.random.default_rng(0).permutation(len(labels))[:limit])
        return images[keep], labels[keep]
    return images, labels


def load_cifar10(data_dir: str | Path, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode one split ('train' or 'test') into uint8 images [N, 32, 32, 3] (RGB) and int64 labels [N].

    Images come in a deterministic order (sorted member names). `limit` keeps the first `limit` images of a
    seeded class-balanced shuffle, for quick runs.
    """
    from PIL import Image

    images = []
    entries = cifar10_members(data_dir, split)
    for _, _, data in entries:
        with Image.open(io.BytesIO(data)) as img:
            images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
    labels = np.array([label for _, label, _ in entries], dtype=np.int64)
    return balanced_subset(np.stack(images), labels, limit)


def normalize_nchw(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB images → float32 NCHW normalized with the checkpoints' mean and std."""
    x = images.astype(np.float32) / 255.0
    x = (x - CIFAR10_MEAN) / CIFAR10_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

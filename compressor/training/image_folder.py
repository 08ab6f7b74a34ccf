"""Training images from an ImageFolder tree (one folder per class) or the CIFAR-10 tarballs, as the device-resident
CifarData of `compress train` (decoded once, uint8 on the device, batched augmentation in CifarData.train_batches).

An ImageFolder tree is read by torchvision.datasets.ImageFolder (class folders sorted by name give the labels); a
folder holding the images themselves (no class folders) is unlabeled (labels -1: distillation only). Every image is
center-cropped to the model's aspect ratio and resized to its input size once, at decode time.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from compressor.datasets import CIFAR10_CLASSES
from compressor.errors import CompressorError
from compressor.training.data import CifarData, load_cifar10_data

UNLABELED = -1
CIFAR_TARBALL = "cifar10-train.tar.xz"


def is_cifar_dir(path: str | Path) -> bool:
    """True when `path` is a folder holding the CIFAR-10 JPEG tarballs."""
    return (Path(path) / CIFAR_TARBALL).is_file()


def _decode(path: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            fitted = ImageOps.fit(image.convert("RGB"), (size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(fitted, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CompressorError(f"cannot read image {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def list_images(root: str | Path) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
    """(path, label) of every image under `root` and the class names: ImageFolder's class folders, or the images
    directly in `root` with label -1 when it has no subfolders."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(root)
    if not root.is_dir():
        raise CompressorError(f"image folder not found: {root}")
    if not any(entry.is_dir() for entry in root.iterdir()):
        files = sorted(str(p) for p in root.iterdir() if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS))
        if not files:
            raise CompressorError(f"no images in {root} (expected class folders or image files)")
        return [(path, UNLABELED) for path in files], ()
    try:
        dataset = ImageFolder(str(root), loader=lambda path: path)
    except FileNotFoundError as exc:
        raise CompressorError(f"no images in {root}: {exc}") from exc
    return list(dataset.samples), tuple(dataset.classes)


def read_images(root: str | Path, size: tuple[int, int], limit: int | None = None,
                threads: int | None = None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Decode the images of `root` (list_images) into uint8 [N, H, W, 3] at `size` (H, W), int64 labels and the class
    names. `limit` keeps a seeded random subset of that many images."""
    samples, classes = list_images(root)
    if limit is not None and limit < len(samples):
        keep = np.sort(np.random.default_rng(0).permutation(len(samples))[:limit])
        samples = [samples[i] for i in keep]
    with ThreadPoolExecutor(threads or min(16, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda sample: _decode(sample[0], size), samples))
    labels = np.array([label for _, label in samples], dtype=np.int64)
    return np.stack(images), labels, classes


def _to_device(images: np.ndarray, labels: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
    return x, torch.from_numpy(labels).to(device)


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 NCHW images resized (bilinear, antialiased) to `size` (H, W); the same tensor when already that size."""
    if tuple(images.shape[-2:]) == tuple(size) or not len(images):
        return images
    resized = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def load_image_data(data: str | Path, val: str | Path | None, size: tuple[int, int], device,
                    mean: tuple[float, ...], std: tuple[float, ...], limit: int | None = None) -> CifarData:
    """Train images from `data` (an ImageFolder tree or a folder with the CIFAR-10 tarballs) and the labeled
    evaluation split (`val`, an ImageFolder tree; else the CIFAR-10 test tarball for CIFAR data; else none) on
    `device`, at the model's input size. The evaluation split is both `val` and `test` of the result."""
    if is_cifar_dir(data):
        cifar = load_cifar10_data(data, device, val_size=0, limit=limit)
        train = (resize_images(cifar.train_images, size), cifar.train_labels)
        evaluation = (resize_images(cifar.test_images, size), cifar.test_labels)
        classes: tuple[str, ...] = CIFAR10_CLASSES
        decoder = cifar.decoder
    else:
        images, labels, classes = read_images(data, size, limit)
        train = _to_device(images, labels, device)
        evaluation = (train[0][:0], train[1][:0])
        decoder = "pillow"
    if val is not None:
        images, labels, val_classes = read_images(val, size, limit)
        if not val_classes:
            raise CompressorError(f"--val {val} has no class folders: accuracy needs labels")
        if classes and tuple(val_classes) != tuple(classes):
            raise CompressorError(f"the class folders of --val {val} ({len(val_classes)}) differ from those of the "
                                  f"training data ({len(classes)})")
        classes = classes or tuple(val_classes)
        evaluation = _to_device(images, labels, device)
    return CifarData(*train, *evaluation, *evaluation, decoder=decoder, mean=tuple(mean), std=tuple(std),
                     classes=classes)

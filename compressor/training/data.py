"""CIFAR-10 as tensors resident on the training device, with batched on-device augmentation.

The JPEG tarballs are decoded once per process (cached), moved to the device as uint8 NCHW, and split into a train
part and a seeded held-out validation part (never the test set). Each epoch draws one permutation and one set of
augmentation parameters (pad-4 random crop, horizontal flip) for the whole global batch sequence from a generator
seeded by (seed, epoch), so every DDP rank sees the same global batches and takes its own slice of each.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from compressor.datasets import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, balanced_subset, cifar10_members, load_cifar10
from compressor.errors import CompressorError

DEFAULT_VAL_SIZE = 5000
# `compress train` holds out the same validation images whatever its --seed: a run from a checkpoint trained with another
# seed must never judge (AMSC searches, validation top-1) on images that checkpoint trained on
VALIDATION_SPLIT_SEED = 0
CROP_PADDING = 4


@dataclass
class CifarData:
    """Train/val/test images (uint8 NCHW) and labels (int64) on one device, with the checkpoints' normalization."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    decoder: str = "pillow"
    mean: tuple[float, ...] = tuple(float(v) for v in CIFAR10_MEAN)
    std: tuple[float, ...] = tuple(float(v) for v in CIFAR10_STD)
    classes: tuple[str, ...] = CIFAR10_CLASSES

    @property
    def device(self) -> torch.device:
        """The device holding the tensors."""
        return self.train_images.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW images -> float32 NCHW normalized with this data's mean/std (on the images' device)."""
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def sizes(self) -> dict[str, int]:
        """Number of images per split."""
        return {"train": len(self.train_labels), "val": len(self.val_labels), "test": len(self.test_labels)}

    def train_batches(self, epoch: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                      augment: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of one epoch: (normalized augmented images, labels) per global batch.

        Global batches of `batch_size` (the last incomplete one is dropped) come from a permutation seeded by
        (seed, epoch); rank r takes items r, r + world_size, ... of each global batch.
        """
        count = len(self.train_labels)
        batch_size = min(batch_size, count)
        if batch_size < world_size:
            raise CompressorError(f"batch size {batch_size} is smaller than the {world_size} processes")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(seed) * 1_000_003 + int(epoch))
        order = torch.randperm(count, generator=generator, device=self.device)
        offsets = torch.randint(0, 2 * CROP_PADDING + 1, (count, 2), generator=generator, device=self.device)
        flips = torch.rand(count, generator=generator, device=self.device) < 0.5
        for start in range(0, count - batch_size + 1, batch_size):
            index = order[start:start + batch_size][rank::world_size]
            images = self.train_images[index]
            if augment:
                images = random_crop_flip(images, offsets[index], flips[index], CROP_PADDING)
            yield self.normalize(images), self.train_labels[index]

    def steps_per_epoch(self, batch_size: int) -> int:
        """Number of optimizer steps per epoch at this global batch size."""
        count = len(self.train_labels)
        return count // min(batch_size, count)


def random_crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Per image: zero-pad by `padding`, crop back to the original size at (offsets[i, 0], offsets[i, 1]) and mirror
    horizontally where flips[i]; one gather for the whole batch."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[:, :1] + torch.arange(h, device=images.device)
    cols = offsets[:, 1:] + torch.arange(w, device=images.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


@functools.lru_cache(maxsize=8)
def _decoded_split(data_dir: str, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        images, labels = load_cifar10(data_dir, split, limit)
        return images, labels, "pillow"
    except ModuleNotFoundError as exc:
        if exc.name != "PIL":
            raise
    images, labels = _decode_with_torchvision(data_dir, split, limit)
    return images, labels, "torchvision"


def _decode_with_torchvision(data_dir: str, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The same images and order as compressor.datasets.load_cifar10, decoded by torchvision (for machines without
    Pillow)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as exc:  # noqa: BLE001 - a torchvision built for another torch fails in many ways
        raise CompressorError(f"neither Pillow nor torchvision can decode JPEG here ({type(exc).__name__}: {exc})") from exc
    entries = cifar10_members(data_dir, split)
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for _, _, data in entries]
    decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB)
    x = torch.stack(decoded).permute(0, 2, 3, 1).contiguous().numpy()
    y = np.array([label for _, label, _ in entries], dtype=np.int64)
    return balanced_subset(x, y, limit)


def load_cifar10_data(data_dir: str | Path, device: torch.device | str = "cpu", *, val_size: int = DEFAULT_VAL_SIZE,
                      seed: int = 0, limit: int | None = None) -> CifarData:
    """CIFAR-10 train/val/test on `device`. The validation split is `val_size` train images chosen by a permutation
    seeded by `seed` (at most a fifth of the train images); `limit` keeps that many train and test images (a
    class-balanced subset, for quick runs)."""
    data_dir = str(Path(data_dir).expanduser().resolve())
    train_x, train_y, decoder = _decoded_split(data_dir, "train", limit)
    test_x, test_y, _ = _decoded_split(data_dir, "test", limit)
    val_size = min(int(val_size), len(train_y) // 5)
    order = np.random.default_rng(seed).permutation(len(train_y))
    val_index, train_index = np.sort(order[:val_size]), np.sort(order[val_size:])

    def to_device(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
        return x, torch.from_numpy(np.ascontiguousarray(labels)).to(device)

    train = to_device(train_x[train_index], train_y[train_index])
    val = to_device(train_x[val_index], train_y[val_index])
    test = to_device(test_x, test_y)
    return CifarData(*train, *val, *test, decoder=decoder)

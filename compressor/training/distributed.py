"""One process or several under `torchrun`: device choice, process group, rank-0-only side effects.

Under torchrun (WORLD_SIZE > 1) every process trains a DistributedDataParallel replica on its own GPU (NCCL) or on
the CPU (gloo); data sharding lives in CifarData.train_batches, gradient averaging in DDP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from compressor.errors import CompressorError


@dataclass
class DistContext:
    """This process's place in the job: rank, world size, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and logs."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes (in place; returned for convenience)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's value on every process."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every process."""
        if self.enabled:
            dist.barrier()


def resolve_device(name: str | None = "auto", local_rank: int = 0) -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N' -> a torch.device; under torchrun 'cuda' means
    cuda:LOCAL_RANK."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CompressorError(f"device '{name}' requested but PyTorch sees no CUDA device")
        device = torch.device(name)
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    if name != "cpu":
        raise CompressorError(f"unknown device '{name}' (auto, cpu, cuda or cuda:N)")
    return torch.device("cpu")


def init_distributed(device: str | None = "auto") -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU), else a single process.

    A process group that already exists (e.g. created by a test) is used as is.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    if world_size <= 1:
        return DistContext(device=resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(device, local_rank)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
        owns = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=torch_device, owns_group=owns)


def shutdown_distributed(ctx: DistContext) -> None:
    """Leave the process group if this context created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()

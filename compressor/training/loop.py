"""The training loop: SGD with a cosine, one-cycle or constant schedule, bf16 autocast on CUDA, DDP under torchrun,
and hooks through which a method shapes training.

A method plugs in with a TrainHooks object: `make_optimizer` replaces SGD (GSM), `penalty` adds a term to the loss,
`after_step` acts on the weights after every optimizer step (AMSC's proximal step, re-applying a pruning mask),
`after_training` runs once at the end (GSM's finalize), `loss` replaces the cross-entropy (distillation). Hooks
always see the plain model, never the DDP wrapper.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from compressor.errors import CompressorError
from compressor.training.data import CifarData
from compressor.training.distributed import DistContext

SCHEDULES = ("cosine", "onecycle", "onecycle-torch", "constant")
# onecycle-torch: torch.optim.lr_scheduler.OneCycleLR with its defaults (30% cosine warm-up from lr/25, cosine down to
# lr/2.5e5, momentum cycled 0.95 -> 0.85 -> 0.95), stepped by the loop after every optimizer step
LogFn = Callable[[str], None]
ProgressFn = Callable[[int, int, str], None]  # (done, total, what): e.g. compressor.bench_report.progress_bar


@dataclass
class TrainConfig:
    """Optimization settings. batch_size is global (split over the processes); lr is the peak learning rate."""

    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    seed: int = 0
    bf16: bool = True
    channels_last: bool = True
    eval_every: int = 1
    eval_batch_size: int = 1000

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise CompressorError(f"unknown schedule '{self.schedule}' (choose from: {', '.join(SCHEDULES)})")
        if self.epochs < 0 or self.batch_size < 1 or self.lr < 0:
            raise CompressorError(f"bad training settings: epochs {self.epochs}, batch size {self.batch_size}, lr {self.lr}")

    def as_dict(self) -> dict:
        """JSON-able settings."""
        return asdict(self)


class TrainHooks:
    """Extension points of the loop; every method here does nothing by default."""

    def make_optimizer(self, model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer | None:
        """An optimizer to use instead of SGD (its param groups' 'lr' follow the schedule), or None."""
        return None

    def loss(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """A loss to use instead of the cross-entropy of the logits (e.g. distillation), or None."""
        return None

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the loss of every step, or None."""
        return None

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> None:
        """Called after every optimizer step with the learning rate of that step."""

    def after_training(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """Called once after the last step; a dict returned here lands in the training result."""
        return None


@dataclass
class TrainResult:
    """What a training run did: per-epoch records, final validation top-1, seconds, and hook results."""

    history: list[dict]
    val_top1: float | None
    seconds: float
    steps: int
    extra: dict


def learning_rate(config: TrainConfig, progress: float) -> float:
    """The learning rate at `progress` in [0, 1] of the run (linear warmup first, if any); onecycle-torch is not
    computed here: torch's scheduler sets it (torch_onecycle)."""
    total = max(config.epochs, 1e-9)
    warm = min(config.warmup_epochs / total, 1.0)
    if config.schedule == "onecycle":
        start, peak_at, final = config.lr / 25.0, max(warm, 0.25), config.lr / 1e4
        if progress < peak_at:
            return start + (config.lr - start) * progress / peak_at
        t = (progress - peak_at) / max(1.0 - peak_at, 1e-9)
        return final + 0.5 * (config.lr - final) * (1.0 + math.cos(math.pi * t))
    if warm > 0 and progress < warm:
        return config.lr * progress / warm
    if config.schedule == "constant":
        return config.lr
    t = (progress - warm) / max(1.0 - warm, 1e-9)
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * min(t, 1.0)))


def sgd_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum (nesterov optional) and weight decay on every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0,
                           weight_decay=config.weight_decay)


def torch_onecycle(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """torch's OneCycleLR with its defaults and config.lr as the peak, over `total_steps` optimizer steps (it cycles
    the momentum too, so the optimizer needs one)."""
    if "momentum" not in optimizer.defaults or not config.momentum:
        raise CompressorError("the onecycle-torch schedule cycles the momentum: it needs SGD with momentum")
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=max(total_steps, 2))


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def evaluate(model: nn.Module, data: CifarData, split: str = "val", batch_size: int = 1000,
             ctx: DistContext | None = None) -> float:
    """Top-1 accuracy in percent on 'val' or 'test' (fp32, eval mode; sharded over the processes)."""
    images = getattr(data, f"{split}_images")
    labels = getattr(data, f"{split}_labels")
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=images.device)
    for start in range(rank * batch_size, len(labels), batch_size * world):
        x = data.normalize(images[start:start + batch_size])
        y = labels[start:start + batch_size]
        counts[0] += (model(x).argmax(1) == y).sum()
        counts[1] += len(y)
    if ctx:
        ctx.all_reduce_sum(counts)
    model.train(was_training)
    return 100.0 * float(counts[0] / counts[1]) if counts[1] > 0 else float("nan")


def train(model: nn.Module, data: CifarData, config: TrainConfig, hooks: Sequence[TrainHooks] = (),
          ctx: DistContext | None = None, log: LogFn | None = None, progress: ProgressFn | None = None) -> TrainResult:
    """Train `model` (already on data.device) for config.epochs; validation top-1 after every `eval_every` epochs.

    Under a multi-process DistContext the model trains wrapped in DistributedDataParallel; `model` itself is updated.
    `progress` (rank 0) is called after every step with (steps done, total steps, a status line).
    """
    ctx = ctx or DistContext(device=data.device)
    say = log if (log and ctx.is_main) else (lambda _text: None)
    if config.channels_last and data.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    replacements = [opt for opt in (h.make_optimizer(model, config) for h in hooks) if opt is not None]
    if len(replacements) > 1:
        raise CompressorError("two training hooks both replace the optimizer")
    optimizer = replacements[0] if replacements else sgd_optimizer(model, config)
    net = _wrap_ddp(model, ctx)
    steps_per_epoch = data.steps_per_epoch(config.batch_size)
    total_steps = max(steps_per_epoch * config.epochs, 1)
    scheduler = torch_onecycle(optimizer, config, total_steps) if config.schedule == "onecycle-torch" else None
    memory_format = torch.channels_last if config.channels_last and data.device.type == "cuda" else torch.contiguous_format
    history, step, started, val_top1 = [], 0, time.perf_counter(), None
    model.train()
    for epoch in range(config.epochs):
        epoch_start = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=data.device)  # loss * n, correct, n
        for x, y in data.train_batches(epoch, config.batch_size, config.seed, ctx.rank, ctx.world_size):
            if scheduler is None:
                lr = learning_rate(config, step / total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            else:
                lr = optimizer.param_groups[0]["lr"]
            with _autocast(data.device, config.bf16):
                x = x.contiguous(memory_format=memory_format)
                logits = net(x)
                loss = _task_loss(hooks, x, y, logits)
            total = loss
            for hook in hooks:
                extra = hook.penalty(model)
                if extra is not None:
                    total = total + extra
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            if scheduler is not None and step + 1 < total_steps:
                scheduler.step()
            for hook in hooks:
                hook.after_step(model, optimizer, lr)
            with torch.no_grad():
                sums[0] += loss.detach().double() * len(y)
                sums[1] += (logits.argmax(1) == y).sum()
                sums[2] += len(y)
            step += 1
            if progress and ctx.is_main:
                progress(step, total_steps, f"epoch {epoch + 1}/{config.epochs}")
        ctx.all_reduce_sum(sums)
        record = {"epoch": epoch + 1,
                  "lr": learning_rate(config, step / total_steps) if scheduler is None else optimizer.param_groups[0]["lr"],
                  "train_loss": float(sums[0] / sums[2].clamp(min=1)), "train_top1": 100.0 * float(sums[1] / sums[2].clamp(min=1)),
                  "seconds": time.perf_counter() - epoch_start}
        if config.eval_every and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            val_top1 = record["val_top1"] = evaluate(model, data, "val", config.eval_batch_size, ctx)
        history.append(record)
        say(f"epoch {epoch + 1}/{config.epochs}  loss {record['train_loss']:.4f}  train {record['train_top1']:.2f}%"
            + (f"  val {record['val_top1']:.2f}%" if "val_top1" in record else "") + f"  {record['seconds']:.1f}s")
    extra: dict = {}
    for hook in hooks:
        extra.update(hook.after_training(model, optimizer) or {})
    model.to(memory_format=torch.contiguous_format)
    return TrainResult(history, val_top1, time.perf_counter() - started, step, extra)


def _task_loss(hooks: Sequence[TrainHooks], images: torch.Tensor, labels: torch.Tensor,
               logits: torch.Tensor) -> torch.Tensor:
    replacements = [loss for loss in (h.loss(images, labels, logits) for h in hooks) if loss is not None]
    if len(replacements) > 1:
        raise CompressorError("two training hooks both replace the loss")
    return replacements[0] if replacements else F.cross_entropy(logits.float(), labels)


def _wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)

"""`compress finetune` as a library call: fine-tune a compressed ONNX model with distillation from its original.

SLIM.onnx and the teacher become PyTorch modules (compressor.training.onnx_module), the data becomes device-resident
tensors (compressor.training.image_folder), the shared loop trains the student with DistillHooks (bf16 autocast on
CUDA, DDP under torchrun) with a BatchNorm after every Conv that is folded back at the end
(compressor.training.conv_batchnorm), and the trained values are written back into SLIM.onnx's own graph: same nodes, same
channel counts, same MACs (asserted). The written model is checked against the PyTorch module on real images with
the tolerance of compressor.training.export.check_outputs before anything is saved.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compressor.errors import CompressorError, VerificationError
from compressor.files import PendingWrites, check_output_paths, model_outputs
from compressor.training.conv_batchnorm import fold_batchnorms, insert_batchnorms
from compressor.training.distill import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, DistillHooks
from compressor.training.distributed import init_distributed, shutdown_distributed
from compressor.training.export import check_outputs, onnx_logits, torch_logits
from compressor.training.image_folder import load_image_data
from compressor.training.loop import LogFn, ProgressFn, TrainConfig, evaluate, train
from compressor.training.onnx_module import OnnxModule, convert_onnx, write_back

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class FinetuneJob:
    """Everything `compress finetune` needs. `teacher` None fine-tunes on the labels alone."""

    student: str
    data: str
    out: str
    teacher: str | None = None
    val: str | None = None
    report: str | None = None
    config: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=0.01, warmup_epochs=1.0))
    temperature: float = DEFAULT_TEMPERATURE
    alpha: float = DEFAULT_ALPHA
    image_size: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    device: str = "auto"
    limit: int | None = None
    verify_images: int = 256
    batchnorm: bool = True
    command: str = ""

    def check_paths(self) -> None:
        """Inputs exist; outputs are neither an input nor each other (raised before any work)."""
        inputs = {"SLIM model": self.student, "--teacher": self.teacher}
        for what, path in inputs.items():
            if path is not None and not Path(path).is_file():
                raise CompressorError(f"{what} not found: {path}")
        for what, path in (("--data", self.data), ("--val", self.val)):
            if path is not None and not Path(path).is_dir():
                raise CompressorError(f"{what} is not a folder: {path}")
        check_output_paths([p for p in (self.student, self.teacher) if p is not None],
                           {**model_outputs(self.out), "--report": self.report})
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise CompressorError("--mean and --std take three numbers (std > 0)")


def _image_size(student: OnnxModule, requested: int | None) -> tuple[int, int]:
    shape = student.input_shape()
    if len(shape) != 4 or shape[1] not in (3, None):
        raise CompressorError(f"the model's input {shape} is not an NCHW image batch with 3 channels")
    height, width = shape[2], shape[3]
    if requested is not None:
        if (height or requested, width or requested) != (requested, requested):
            raise CompressorError(f"--image-size {requested} differs from the model's input {height}x{width}")
        return requested, requested
    if height is None or width is None:
        raise CompressorError("the model's input size is dynamic: give --image-size")
    return height, width


def _output_count(converted: OnnxModule, size: tuple[int, int], what: str) -> int:
    """Classes of a classifier, probed on a batch of two (which also proves the batch axis is free)."""
    try:
        with torch.no_grad():
            logits = converted.module.eval()(torch.zeros(2, 3, *size))
    except Exception as exc:  # noqa: BLE001 - a static batch surfaces as many kinds of errors
        raise CompressorError(f"{what} does not run on a batch of 2 in PyTorch ({type(exc).__name__}); "
                              "export it with a dynamic batch axis") from exc
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != 2:
        raise CompressorError(f"{what} is not a classifier with one [batch, classes] output")
    return int(logits.shape[1])


def _check_conversion(converted: OnnxModule, data, what: str, count: int = 64) -> None:
    """The converted module must compute what ONNX Runtime computes on real images, before any training."""
    images = data.normalize(data.train_images[:count]).cpu()
    check_outputs(onnx_logits(converted.proto, images.numpy()), torch_logits(converted.module, images),
                  f"{what} converted to PyTorch")


def _calibration_batches(data, count: int = 1024, batch_size: int = 256):
    """The first `count` train images, normalized, in batches (the statistics the inserted BatchNorms start from)."""
    images = data.train_images[:count]
    return (data.normalize(images[i:i + batch_size]) for i in range(0, len(images), batch_size))


def _top1(module: torch.nn.Module, data, ctx) -> float | None:
    return evaluate(module, data, "test", ctx=ctx) if len(data.test_labels) else None


def run_finetune(job: FinetuneJob, log: LogFn | None = print, progress: ProgressFn | None = None) -> dict:
    """Run one fine-tune; writes job.out (and job.report) on rank 0 and returns the report."""
    job.check_paths()
    started = time.perf_counter()
    ctx = init_distributed(job.device)
    say = log if (log and ctx.is_main) else (lambda _text: None)
    try:
        student = convert_onnx(job.student, conv_biases=job.batchnorm)
        teacher = convert_onnx(job.teacher, trainable=False) if job.teacher else None
        size = _image_size(student, job.image_size)
        classes = _output_count(student, size, "the SLIM model")
        if teacher is not None and _output_count(teacher, size, "the teacher") != classes:
            raise CompressorError("the teacher and the SLIM model have different numbers of outputs")
        data = load_image_data(job.data, job.val, size, ctx.device, job.mean, job.std, job.limit)
        if data.classes and len(data.classes) != classes:
            raise CompressorError(f"the data has {len(data.classes)} classes, the model {classes} outputs")
        if teacher is None and not data.classes:
            raise CompressorError("unlabeled data needs a --teacher to distill from")
        _check_conversion(student, data, "the SLIM model")
        if teacher is not None:
            _check_conversion(teacher, data, "the teacher")
        say(f"data: {data.sizes()['train']} train, {data.sizes()['test']} eval images at {size[0]}x{size[1]}, "
            f"{len(data.classes) or 'no'} classes, on {ctx.device}; {ctx.world_size} process(es); "
            f"{student.trainable_elements()} trainable parameters, {len(student.frozen)} tensors frozen")
        student.module.to(ctx.device)
        if teacher is not None:
            teacher.module.to(ctx.device)
        report: dict = {"command": job.command, "student": job.student, "teacher": job.teacher, "data": job.data,
                        "val": job.val, "device": str(ctx.device), "world_size": ctx.world_size,
                        "images": data.sizes(), "classes": classes, "config": job.config.as_dict(),
                        "temperature": job.temperature, "alpha": job.alpha if teacher is not None else None,
                        "trainable_params": student.trainable_elements(), "frozen_tensors": student.frozen,
                        "top1_before": _top1(student.module, data, ctx),
                        "teacher_top1": _top1(teacher.module, data, ctx) if teacher is not None else None}
        if report["top1_before"] is not None:
            say(f"before: top-1 {report['top1_before']:.2f}%"
                + (f"  (teacher {report['teacher_top1']:.2f}%)" if teacher is not None else ""))
        config = job.config if len(data.val_labels) else TrainConfig(**{**job.config.as_dict(), "eval_every": 0})
        hooks = [DistillHooks(teacher.module, job.temperature, job.alpha)] if teacher is not None else []
        wrapped = insert_batchnorms(student.module, student.convs, _calibration_batches(data)) if job.batchnorm else []
        report["batchnorms_inserted"] = len(wrapped)
        result = train(student.module, data, config, hooks, ctx, say, progress)
        fold_batchnorms(student.module, wrapped)
        report.update({"history": result.history, "train_seconds": result.seconds, "steps": result.steps,
                       "top1_after": _top1(student.module, data, ctx)})
        if report["top1_after"] is not None:
            say(f"after: top-1 {report['top1_after']:.2f}% (before {report['top1_before']:.2f}%)")
        if ctx.is_main:
            with PendingWrites() as pending:
                report.update(_stage_model(job, student, data, pending))
                report["seconds"] = time.perf_counter() - started
                if job.report:
                    pending.stage_text(job.report, json.dumps(report, indent=1, default=str) + "\n")
                pending.commit()
        ctx.barrier()
        return report
    finally:
        shutdown_distributed(ctx)


def _stage_model(job: FinetuneJob, student: OnnxModule, data, pending: PendingWrites) -> dict:
    """Write the trained values into SLIM.onnx's graph, assert its MACs, check it against PyTorch, stage it."""
    from compressor.engine.cost import model_cost

    proto = write_back(student)
    macs_before, macs_after = model_cost(student.proto).macs, model_cost(proto).macs
    if macs_after != macs_before:
        raise VerificationError(f"the fine-tuned model has {macs_after} MACs, the SLIM model {macs_before}")
    images = data.test_images if len(data.test_labels) else data.train_images
    images = data.normalize(images[: job.verify_images]).cpu()
    check = check_outputs(torch_logits(student.module, images), onnx_logits(proto, images.numpy()),
                          f"fine-tuned model {Path(job.out).name}")
    pending.stage_model(proto, job.out)
    return {"out": str(job.out), "macs": int(macs_after), "check": check}


def summary_line(report: dict) -> str:
    """One line for the terminal: accuracy before/after (when measured), MACs and the output path."""
    accuracy = ""
    if report.get("top1_after") is not None:
        accuracy = f"top-1 {report['top1_before']:.2f}% -> {report['top1_after']:.2f}%  "
    return f"{accuracy}MACs {report['macs']:,} (unchanged)  wrote {report['out']}"


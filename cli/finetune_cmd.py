"""`compress finetune SLIM.onnx --teacher ORIGINAL.onnx --data DIR -o OUT.onnx`: recover the accuracy of a
compressed ONNX model by distillation from its original (PyTorch through onnx2torch; the graph is kept)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import command_line

app = typer.Typer(add_completion=False, help="Fine-tune a compressed ONNX model with distillation from the original.")


def _three_floats(text: str, option: str) -> tuple[float, ...]:
    from compressor.errors import CompressorError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise CompressorError(f"{option} takes three comma-separated numbers, got '{text}'") from None
    if len(values) != 3:
        raise CompressorError(f"{option} takes three comma-separated numbers, got '{text}'")
    return values


@app.command()
def finetune(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="The compressed ONNX model (SLIM.onnx)."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="The original ONNX model to distill from."),
    data: Path = typer.Option(..., "--data", help="ImageFolder tree (one folder per class; or images without labels) "
                                                  "or a folder with cifar10-train.tar.xz."),
    out: Path = typer.Option(..., "--out", "-o", help="The fine-tuned ONNX model (same graph and MACs as SLIM.onnx)."),
    val: Optional[Path] = typer.Option(None, "--val", help="Labeled ImageFolder tree for accuracy before/after "
                                                           "[the CIFAR-10 test tarball for CIFAR data]."),
    report: Optional[Path] = typer.Option(None, "--report", help="JSON report: accuracy, history, checks."),
    epochs: int = typer.Option(10, "--epochs"),
    batch_size: int = typer.Option(256, "--batch-size", help="Global batch size."),
    lr: float = typer.Option(0.01, "--lr", help="Peak learning rate (SGD, nesterov, cosine)."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay"),
    warmup_epochs: float = typer.Option(1.0, "--warmup-epochs"),
    temperature: float = typer.Option(4.0, "--temperature", help="Distillation temperature T."),
    alpha: float = typer.Option(0.9, "--alpha", help="Weight of the distillation term (1 - alpha: cross-entropy)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Input size when the model's is dynamic."),
    mean: str = typer.Option("0.485,0.456,0.406", "--mean", help="Per-channel mean of the model's preprocessing."),
    std: str = typer.Option("0.229,0.224,0.225", "--std", help="Per-channel std of the model's preprocessing."),
    batchnorm: bool = typer.Option(True, "--batchnorm/--no-batchnorm",
                                   help="Train with a BatchNorm after every Conv, folded back into it at the end."),
    bf16: bool = typer.Option(True, "--bf16/--no-bf16", help="bf16 autocast on CUDA."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only this many images per split (smoke runs)."),
    seed: int = typer.Option(0, "--seed"),
    verify_images: int = typer.Option(256, "--verify-images", help="Real images on which ONNX must equal PyTorch."),
) -> None:
    """Fine-tune SLIM.onnx on DIR with knowledge distillation from --teacher (one GPU, or several under torchrun)."""
    import warnings

    from compressor.runtime.report import progress_bar
    from compressor.training.finetune import FinetuneJob, run_finetune, summary_line
    from compressor.training.loop import TrainConfig

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         warmup_epochs=warmup_epochs, seed=seed, bf16=bf16)
    job = FinetuneJob(student=str(model), teacher=str(teacher) if teacher else None, data=str(data), out=str(out),
                      val=str(val) if val else None, report=str(report) if report else None, config=config,
                      temperature=temperature, alpha=alpha, image_size=image_size,
                      mean=_three_floats(mean, "--mean"), std=_three_floats(std, "--std"), device=device,
                      limit=limit, verify_images=verify_images, batchnorm=batchnorm,
                      command=command_line(ctx, "compress finetune"))
    # onnx2torch's Slice indexes with a list (a deprecation warning per call site, not a user matter)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"onnx2torch\.")
    with progress_bar(every_s=30.0) as progress:
        result = run_finetune(job, log=lambda text: typer.echo(text, err=True), progress=progress)
    if "out" in result:
        typer.echo(summary_line(result))

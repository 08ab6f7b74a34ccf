"""`compress train`: train or fine-tune in PyTorch (plain, with a mask from an engine method, AMSC or GSM), then
write OUT.pt, OUT.onnx (dense), OUT.slim.onnx (zeros removed, checked against PyTorch) and OUT.json."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import command_line

app = typer.Typer(add_completion=False, help="Train or fine-tune a model in PyTorch (optionally with AMSC/GSM/a mask), export ONNX.")


def _floats(text: Optional[str], option: str) -> Optional[tuple[float, ...]]:
    if not text:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        from compressor.errors import CompressorError

        raise CompressorError(f"{option} takes comma-separated numbers, got '{text}'") from None


@app.command()
def train(
    ctx: typer.Context,
    model: str = typer.Option("resnet56", "--model", help="resnet8|20|32|44|56|110, vgg16_bn, or tv:NAME (torchvision, random init)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Checkpoint to start from (published .th or our .pt)."),
    data: Path = typer.Option(..., "--data", help="Folder with cifar10-train.tar.xz and cifar10-test.tar.xz."),
    out: Path = typer.Option(..., "--out", "-o", help="Output prefix: writes OUT.pt, OUT.onnx, OUT.slim.onnx, OUT.json."),
    epochs: int = typer.Option(10, "--epochs", help="Epochs of training / fine-tuning (after the sparse phase)."),
    method: str = typer.Option("none", "--method", help="none | amsc | gsm."),
    prune: Optional[str] = typer.Option(None, "--prune", help="Engine method (e.g. graph-rw, l1) whose plan becomes a frozen mask."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Fraction of MACs to remove (--prune, gsm structured, amsc search)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Global batch size."),
    lr: float = typer.Option(0.05, "--lr", help="Peak learning rate."),
    momentum: float = typer.Option(0.9, "--momentum"),
    nesterov: bool = typer.Option(True, "--nesterov/--no-nesterov"),
    weight_decay: float = typer.Option(1e-4, "--weight-decay"),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine | onecycle | onecycle-torch (torch OneCycleLR with its defaults: momentum cycled 0.95-0.85) | constant."),
    warmup_epochs: float = typer.Option(0.0, "--warmup-epochs"),
    bf16: bool = typer.Option(True, "--bf16/--no-bf16", help="bf16 autocast on CUDA."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only this many train and test images (smoke runs)."),
    val_size: int = typer.Option(5000, "--val-size", help="Train images held out for validation (the same images whatever --seed)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    seed: int = typer.Option(0, "--seed"),
    exporter: str = typer.Option("auto", "--exporter", help="auto (dynamo when onnxscript is installed) | dynamo | torchscript."),
    verify_images: int = typer.Option(1000, "--verify-images", help="Test images on which the ONNX outputs must equal PyTorch's."),
    amsc: str = typer.Option("both", "--amsc", help="AMSC dimensions: both | depth-only | width-only."),
    amsc_weights: str = typer.Option("adaptive", "--amsc-weights", help="adaptive | uniform | reverse."),
    lambda_depth: Optional[float] = typer.Option(None, "--lambda-depth", help="lambda0 (without --search)."),
    lambda_width: Optional[float] = typer.Option(None, "--lambda-width", help="lambda1 (without --search)."),
    search: bool = typer.Option(False, "--search", help="Choose lambda0 then lambda1 on the validation split."),
    max_drop: float = typer.Option(1.0, "--max-drop", help="Accuracy points the search may lose (without --ratio)."),
    grid_points: int = typer.Option(4, "--grid-points", help="Points of the automatic log grid per stage."),
    refine: int = typer.Option(2, "--refine", help="Log-bisection steps after the grid, per stage."),
    depth_grid: Optional[str] = typer.Option(None, "--depth-grid", help="Explicit lambda0 grid, comma-separated."),
    width_grid: Optional[str] = typer.Option(None, "--width-grid", help="Explicit lambda1 grid, comma-separated."),
    sparse_epochs: int = typer.Option(3, "--sparse-epochs", help="Epochs of each AMSC trial / of GSM before fine-tuning."),
    sparse_lr: Optional[float] = typer.Option(None, "--sparse-lr", help="Constant learning rate of the sparse phase [--lr]."),
    subgradient: bool = typer.Option(False, "--subgradient", help="AMSC: penalty in the loss instead of the proximal step."),
    gsm: str = typer.Option("structured", "--gsm", help="GSM mode: structured | unstructured."),
    gsm_momentum: float = typer.Option(0.98, "--gsm-momentum"),
    gsm_decay: float = typer.Option(1e-4, "--gsm-decay"),
    depth_share: float = typer.Option(1.0, "--depth-share", help="AMSC both + --ratio: largest share of the MAC target the depth stage may take."),
    recover_epochs: int = typer.Option(1, "--recover-epochs", help="AMSC: fine-tune epochs judging each lambda trial."),
    distill: Optional[Path] = typer.Option(None, "--distill", help="Teacher checkpoint (e.g. the dense baseline .pt): the fine-tune distills from it."),
    kd_temperature: float = typer.Option(4.0, "--kd-temperature", help="Distillation temperature T."),
    kd_weight: float = typer.Option(0.9, "--kd-weight", help="Weight of the distillation term (the labels' cross-entropy gets 1 - weight)."),
    target: str = typer.Option("macs", "--target", help="--prune plan: macs | params | latency (measured on --latency-device)."),
    latency_device: Optional[str] = typer.Option(None, "--latency-device", help="--target latency: cuda[:N] or cpu:T."),
    latency_batch: Optional[int] = typer.Option(None, "--latency-batch", help="--target latency: batch size timed."),
    profile_budget: Optional[float] = typer.Option(None, "--profile-budget", help="--target latency: seconds of profiling."),
    round_to: int = typer.Option(1, "--round-to", help="--prune plan: keep channel counts at multiples of N."),
    method_option: Optional[list[str]] = typer.Option(None, "--method-option", help="--prune plan: KEY=VALUE for the method (e.g. rw_normalize=true)."),
    mask_ramp_epochs: float = typer.Option(0.0, "--mask-ramp-epochs", help="--prune: start the fine-tune from the unpruned model and shrink the pruned structures linearly to zero over this many epochs (0: zero from the start)."),
    calib_count: int = typer.Option(0, "--calib-count", help="--prune plan calibrated on N seeded train images (data-aware importance + measured allocation, no reconstruction); 0: off."),
) -> None:
    """Train or fine-tune on CIFAR-10 (one GPU, or several under torchrun), export and slim the ONNX model."""
    from compressor.errors import CompressorError
    from compressor.training.amsc_search import AmscOptions
    from compressor.training.loop import TrainConfig
    from compressor.training.pipeline import TrainJob, run_job

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs, seed=seed, bf16=bf16)
    amsc_options = AmscOptions(dims=amsc, weighting=amsc_weights, lambda_depth=lambda_depth, lambda_width=lambda_width,
                               search=search, max_drop=max_drop, grid_points=grid_points, refine=refine,
                               depth_grid=_floats(depth_grid, "--depth-grid"), width_grid=_floats(width_grid, "--width-grid"),
                               sparse_epochs=sparse_epochs, sparse_lr=sparse_lr, penalty_in_loss=subgradient,
                               depth_share=depth_share, recover_epochs=recover_epochs)
    options = {key: value for key, value in (item.split("=", 1) for item in method_option or () if "=" in item)}
    if len(options) != len(method_option or ()):
        raise CompressorError("--method-option takes KEY=VALUE")
    prune_options = {"target": target, "round_to": round_to, "method_options": options,
                     **{k: v for k, v in (("device", latency_device), ("batch", latency_batch),
                                          ("profile_budget", profile_budget)) if v is not None}}
    job = TrainJob(model=model, data=str(data), out=str(out), init=str(init) if init else None, method=method,
                   prune=prune, ratio=ratio, config=config, amsc=amsc_options, gsm_mode=gsm, gsm_epochs=sparse_epochs,
                   gsm_momentum=gsm_momentum, gsm_decay=gsm_decay, gsm_lr=sparse_lr, limit=limit, val_size=val_size,
                   prune_options=prune_options, distill=str(distill) if distill else None, kd_temperature=kd_temperature,
                   kd_weight=kd_weight, mask_ramp_epochs=mask_ramp_epochs, device=device, calib_count=calib_count, exporter=exporter, verify_images=verify_images,
                   command=command_line(ctx, "compress train"))
    metrics = run_job(job, log=lambda text: typer.echo(text, err=True))
    if metrics.get("macs_before") is not None:
        typer.echo(f"test top-1 {metrics['test_top1']:.2f}%  MACs -{100 * metrics['macs_reduction']:.1f}%  "
                   f"wrote {metrics['export']['slim_onnx']} and its .pt/.onnx/.json siblings")

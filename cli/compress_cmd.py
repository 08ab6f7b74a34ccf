"""The main command: `compress MODEL.onnx --method M --ratio R -o OUT.onnx`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cli.common import fail, usage_epilog
from cli.progress_text import counted_step, with_bar
from cli.ship_options import build_precision_options, check_ship_paths, print_ship_summary, stage_triton

app = typer.Typer(add_completion=False, rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.2f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.2f}P"


def _parse_method_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"bad --method-option '{item}' (expected KEY=VALUE)")
        options[key.replace("-", "_")] = value
    return options


def print_summary(report: dict, output: Path) -> None:
    """Human summary of a compression report on stdout."""
    def line(label, before, after, fmt=_human):
        change = (1 - after / before) * 100 if before else 0.0
        typer.echo(f"  {label:<7} {fmt(before):>10} -> {fmt(after):>10}  (-{change:.1f}%)")

    typer.echo(f"compressed with {report['method']} -> {output}")
    line("MACs", report["macs_before"], report["macs_after"])
    line("params", report["params_before"], report["params_after"])
    line("bytes", report["bytes_before"], report["bytes_after"])
    typer.echo(f"  groups pruned {report['groups_pruned']}/{report['groups_total']}, "
               f"blocks dropped {len(report['blocks_removed'])}/{report['blocks_total']}")
    if report["verified"] and report["method"] == "zeros":
        typer.echo(f"  verified: equals the original up to float rounding (relative error "
                   f"{report['relative_error_vs_reference']:.2g}, tolerance {report['relative_tolerance']:.2g})")
    elif report["verified"]:
        typer.echo(f"  verified: relative error {report['relative_error_vs_reference']:.2g} against the reference, "
                   f"the original with the removed channels zeroed (tolerance {report['relative_tolerance']:.2g})")
        typer.echo(f"  outputs differ from the unpruned original by {report['relative_error_vs_original']:.2g} "
                   f"(relative): expected, the removed channels carried signal; fine-tuning recovers it")
    else:
        typer.echo("  verification skipped (--no-verify): checker and shape inference passed")
    latency = report.get("latency")
    if latency:
        timed = latency.get("timed_as") or latency.get("precision") or "fp32"
        typer.echo(f"  latency on {latency['device']} batch {latency['batch']} ({timed}): budget {latency['budget_ms']:.4g} ms, "
                   f"predicted {latency['predicted_ms']:.4g} ms, measured {latency['measured_before_ms']:.4g} -> "
                   f"{latency['measured_after_ms']:.4g} ms (x{latency['measured_speedup']:.2f}), predictor error "
                   f"{latency['predictor_error']:+.1%}{'  [over 10%]' if latency['flagged'] else ''}")
    calibration = report.get("calibration")
    if calibration:
        print_calibration(calibration)
    for note in report["notes"]:
        typer.echo(f"  note: {note}")
    print_ship_summary(report)


def print_calibration(calibration: dict) -> None:
    """Summary lines of the report's calibration section."""
    line = f"  calibration: {calibration['fit_samples']} samples fitted, {calibration['held_out_samples']} held out"
    if calibration.get("reconstructed"):
        line += f"; {calibration['layers_refitted']}/{len(calibration['layers'])} layers refitted"
    typer.echo(line)
    held = calibration.get("held_out")
    if held:
        for key in ("pruned", "reconstructed"):
            if key in held:
                top1 = held[key]["top1_agreement"]
                agree = f"top-1 agreement {top1:.1%}, " if top1 is not None else ""
                typer.echo(f"    {key:<13} vs original on held-out: {agree}relative output error {held[key]['relative_error']:.3g}")


@app.command(epilog=usage_epilog())
def compress(
    model: Path = typer.Argument(..., metavar="MODEL.onnx", help="Input ONNX model (never modified)."),
    method: str = typer.Option("l1", "--method", "-m", help="Scoring/planning method: zeros, l1, l2, random, graph-rw, ..."),
    ratio: Optional[float] = typer.Option(None, "--ratio", "-r", help="Fraction of --target to remove, in (0, 1). Not used by zeros."),
    output: Path = typer.Option(..., "--output", "-o", help="Output ONNX path (written atomically)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report here."),
    target: str = typer.Option("macs", "--target", help="What --ratio removes: macs, params or latency (measured on --device at --batch)."),
    round_to: int = typer.Option(1, "--round-to", help="Kept channel counts are multiples of N where the layer is wide enough."),
    min_channels: int = typer.Option(1, "--min-channels", help="Keep at least this many channels per group."),
    exclude: list[str] = typer.Option([], "--exclude", help="Never prune groups/blocks whose node or weight name matches (glob or substring)."),
    seed: int = typer.Option(0, "--seed", help="Seed for random choices."),
    input_shape: list[str] = typer.Option([], "--input-shape", help="Concrete input shape NAME:1x3x224x224 (dynamic dims default to 1)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the ONNX Runtime comparison (checker still runs)."),
    method_option: list[str] = typer.Option([], "--method-option", "-O", help="Method option KEY=VALUE (repeatable)."),
    rw_edges: Optional[str] = typer.Option(None, "--rw-edges", help="graph-rw: regression or pairwise edges."),
    lis: Optional[str] = typer.Option(None, "--lis", help="graph-rw: layer importance score, sum or max."),
    layer_rates: Optional[str] = typer.Option(None, "--layer-rates", help="graph-rw: rmt, uniform or global."),
    device: Optional[str] = typer.Option(None, "--device", help="--target latency: where latency is measured, cuda[:N] or cpu:T (default: cuda if available, else cpu:1)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="--target latency: the deployed batch size (default 1)."),
    latency_ms: Optional[float] = typer.Option(None, "--latency-ms", help="--target latency: an absolute budget in ms instead of --ratio."),
    profile_budget: Optional[float] = typer.Option(None, "--profile-budget", help="--target latency: at most this many seconds of latency profiling (coarser tables when short)."),
    bench: list[str] = typer.Option([], "--bench", help="After compressing, measure original vs result on TARGET (cuda, cpu:T; repeatable)."),
    bench_batch: int = typer.Option(1, "--bench-batch", help="Batch size for --bench."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or int8 (QDQ): converted after surgery and compared with the fp32 result."),
    precision_calib: Optional[Path] = typer.Option(None, "--precision-calib", help="Real inputs (.npy, or .npz per input name) for int8 ranges and the precision comparison."),
    exclude_quant: list[str] = typer.Option([], "--exclude-quant", help="Keep nodes matching PATTERN (node or weight name) in fp32 under --precision fp16/int8 (repeatable)."),
    keep_io_types: bool = typer.Option(True, "--keep-io-types/--no-keep-io-types", help="fp16: keep fp32 graph inputs and outputs."),
    fp16_keep_op: list[str] = typer.Option([], "--fp16-keep-op", help="fp16: keep every node of this op type in fp32, on top of ONNX Runtime's default list (repeatable, e.g. Resize)."),
    int8_activations: str = typer.Option("uint8", "--int8-activations", help="int8: activation type uint8 (U8S8) or int8 (S8S8); measure on the target."),
    precision_max_error: Optional[float] = typer.Option(None, "--precision-max-error", help="Refuse when the relative output error vs fp32 exceeds this (default fp16 0.01, int8 0.25)."),
    precision_min_agreement: Optional[float] = typer.Option(None, "--precision-min-agreement", help="Refuse when top-1 agreement with fp32 is below this (default fp16 0.98, int8 0.90)."),
    triton_repo: Optional[Path] = typer.Option(None, "--triton-repo", help="Also write the result as a Triton model repository here (name: the output's stem)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no summary."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration data: an image folder (recursive), a .npy array (single input) or a .npz (one array per input name)."),
    calib_size: Optional[str] = typer.Option(None, "--calib-size", help="Images: resize and center-crop to N or HEIGHTxWIDTH (default: the model's input size)."),
    calib_mean: Optional[str] = typer.Option(None, "--calib-mean", help="Images: per-channel mean of pixels in [0, 1] (default ImageNet 0.485,0.456,0.406)."),
    calib_std: Optional[str] = typer.Option(None, "--calib-std", help="Images: per-channel std (default ImageNet 0.229,0.224,0.225)."),
    calib_order: str = typer.Option("rgb", "--calib-order", help="Images: channel order, rgb or bgr."),
    calib_layout: str = typer.Option("nchw", "--calib-layout", help="Images: input layout, nchw or nhwc."),
    calib_count: int = typer.Option(1024, "--calib-count", help="Use a seeded random subset of this many samples (--seed)."),
    reconstruct: Optional[bool] = typer.Option(None, "--reconstruct/--no-reconstruct", help="Refit the layers consuming removed channels on the calibration data (default: on with --calib)."),
) -> None:
    """Remove whole filters and residual blocks from MODEL and write a verified, smaller ONNX model."""
    from compressor import methods
    from compressor.api import compress as run_compress, compress_options
    from compressor.engine.loading import parse_input_shapes
    from compressor.files import PendingWrites, check_output_paths, model_outputs
    from compressor.runtime.targets import checked_targets

    if ratio is not None and latency_ms is not None:
        fail("give either --ratio or --latency-ms, not both")
    if methods.get(method).needs_ratio and ratio is None and latency_ms is None:
        fail("--ratio is required for this method (a fraction in (0, 1))")
    if not model.exists():
        fail(f"model file not found: {model}")
    check_output_paths([model] + ([calib] if calib is not None and calib.is_file() else []),
                       {**model_outputs(output), "--report": report})
    bench_targets = checked_targets(bench)
    options = _parse_method_options(method_option)
    for key, value in (("rw_edges", rw_edges), ("lis", lis), ("layer_rates", layer_rates)):
        if value is not None:
            options[key] = value
    shapes = parse_input_shapes(input_shape)
    precision_options = build_precision_options(exclude_quant, keep_io_types, int8_activations, precision_max_error,
                                                precision_min_agreement, fp16_keep_op, precision)
    check_ship_paths(model, output, precision, precision_calib, triton_repo, data=calib)
    plan_options, latency = compress_options(ratio, target=target, round_to=round_to, min_channels=min_channels,
                                             exclude=tuple(exclude), seed=seed, method_options=options, device=device,
                                             batch=batch, latency_ms=latency_ms, profile_budget=profile_budget)
    calib_options = None
    if calib is not None:
        from cli.calib_options import calibration_options

        calib_options = calibration_options(calib_size, calib_mean, calib_std, calib_order, calib_layout, calib_count, seed)
    elif reconstruct:
        fail("--reconstruct needs calibration data (--calib)")
    progress = StageProgress(quiet)
    try:
        result = run_compress(model, method, options=plan_options, latency=latency, input_shapes=shapes,
                              verify=not no_verify, progress=progress.update, precision=precision,
                              precision_calib=precision_calib, precision_options=precision_options, calib=calib,
                              calib_options=calib_options, reconstruct=reconstruct)
        triton = stage_triton(result, triton_repo, output.stem, shapes) if triton_repo is not None else None
        try:
            with PendingWrites() as pending:  # model and report appear together, or neither does
                staged = pending.stage_model(result.model, output)
                if bench_targets:
                    from compressor.runtime.bench import run_benchmark

                    progress.update("bench")
                    bench_report = run_benchmark([str(model), str(staged)], bench_targets, [bench_batch],
                                                 input_shapes=shapes or None, names=["original", "compressed"])
                    result.report["bench"] = bench_report.to_dict()
                if report is not None:
                    pending.stage_text(report, json.dumps(result.report, indent=2) + "\n")
                pending.commit()
        except BaseException:
            if triton is not None:
                triton.discard()
            raise
        if triton is not None:  # the repository lands once the model has
            triton.commit()
    finally:
        progress.stop()
    if not quiet:
        print_summary(result.report, output)
        if bench:
            typer.echo(bench_report.to_text())


class StageProgress:
    """Progress on stderr: a rich spinner naming the current stage on a terminal, else one line per stage."""

    def __init__(self, quiet: bool):
        self._status = None
        self._lines = False
        if not quiet:
            from rich.console import Console

            console = Console(stderr=True)
            if console.is_terminal:
                self._status = console.status("loading")
                self._status.start()
            else:
                self._lines = True
        self._counted: str | None = None
        self._step: int | None = None

    def update(self, stage: str) -> None:
        """Show that `stage` has started."""
        if self._status is not None:
            self._status.update(with_bar(stage))
        elif self._lines and self._worth_a_line(stage):
            typer.echo(f"compress: {stage}", err=True)

    def _worth_a_line(self, stage: str) -> bool:
        """Off a terminal, a counted stage ("reconstruct: level 3/55 ...") gets a line per tenth of its count."""
        name, step = counted_step(stage)
        if step is None or name != self._counted or step != self._step:
            self._counted, self._step = name, step
            return True
        return False

    def stop(self) -> None:
        """Remove the spinner."""
        if self._status is not None:
            self._status.stop()

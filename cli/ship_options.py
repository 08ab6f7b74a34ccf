"""CLI glue for the deployment options of the main command: precision settings and up-front path checks."""

from __future__ import annotations

from pathlib import Path

from cli.common import fail


def build_precision_options(exclude_quant: list[str], keep_io_types: bool, int8_activations: str,
                            max_error: float | None, min_agreement: float | None, fp16_keep_ops: list[str] = (),
                            precision: str = "fp32"):
    """The PrecisionOptions the main command's flags describe (bad values end the command with one line)."""
    from compressor.deploy.int8 import QUANT_TYPES
    from compressor.deploy.precision import PrecisionOptions

    if int8_activations not in QUANT_TYPES:
        fail(f"--int8-activations must be one of {', '.join(QUANT_TYPES)} (got '{int8_activations}')")
    if max_error is not None and not max_error > 0:
        fail(f"--precision-max-error must be positive (got {max_error})")
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        fail(f"--precision-min-agreement must be in [0, 1] (got {min_agreement})")
    if fp16_keep_ops and precision != "fp16":
        fail(f"--fp16-keep-op applies to --precision fp16 only (got --precision {precision})")
    return PrecisionOptions(keep_io_types=keep_io_types, exclude=tuple(exclude_quant), activation_type=int8_activations,
                            max_relative_error=max_error, min_top1_agreement=min_agreement,
                            fp32_ops=tuple(dict.fromkeys(fp16_keep_ops)))


def check_ship_paths(model: Path, output: Path, precision: str, calib: Path | None, triton_repo: Path | None,
                     data: Path | None = None) -> None:
    """Refuse, before any work, a bad precision request, a missing calibration file, or a Triton repository that
    would hold or overwrite the input model or the output; `data` (--calib) also gives int8 its ranges."""
    from compressor.deploy.precision import check_precision_request
    from compressor.deploy.triton_repo import check_repository_target

    check_precision_request(precision, calib is not None or data is not None)
    if calib is not None and not calib.is_file():
        fail(f"calibration file not found: {calib}")
    if calib is not None and output.exists() and calib.resolve() == output.resolve():
        fail("output path is the calibration file: choose another -o")
    if triton_repo is not None:
        check_repository_target(triton_repo, output.stem, 1, protected=[model, output])


def stage_triton(result, repo: Path, name: str, input_shapes: dict[str, list[int]]):
    """Stage and validate the compression result as a Triton model (committed once the output is written); its
    place goes into the report."""
    from compressor.deploy.triton_repo import stage_triton_model

    staged = stage_triton_model(result.model, repo, name, 1, input_shapes=input_shapes or None)
    result.report["triton"] = {"model_dir": str(staged.model_dir), "version": staged.version,
                               "run_shapes": staged.run_shapes}
    return staged


def print_ship_summary(report: dict) -> None:
    """The precision and Triton lines of the main command's summary."""
    import typer

    precision = report.get("precision")
    if precision and precision["precision"] != "fp32":
        agreement = precision["worst_top1_agreement"]
        shown = "" if agreement is None else f", top-1 agreement {agreement:.3f} (min {precision['min_top1_agreement']:g})"
        typer.echo(f"  {precision['precision']}: relative output error {precision['worst_relative_error']:.3g} vs fp32 "
                   f"(max {precision['max_relative_error']:g}){shown} on {precision['samples']} "
                   f"{precision['inputs']} samples")
    triton = report.get("triton")
    if triton:
        typer.echo(f"  triton: {triton['model_dir']} version {triton['version']} (validated, ran at {triton['run_shapes']})")

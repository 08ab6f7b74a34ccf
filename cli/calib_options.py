"""Parsing of the `--calib-*` options of the main command into CalibrationOptions."""

from __future__ import annotations

import re

from cli.common import fail
from compressor.calibration.data import CalibrationOptions


def parse_size(text: str | None) -> tuple[int, int] | None:
    """`224` or `224x192` (height x width) → (height, width)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        fail(f"bad --calib-size '{text}' (expected N or HEIGHTxWIDTH)")
    if len(values) not in (1, 2) or min(values) < 1:
        fail(f"bad --calib-size '{text}' (expected N or HEIGHTxWIDTH with positive sizes)")
    return (values[0], values[-1])


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """`0.485,0.456,0.406` → a tuple of floats (one per channel, or one for all)."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in re.split(r"[,\s]+", text.strip()) if v)
    except ValueError:
        fail(f"bad {option} '{text}' (expected comma-separated numbers)")
    if not values:
        fail(f"bad {option} '{text}' (expected comma-separated numbers)")
    return values


def calibration_options(size: str | None, mean: str | None, std: str | None, order: str, layout: str,
                        count: int, seed: int) -> CalibrationOptions:
    """CalibrationOptions from the CLI strings (defaults: model input size, ImageNet mean/std, RGB, NCHW)."""
    options = CalibrationOptions(size=parse_size(size), order=order.lower(), layout=layout.lower(), count=count,
                                 seed=seed)
    parsed_mean, parsed_std = parse_floats(mean, "--calib-mean"), parse_floats(std, "--calib-std")
    if parsed_mean is not None:
        options.mean = parsed_mean
    if parsed_std is not None:
        options.std = parsed_std
    return options

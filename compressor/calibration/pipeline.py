"""The calibration steps of `compress`: open the data, hold some out, reconstruct, and report on the held-out part."""

from __future__ import annotations

import os

import onnx

from compressor.calibration.data import CalibrationOptions, CalibrationSet, load_calibration
from compressor.calibration.evaluate import agreement
from compressor.calibration.reconstruct import Reconstruction
from compressor.calibration.refit import add_refits_to_reference

HELD_OUT_SHARE = 8  # one sample in eight is held out for the report...
MAX_HELD_OUT = 256  # ...at most this many


def open_calibration(calib, analysis, options: CalibrationOptions | None = None) -> CalibrationSet:
    """A CalibrationSet for the analyzed model from a path (image folder, .npy, .npz) or a ready CalibrationSet."""
    if isinstance(calib, CalibrationSet):
        calib.check_inputs(analysis.proto, analysis.input_shapes)
        return calib
    if not isinstance(calib, (str, os.PathLike)):
        raise TypeError("calib must be a path or a CalibrationSet")
    return load_calibration(calib, analysis.proto, analysis.input_shapes, options)


def split_held_out(calib: CalibrationSet) -> tuple[CalibrationSet, CalibrationSet | None]:
    """(fit set, held-out set): one sample in HELD_OUT_SHARE (at most MAX_HELD_OUT) is kept for the report;
    None when the set is too small to spare one."""
    held = min(MAX_HELD_OUT, calib.count // HELD_OUT_SHARE)
    if held < 1:
        return calib, None
    return calib.split(held)


def reference_with_refits(reference: onnx.ModelProto, analysis, plan, reconstruction: Reconstruction | None) -> onnx.ModelProto:
    """The verification reference with the refitted weights in place (the same model when nothing was refitted)."""
    if reconstruction is not None and reconstruction.refits:
        add_refits_to_reference(reference, analysis, plan, reconstruction.refits)
    return reference


def calibration_report(calib: CalibrationSet, fit: CalibrationSet, held: CalibrationSet | None, source,
                       original: onnx.ModelProto, pruned: onnx.ModelProto, reconstruction: Reconstruction | None) -> dict:
    """The report's `calibration` section: the data used, the per-layer refits and the held-out agreement of the
    pruned model before and after reconstruction with the original."""
    report = {
        "source": str(source) if isinstance(source, (str, os.PathLike)) else "arrays",
        "samples": calib.count,
        "fit_samples": fit.count,
        "held_out_samples": held.count if held is not None else 0,
        "reconstructed": reconstruction is not None,
    }
    if reconstruction is not None:
        report["layers"] = [r.to_dict() for r in reconstruction.layers]
        report["layers_refitted"] = len(reconstruction.refits)
        report["refit_samples"] = reconstruction.samples
    if held is not None:
        models = {"pruned": pruned}
        if reconstruction is not None:
            models["reconstructed"] = reconstruction.model
        report["held_out"] = agreement(original, models, held)
    return report

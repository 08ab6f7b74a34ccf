"""Pruning masks on PyTorch parameters: from an engine plan on the exported ONNX, or from groups that are already zero.

A plan made on the export maps back through `Analysis.pruned_parameters(plan)` (initializer name -> axis -> removed
indices). Both exports used for planning keep the PyTorch names of the weights:
- dynamo (BN folded into Conv): conv weights keep their names, the folded biases are named `<conv weight>_bias`;
  the BN that the export folded away is found on the PyTorch side (conv_bn_pairs) and masked with its conv;
- TorchScript with keep_bn=True: every initializer keeps its PyTorch name, BN included.
Masked entries are zeroed and stay zero (re-applied after every optimizer step, momentum included), so the final
export carries exact zeros and the engine's `zeros` method removes exactly the planned structures.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from compressor.errors import CompressorError
from compressor.training.export import INPUT_NAME, export_onnx, onnxscript_available
from compressor.training.loop import TrainHooks


class ParameterMasks:
    """Keep-masks (bool, the parameter's shape) by parameter name; absent parameters are unmasked."""

    def __init__(self, keep: dict[str, torch.Tensor]):
        self.keep = {name: mask.bool() for name, mask in keep.items()}
        self._bound: list[tuple[nn.Parameter, torch.Tensor]] | None = None  # masks on the parameters' device
        self._bound_model: int | None = None

    def __len__(self) -> int:
        return len(self.keep)

    def _resolve(self, model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
        if self._bound is None or self._bound_model != id(model):
            params = dict(model.named_parameters())
            missing = [name for name in self.keep if name not in params]
            if missing:
                raise CompressorError(f"mask names no parameter of the model: {missing[:3]}")
            self._bound = [(params[name], mask.to(params[name].device)) for name, mask in self.keep.items()]
            self._bound_model = id(model)
        return self._bound

    @torch.no_grad()
    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the masked entries of the parameters and of the optimizer's per-parameter state (momentum)."""
        for p, mask in self._resolve(model):
            if mask.shape != p.shape:
                raise CompressorError(f"mask of shape {tuple(mask.shape)} does not fit a parameter of shape {tuple(p.shape)}")
            p.mul_(mask)
            if optimizer is not None:
                for value in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        value.mul_(mask)

    @torch.no_grad()
    def shrink(self, model: nn.Module, factor: float) -> None:
        """Multiply the masked entries of the parameters by `factor` (the others are left as they are)."""
        for p, mask in self._resolve(model):
            p.mul_(torch.where(mask, torch.ones((), device=p.device, dtype=p.dtype),
                               torch.full((), factor, device=p.device, dtype=p.dtype)))

    def zeroed(self) -> dict[str, int]:
        """Number of masked entries per parameter."""
        return {name: int((~mask).sum()) for name, mask in self.keep.items()}

    def merged(self, other: "ParameterMasks") -> "ParameterMasks":
        """Masks that zero what either of the two zeroes."""
        keep = dict(self.keep)
        for name, mask in other.keep.items():
            keep[name] = keep[name] & mask if name in keep else mask
        return ParameterMasks(keep)


class MaskHooks(TrainHooks):
    """Training hook that keeps masked entries at exactly zero after every step.

    With `ramp_steps` R > 0 the fine-tune starts from the unpruned model instead and the masked entries shrink to
    zero over its first R steps: after step t < R they are scaled by (R - t) / (R - t + 1), so that without gradient
    they would stand at (R - t) / R of where they started (a linear ramp), while the optimizer keeps training them;
    from step R on they are exactly zero, as without a ramp.
    """

    def __init__(self, masks: ParameterMasks, ramp_steps: int = 0):
        self.masks, self.ramp_steps, self.steps = masks, max(int(ramp_steps), 0), 0

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> None:
        """Shrink the masked entries one ramp step, or re-apply the masks after the optimizer moved the weights."""
        self.steps += 1
        left = self.ramp_steps - self.steps
        if left > 0:
            self.masks.shrink(model, left / (left + 1))
        else:
            self.masks.apply(model, optimizer)


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """Conv module name -> name of the BatchNorm that directly normalizes its output (and nothing else does).

    Found by tracing the model with torch.fx; models that do not trace fall back to module order (a BN registered
    right after a conv with as many channels)."""
    modules = dict(model.named_modules())
    pairs: dict[str, str] = {}
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - untraceable models raise many kinds of errors
        graph = None
    if graph is not None:
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
                continue
            source = node.args[0] if node.args else None
            if (getattr(source, "op", None) == "call_module" and isinstance(modules.get(source.target), nn.Conv2d)
                    and len(source.users) == 1):
                pairs[source.target] = node.target
        return pairs
    last_leaf: tuple[str, nn.Module] | None = None
    for name, module in modules.items():
        if next(module.children(), None) is not None:
            continue
        if (isinstance(module, nn.modules.batchnorm._BatchNorm) and last_leaf is not None
                and isinstance(last_leaf[1], nn.Conv2d) and last_leaf[1].out_channels == module.num_features):
            pairs[last_leaf[0]] = name
        last_leaf = (name, module)
    return pairs


def masks_from_pruned(model: nn.Module, pruned: dict[str, dict[int, np.ndarray]],
                      graph: onnx.GraphProto | None = None) -> ParameterMasks:
    """Masks that zero every slice the engine's plan removes (`Analysis.pruned_parameters(plan)`).

    Initializers named like a parameter map to it; a conv weight's output channels also mask the BN folded into it
    in the export. Buffers (BN running statistics) are left alone: a BN with zero gamma and beta outputs zero.
    Any other name must be a folded bias of a mapped conv (checked against `graph` when given), else this fails.
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    bias_owner = _bias_owners(graph) if graph is not None else {}
    pairs = conv_bn_pairs(model)
    keep: dict[str, torch.Tensor] = {}

    def mask_slices(name: str, axes: dict[int, np.ndarray]) -> None:
        p = params[name]
        mask = keep.setdefault(name, torch.ones(p.shape, dtype=torch.bool))
        for axis, index in axes.items():
            if axis >= p.dim() or (len(index) and int(np.max(index)) >= p.shape[axis]):
                raise CompressorError(f"plan slice (axis {axis}) does not fit parameter {name} of shape {tuple(p.shape)}")
            view = mask.movedim(axis, 0)
            view[torch.as_tensor(np.asarray(index, dtype=np.int64))] = False

    unmapped = []
    for name, axes in pruned.items():
        if name in params:
            mask_slices(name, axes)
            module_name = name.rsplit(".", 1)[0] if "." in name else ""
            if name.endswith(".weight") and module_name in pairs and 0 in axes:
                for suffix in ("weight", "bias"):
                    mask_slices(f"{pairs[module_name]}.{suffix}", {0: axes[0]})
        elif name not in buffers:
            unmapped.append(name)
    for name in unmapped:
        owner = bias_owner.get(name) if graph is not None else name.removesuffix("_bias")
        if owner not in params:
            raise CompressorError(f"the plan removes slices of initializer '{name}', which maps to no PyTorch parameter "
                                  "(export with names kept: dynamo exporter or keep_bn=True)")
    return ParameterMasks(keep)


def _bias_owners(graph: onnx.GraphProto) -> dict[str, str]:
    """Bias initializer -> weight input name of the Conv/Gemm it belongs to."""
    owners = {}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "ConvTranspose") and len(node.input) > 2 and node.input[2]:
            owners[node.input[2]] = node.input[1]
    return owners


def zero_masks(model: nn.Module, names: list[str] | None = None) -> ParameterMasks:
    """Masks that keep today's exact zeros of the named parameters (all conv/linear weights, BN gammas and betas when
    names is None) at zero."""
    params = dict(model.named_parameters())
    names = names if names is not None else [n for n, p in params.items() if p.dim() >= 1]
    return ParameterMasks({name: params[name].detach().ne(0).cpu() for name in names if bool((params[name] == 0).any())})


def plan_masks(model: nn.Module, method: str, ratio: float, *, image_size: int = 32, workdir: str | Path | None = None,
               keep_bn: bool | None = None, calib_images: np.ndarray | None = None,
               **compress_options) -> tuple[ParameterMasks, dict]:
    """Plan `method` at `ratio` on the model's ONNX export with the engine and map the plan to parameter masks.

    keep_bn None: plan on the dynamo export (BN folded, as deployed) when onnxscript is installed, else on the
    TorchScript export with BN kept. `calib_images` (float32 NCHW, preprocessed as the model reads them): the plan is
    calibrated on them (compressor.calibration.planning; in memory, no reconstruction: the fine-tune recovers instead,
    and refitted weights would not map back). Returns the masks and the engine's report (without per-layer tables;
    with `calib_images`, "calibrated": {"images", "plan_images", "reconstruct"}).
    """
    from compressor.api import compress
    from compressor.calibration.data import CalibrationSet

    calib = None
    if calib_images is not None:
        calib_images = np.ascontiguousarray(calib_images, dtype=np.float32)
        if calib_images.ndim != 4 or len(calib_images) < 1:
            raise CompressorError(f"calibration images must be a non-empty N×C×H×W array, got shape {calib_images.shape}")
        calib = CalibrationSet.from_arrays({INPUT_NAME: calib_images})
        compress_options = {**compress_options, "calib": calib, "reconstruct": False}

    keep_bn = (not onnxscript_available()) if keep_bn is None else keep_bn
    with tempfile.TemporaryDirectory(prefix="compressor-plan-", dir=workdir) as scratch:
        path = Path(scratch) / "plan.onnx"
        exporter = export_onnx(model, path, keep_bn=keep_bn, image_size=image_size)
        if exporter == "torchscript":  # the dynamo exporter failed: plan on the export that keeps the names
            exporter = export_onnx(model, path, keep_bn=True, image_size=image_size)
        result = compress(str(path), method=method, ratio=ratio, verify=False, **compress_options)
    masks, report = masks_from_result(model, result)
    report["plan_export"] = exporter
    if calib is not None:
        report["calibrated"] = {"images": int(calib.count), "reconstruct": False,
                                "plan_images": int(report.get("calibration", {}).get("fit_samples", calib.count))}
    return masks, report


def masks_from_result(model: nn.Module, result) -> tuple[ParameterMasks, dict]:
    """Masks for a finished engine compression (`compressor.compress` on the model's export, any target, e.g.
    --target latency, or a plan made elsewhere) and its report without per-layer tables."""
    masks = masks_from_pruned(model, result.analysis.pruned_parameters(result.plan), result.analysis.proto.graph)
    return masks, {k: v for k, v in result.report.items() if k not in ("layers", "groups")}

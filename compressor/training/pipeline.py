"""`compress train` as a library call: load data and model, run a recipe (plain training, a mask from any engine
method, AMSC or GSM), evaluate, and write OUT.pt, OUT.onnx, OUT.slim.onnx (checked against PyTorch) and OUT.json.

Recipes (the sparse phase, then the fine-tune of `config.epochs` with the zero structures frozen):
- none: train or fine-tune `config.epochs`;            - prune METHOD: plan on the export, mask, fine-tune;
- amsc: sparse phase with lambda search (amsc_search), fine-tune;
- gsm: `gsm_epochs` of GSM SGD (compressor.training.gsm), finalize to exact zeros, fine-tune.
With `distill` (a checkpoint), the fine-tune of every recipe learns from that teacher (compressor.training.distill)
instead of from the labels alone.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from compressor.errors import CompressorError
from compressor.files import PendingWrites, check_output_paths, write_text
from compressor.training.amsc import amsc_structure
from compressor.training.amsc_search import AmscOptions, run_amsc
from compressor.training.data import DEFAULT_VAL_SIZE, VALIDATION_SPLIT_SEED, CifarData, load_cifar10_data
from compressor.training.distill import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, DistillHooks
from compressor.training.distributed import DistContext, init_distributed, shutdown_distributed
from compressor.training.export import export_and_slim, removed_macs_fraction
from compressor.training.loop import LogFn, TrainConfig, TrainHooks, evaluate, train
from compressor.training.masks import MaskHooks, ParameterMasks, conv_bn_pairs, plan_masks, zero_masks
from compressor.training.models import build_model, load_checkpoint

METHODS = ("none", "amsc", "gsm")
OUT_SUFFIXES = (".slim.onnx", ".onnx", ".pt", ".json")


@dataclass
class TrainJob:
    """Everything `compress train` needs; `out` is the prefix of the four output files."""

    model: str
    data: str
    out: str
    init: str | None = None
    method: str = "none"
    prune: str | None = None
    ratio: float | None = None
    config: TrainConfig = field(default_factory=TrainConfig)
    amsc: AmscOptions = field(default_factory=AmscOptions)
    gsm_mode: str = "structured"
    gsm_epochs: int = 3
    gsm_momentum: float = 0.98
    gsm_decay: float = 1e-4
    gsm_lr: float | None = None
    limit: int | None = None
    val_size: int = DEFAULT_VAL_SIZE
    device: str = "auto"
    exporter: str = "auto"
    verify_images: int = 1000
    num_classes: int = 10
    command: str = ""
    masks: ParameterMasks | None = None  # precomputed masks (e.g. masks_from_result) instead of --prune planning
    plan_report: dict | None = None  # what to report about them
    prune_options: dict = field(default_factory=dict)  # compressor.compress keywords of the --prune plan (target...)
    calib_count: int = 0  # --prune plan calibrated on this many seeded train images (0: off)
    # the fine-tune distills (compressor.training.distill) from a teacher checkpoint (a path: `--distill TEACHER.pt`)
    # or, with True, from the model as it starts
    distill: str | bool | None = None
    kd_temperature: float = DEFAULT_TEMPERATURE
    kd_weight: float = DEFAULT_ALPHA
    # --prune masks shrink to zero over the fine-tune's first epochs instead of at its start (masks.MaskHooks)
    mask_ramp_epochs: float = 0.0

    def validate(self) -> None:
        """Raise CompressorError on inconsistent options."""
        if self.method not in METHODS:
            raise CompressorError(f"unknown training method '{self.method}' (choose from: {', '.join(METHODS)})")
        if self.masks is not None and (self.prune or self.method != "none"):
            raise CompressorError("precomputed masks are fine-tuned as they are: no --prune and no --method")
        if self.prune and self.method != "none":
            raise CompressorError("--prune plans a mask for plain fine-tuning; it cannot be combined with --method")
        if self.calib_count < 0:
            raise CompressorError(f"--calib-count must be 0 (off) or positive, got {self.calib_count}")
        if self.calib_count and not self.prune:
            raise CompressorError("--calib-count calibrates the --prune plan: give --prune METHOD too")
        if (self.prune or self.method == "gsm") and self.ratio is None:
            raise CompressorError("--ratio is required with --prune and with --method gsm")
        if self.exporter not in ("auto", "dynamo", "torchscript"):
            raise CompressorError(f"unknown exporter '{self.exporter}' (auto, dynamo or torchscript)")
        if self.method == "amsc":
            replace(self.amsc, ratio=self.ratio if self.ratio is not None else self.amsc.ratio).validate()
        for checkpoint in (self.init, self.distill if isinstance(self.distill, str) else None):
            if checkpoint and not Path(checkpoint).is_file():
                raise CompressorError(f"checkpoint not found: {checkpoint}")
        if self.mask_ramp_epochs < 0 or (self.mask_ramp_epochs and not (self.prune or self.masks is not None)):
            raise CompressorError(f"--mask-ramp-epochs (got {self.mask_ramp_epochs}) ramps a --prune mask: give "
                                  "--prune METHOD --ratio R (AMSC and GSM reach their zeros in their own phase)")
        if self.mask_ramp_epochs > self.config.epochs:
            raise CompressorError(f"--mask-ramp-epochs {self.mask_ramp_epochs} is longer than the fine-tune "
                                  f"({self.config.epochs} epochs)")
        if self.kd_temperature <= 0 or not 0.0 <= self.kd_weight <= 1.0:
            raise CompressorError(f"bad distillation settings: temperature {self.kd_temperature} (> 0), "
                                  f"weight {self.kd_weight} (in [0, 1])")


def out_prefix(out: str | Path) -> Path:
    """The output prefix: OUT given as OUT, OUT.onnx, OUT.pt or OUT.json all mean OUT."""
    path = Path(out)
    for suffix in OUT_SUFFIXES:
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


class GsmHooks(TrainHooks):
    """Training hook for GSM: its optimizer replaces SGD, and `finalize` leaves exact zeros at the end."""

    def __init__(self, mode: str, ratio: float, momentum: float, decay: float, image_size: int = 32):
        self.mode, self.ratio, self.momentum, self.decay, self.image_size = mode, ratio, momentum, decay, image_size
        self.summary: dict | None = None
        self.zero_filters: dict[str, list[int]] = {}

    def make_optimizer(self, model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
        """The GSM optimizer; structured groups are the AMSC width groups (inner convs with their BN)."""
        from compressor.training.gsm import build_gsm_optimizer
        from compressor.training.gsm_groups import filter_groups_for

        options = {"momentum": self.momentum, "decay": self.decay}
        if self.mode == "structured":
            width = amsc_structure(model, "width-only").width
            options["filter_groups"] = filter_groups_for(model, [(w.conv, w.bn, w.consumer) for w in width],
                                                         (1, 3, self.image_size, self.image_size))
        return build_gsm_optimizer(model, self.mode, self.ratio, config.lr, image_size=self.image_size, **options)

    def after_training(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Zero everything outside the top-Q and record GSM's summary."""
        summary = optimizer.finalize()
        self.zero_filters = dict(summary.zero_filters)
        self.summary = summary.as_dict()
        return {"gsm": self.summary}


def _log_to(ctx: DistContext, log: LogFn | None) -> LogFn:
    return log if (log and ctx.is_main) else (lambda _text: None)


def run_job(job: TrainJob, data: CifarData | None = None, log: LogFn | None = print) -> dict:
    """Run one `compress train` job; returns the metrics written to OUT.json (rank 0; other ranks get the same
    training and an empty export section)."""
    job.validate()
    started = time.perf_counter()
    prefix = out_prefix(job.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    check_output_paths([p for p in (job.init, job.distill if isinstance(job.distill, str) else None) if p],
                       {f"-o ({suffix})": prefix.with_name(prefix.name + suffix) for suffix in OUT_SUFFIXES})
    ctx = init_distributed(job.device)
    say = _log_to(ctx, log)
    try:
        data = data or load_cifar10_data(job.data, ctx.device, val_size=job.val_size, seed=VALIDATION_SPLIT_SEED,
                                         limit=job.limit)
        say(f"data: {data.sizes()} on {ctx.device} (decoded by {data.decoder}); {ctx.world_size} process(es)")
        model = build_model(job.model, job.num_classes)
        init_info = load_checkpoint(model, job.init) if job.init else {}
        model.to(ctx.device)
        metrics: dict = {"command": job.command, "model": job.model, "init": job.init, "method": job.method,
                         "prune": job.prune, "ratio": job.ratio, "device": str(ctx.device), "world_size": ctx.world_size,
                         "data": data.sizes(), "decoder": data.decoder, "config": job.config.as_dict(),
                         "init_checkpoint": {k: v for k, v in init_info.items() if isinstance(v, (int, float, str))}}
        if job.init:
            metrics["init_val_top1"] = evaluate(model, data, "val", ctx=ctx)
            metrics["init_test_top1"] = evaluate(model, data, "test", ctx=ctx)
            say(f"init: val {metrics['init_val_top1']:.2f}%  test {metrics['init_test_top1']:.2f}%")
        teacher = copy.deepcopy(model).eval() if job.distill is True else None
        masks, sparse_report = _sparse_phase(job, model, data, ctx, say)
        metrics.update(sparse_report)
        ramp_steps = round(job.mask_ramp_epochs * data.steps_per_epoch(job.config.batch_size))
        hooks: list[TrainHooks] = [MaskHooks(masks, ramp_steps)] if masks is not None and len(masks) else []
        if ramp_steps:
            metrics["mask_ramp"] = {"epochs": job.mask_ramp_epochs, "steps": ramp_steps}
            say(f"masks: the pruned structures shrink to zero over the first {ramp_steps} steps")
        if job.distill:
            teacher = teacher if teacher is not None else load_teacher(job, ctx.device)
            hooks.append(DistillHooks(teacher, job.kd_temperature, job.kd_weight))
            metrics["distill"] = {"teacher": "the starting model" if job.distill is True else job.distill,
                                  "temperature": job.kd_temperature, "weight": job.kd_weight}
            if not has_warmup(job.config):
                say(NO_WARMUP_NOTE)
        if masks is not None and not ramp_steps:
            masks.apply(model)
        result = train(model, data, job.config, hooks, ctx, say)
        if masks is not None:
            masks.apply(model)
        metrics.update({"history": result.history, "train_seconds": round(result.seconds, 2), "steps": result.steps,
                        "val_top1": evaluate(model, data, "val", ctx=ctx),
                        "test_top1": evaluate(model, data, "test", ctx=ctx)})
        say(f"final: val {metrics['val_top1']:.2f}%  test {metrics['test_top1']:.2f}%")
        if ctx.is_main:
            metrics.update(_write_outputs(job, model, data, metrics, say))
            metrics["seconds"] = round(time.perf_counter() - started, 2)
            _write_json(_json_path(job), metrics)
        ctx.barrier()
        return metrics
    finally:
        shutdown_distributed(ctx)


NO_WARMUP_NOTE = ("note: distilling without a warm-up; pruned students far from their teacher can collapse in the "
                  "first epoch (the KD gradient is up to T times a cross-entropy one): --schedule onecycle or "
                  "--warmup-epochs N")


def has_warmup(config: TrainConfig) -> bool:
    """Whether the fine-tune schedule starts low (OneCycle, or a linear warm-up)."""
    return config.schedule.startswith("onecycle") or config.warmup_epochs > 0


def load_teacher(job: TrainJob, device: torch.device) -> nn.Module:
    """The frozen teacher of `--distill`: the job's architecture with the checkpoint's weights, in eval mode."""
    teacher = build_model(job.model, job.num_classes)
    load_checkpoint(teacher, job.distill)
    return teacher.to(device).eval().requires_grad_(False)


def _json_path(job: TrainJob) -> Path:
    prefix = out_prefix(job.out)
    return prefix.with_name(prefix.name + ".json")


def _sparse_phase(job: TrainJob, model: nn.Module, data: CifarData, ctx: DistContext,
                  say: LogFn) -> tuple[ParameterMasks | None, dict]:
    """The recipe's part before the fine-tune: the masks to freeze and what to report about it."""
    workdir = out_prefix(job.out).parent
    if job.masks is not None:
        return job.masks, {"plan": dict(job.plan_report or {})}
    if job.prune:
        calib = calibration_images(data, job.calib_count, job.config.seed) if job.calib_count and ctx.is_main else None
        planned = ctx.broadcast_object(plan_masks(model, job.prune, job.ratio, workdir=workdir, calib_images=calib,
                                                  **job.prune_options) if ctx.is_main else None)
        masks, report = planned
        calibrated = f", calibrated on {report['calibrated']['images']} train images" if "calibrated" in report else ""
        say(f"prune {job.prune}: plan removes {100 * report['macs_reduction']:.1f}% of MACs{calibrated}")
        return masks, {"plan": report}
    if job.method == "amsc":
        amsc = replace(job.amsc, ratio=job.ratio if job.ratio is not None else job.amsc.ratio)

        def measure(net: nn.Module) -> dict:
            return ctx.broadcast_object(removed_macs_fraction(net, workdir) if ctx.is_main else None)

        outcome = run_amsc(model, data, amsc, job.config, measure, ctx, say)
        say(f"amsc: lambda0 {outcome.lambda_depth:.4g} lambda1 {outcome.lambda_width:.4g}: "
            f"{outcome.counts['blocks_zero']} blocks, {outcome.counts['filters_zero']} filters zero")
        return outcome.masks, {"amsc": outcome.report()}
    if job.method == "gsm":
        hooks = GsmHooks(job.gsm_mode, job.ratio, job.gsm_momentum, job.gsm_decay)
        gsm_config = replace(job.config, epochs=job.gsm_epochs, schedule="constant", warmup_epochs=0.0,
                             lr=job.gsm_lr if job.gsm_lr is not None else job.config.lr)
        result = train(model, data, gsm_config, [hooks], ctx, say)
        if job.gsm_mode == "structured":
            masks = _filter_masks(model, hooks.zero_filters)
        else:
            masks = zero_masks(model, [n for n, p in model.named_parameters() if p.dim() > 1])
        report = {"gsm": hooks.summary, "gsm_seconds": round(result.seconds, 2),
                  "gsm_val_top1": evaluate(model, data, "val", ctx=ctx),
                  "gsm_test_top1": evaluate(model, data, "test", ctx=ctx)}  # GSM's claim: no fine-tune needed
        say(f"gsm: right after the GSM phase (exact zeros, no fine-tune) val {report['gsm_val_top1']:.2f}%  "
            f"test {report['gsm_test_top1']:.2f}%")
        return masks, report
    return None, {}


def calibration_images(data: CifarData, count: int, seed: int = 0) -> np.ndarray:
    """`count` train images (a subset seeded by `seed`, in index order; all of them when there are fewer),
    normalized as the model sees them at evaluation (no augmentation), as float32 NCHW on the CPU."""
    total = len(data.train_labels)
    index = np.sort(np.random.default_rng(seed).permutation(total)[: min(count, total)])
    picked = data.train_images[torch.as_tensor(index, device=data.train_images.device)]
    return data.normalize(picked).cpu().numpy().astype(np.float32)


def _filter_masks(model: nn.Module, zero_filters: dict[str, list[int]]) -> ParameterMasks:
    """Masks for whole zero filters (conv weight rows) and the gamma/beta of their BN."""
    params = dict(model.named_parameters())
    pairs = conv_bn_pairs(model)
    keep: dict[str, torch.Tensor] = {}
    for name, rows in zero_filters.items():
        if not rows:
            continue
        targets = [name]
        module = name.rsplit(".", 1)[0]
        if module in pairs:
            targets += [f"{pairs[module]}.weight", f"{pairs[module]}.bias"]
        for target in targets:
            mask = torch.ones(params[target].shape, dtype=torch.bool)
            mask[torch.as_tensor(rows)] = False
            keep[target] = mask
    return ParameterMasks(keep)


def _write_outputs(job: TrainJob, model: nn.Module, data: CifarData, metrics: dict, say: LogFn) -> dict:
    """Rank 0: OUT.pt, OUT.onnx, OUT.slim.onnx (checked on real test images); returns the export metrics."""
    prefix = out_prefix(job.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with PendingWrites() as pending:
        torch.save({"arch": job.model, "num_classes": job.num_classes, "state_dict": state,
                    "val_top1": metrics["val_top1"], "test_top1": metrics["test_top1"]},
                   pending.stage_path(prefix.with_name(prefix.name + ".pt")))
        pending.commit()
    reference = data.normalize(data.test_images[: job.verify_images]).cpu()
    dynamo = None if job.exporter == "auto" else job.exporter == "dynamo"
    report = export_and_slim(model, prefix, reference, dynamo=dynamo)
    removed = [g for g in report.get("groups", []) if g["channels_after"] < g["channels_before"]]
    filters = report["channels_removed_outside_blocks"]
    say(f"export: MACs {report['macs_before']:,} -> {report['macs_after']:,} ({100 * report['macs_reduction']:.1f}% fewer), "
        f"{len(report['blocks_removed'])} blocks and {filters} channels removed; slim ONNX = PyTorch within "
        f"{report['slim_check']['max_abs_diff']:.2g} on {report['slim_check']['images']} test images")
    keys = ("macs_before", "macs_after", "macs_reduction", "params_before", "params_after", "params_reduction",
            "bytes_before", "bytes_after")
    return {**{k: report[k] for k in keys}, "blocks_removed": len(report["blocks_removed"]),
            "blocks_removed_names": report["blocks_removed"], "filters_removed": filters,
            "channel_groups_pruned": [{k: g[k] for k in ("name", "channels_before", "channels_after")} for g in removed],
            "export": {k: report[k] for k in ("exporter", "dense_onnx", "slim_onnx", "dense_check", "slim_check",
                                              "export_seconds", "verified")}}


def _write_json(path: Path, metrics: dict) -> None:
    write_text(path, json.dumps(metrics, indent=2, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)

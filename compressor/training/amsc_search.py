"""AMSC's sparse phase and its lambda search, depth first.

Every trial starts from the same starting weights theta_hat, trains `sparse_epochs` at a constant learning rate with
the proximal step, and is then judged the way it will be used: its zero groups are frozen (the removal the engine
will make), the surviving filters are scaled back to their starting norms (`renormalize_filters`: the same function,
the step sizes of the starting weights for what follows), BatchNorm statistics are re-estimated on `bn_batches`
training batches (train-mode forward, no gradient), and `recover_epochs` of fine-tune without penalty (cosine from
the sparse lr, zero groups kept at zero) follow before the validation top-1 is measured.

Why: the raw top-1 right after the sparse phase (kept as `val_sparse`) measures the shrinkage of the surviving
groups, not the structure found. Every group is shrunk by the proximal step, and a conv followed by BN is
scale-invariant, so the CE gradient cannot push shrunk conv weights back (it is orthogonal to them), the BN running
statistics lag behind the fast-shrinking weights, and the effective step on a filter grows as 1/||W||^2. On the GPU
runs (benchmarks/results/cifar10_resnet56_rows1.md) raw top-1 was 18-35% for every depth trial that removed any
block and 73.6% for one that removed none, so `--max-drop` rejected them all and 'both' fell back to width alone.
On CPU (ResNet-20, 3000 JPEG images, width lambda removing 15 filters) raw top-1 was 41.2%, 80.0% after BN
re-estimation alone (80.3% before the sparse phase); 3 fine-tune epochs then reached 80.7% without and 83.5% with the
renormalized filters.

Depth first (as the paper): lambda0 is chosen with lambda1 = 0, then lambda1 with lambda0 fixed. Rules:
- accuracy: the largest lambda whose judged validation top-1 stays within `max_drop` points of the lambda = 0 trial
  (the depth stage then takes the smallest lambda0 tried that removes the same MACs, and 0 if that is none)
  (judged the same way); in `both` mode with a `ratio`, the depth stage may take at most `depth_share * ratio` of
  the MACs (default: the whole target, if accuracy allows), the width stage the rest;
- ratio: the smallest lambda that removes at least `ratio` of the MACs (the width stage of `both`, the single stage
  of depth-only / width-only).
In `both` mode with a ratio (and depth_share 1), the depth-only trial that reaches the ratio (if the depth stage met
one) is kept instead of the depth + width pair when its judged validation top-1 is higher: depth alone may take the
whole target when it costs less accuracy than sharing it with width, so `both` is never judged worse than its
depth-only alternative.
A log grid is tried first (automatic: spanning the lambdas that would zero the groups by shrinkage alone), extended by
up to two points past its ends until the rule's boundary is bracketed, then refined `refine` times (ratio rule:
interpolating the removed MACs in log(lambda); accuracy rule: log-bisection).
The chosen trial's weights (after its recovery epochs) are kept; its zero groups become masks for the fine-tune
without penalty.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn as nn

from compressor.errors import CompressorError
from compressor.training.amsc import (AmscHooks, AmscStructure, amsc_structure, auto_grid, kill_lambdas,
                                     renormalize_filters, structure_masks)
from compressor.training.data import CifarData
from compressor.training.distributed import DistContext
from compressor.training.loop import LogFn, TrainConfig, evaluate, train
from compressor.training.masks import MaskHooks, ParameterMasks

MeasureFn = Callable[[nn.Module], dict]  # -> {"macs_removed": fraction, ...} from the engine on the export
EXTEND_STEPS = 2


@dataclass
class AmscOptions:
    """Settings of AMSC's sparse phase (see the module docstring)."""

    dims: str = "both"
    weighting: str = "adaptive"
    lambda_depth: float | None = None
    lambda_width: float | None = None
    search: bool = False
    ratio: float | None = None
    max_drop: float = 1.0
    grid_points: int = 4
    refine: int = 2
    depth_grid: tuple[float, ...] | None = None
    width_grid: tuple[float, ...] | None = None
    sparse_epochs: int = 3
    sparse_lr: float | None = None
    penalty_in_loss: bool = False
    recover_epochs: int = 1
    renormalize: bool = True
    bn_batches: int = 50
    depth_share: float = 1.0

    def validate(self) -> None:
        """Raise CompressorError on inconsistent settings."""
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise CompressorError(f"AMSC ratio must be in (0, 1), got {self.ratio}")
        if self.sparse_epochs < 1:
            raise CompressorError("AMSC needs at least one sparse epoch")
        if self.recover_epochs < 0 or self.bn_batches < 0:
            raise CompressorError("AMSC recovery epochs and BN batches cannot be negative")
        if not 0.0 < self.depth_share <= 1.0:
            raise CompressorError(f"AMSC depth share must be in (0, 1], got {self.depth_share}")
        if not self.search and not (self.lambda_depth or self.lambda_width):
            raise CompressorError("AMSC needs --search or a positive --lambda-depth / --lambda-width")


@dataclass
class AmscOutcome:
    """The chosen lambdas, every trial, the zero groups of the chosen weights and their masks."""

    lambda_depth: float
    lambda_width: float
    trials: list[dict]
    chosen: dict
    counts: dict
    masks: ParameterMasks
    structure: AmscStructure
    seconds: float
    notes: list[str] = field(default_factory=list)

    def report(self) -> dict:
        """JSON-able summary."""
        return {"lambda_depth": self.lambda_depth, "lambda_width": self.lambda_width, "chosen": self.chosen,
                "trials": self.trials, "weighting": self.structure.weighting, "seconds": self.seconds,
                "notes": self.notes, **{k: v for k, v in self.counts.items() if k != "zero_filters_per_layer"}}


class _Trials:
    """Runs and remembers sparse trials from the starting weights."""

    def __init__(self, model, data, structure, options, config, measure, ctx, log):
        self.model, self.data, self.structure, self.options = model, data, structure, options
        self.config, self.measure, self.ctx, self.log = config, measure, ctx, log
        self.start = copy.deepcopy(model.state_dict())
        self.records: dict[tuple[float, float], dict] = {}
        self.states: dict[tuple[float, float], dict] = {}

    def run(self, lambda_depth: float, lambda_width: float, stage: str) -> dict:
        key = (float(lambda_depth), float(lambda_width))
        if key in self.records:
            return self.records[key]
        started = time.perf_counter()
        self.model.load_state_dict(self.start)
        hooks = [AmscHooks(self.structure, *key, penalty_in_loss=self.options.penalty_in_loss)]
        train(self.model, self.data, self.config, hooks, self.ctx)
        counts = self.structure.counts()
        record = {"stage": stage, "lambda_depth": key[0], "lambda_width": key[1],
                  "val_sparse": evaluate(self.model, self.data, "val", self.config.eval_batch_size, self.ctx),
                  "blocks_zero": counts["blocks_zero"], "filters_zero": counts["filters_zero"]}
        record.update({k: v for k, v in self.measure(self.model).items() if k in ("macs_removed", "macs_after", "params_after")})
        record["val_top1"] = self.judge()
        record["seconds"] = round(time.perf_counter() - started, 2)
        self.records[key] = record
        self.states[key] = copy.deepcopy(self.model.state_dict())
        if self.log:
            self.log(f"amsc {stage}: lambda0 {key[0]:.4g} lambda1 {key[1]:.4g} -> val {record['val_top1']:.2f}% "
                     f"(right after the sparse phase {record['val_sparse']:.2f}%)  "
                     f"MACs -{100 * record['macs_removed']:.1f}%  blocks {record['blocks_zero']}  filters "
                     f"{record['filters_zero']}  ({record['seconds']:.0f}s)")
        return record

    def judge(self) -> float:
        """Validation top-1 of the structure the sparse phase found: zero groups frozen, BN statistics re-estimated,
        `recover_epochs` of fine-tune without penalty (cosine from the sparse lr)."""
        masks = structure_masks(self.structure)
        masks.apply(self.model)
        if self.options.renormalize:
            renormalize_filters(self.structure)
        reestimate_batchnorm(self.model, self.data, self.options.bn_batches, self.config.batch_size, self.ctx)
        if self.options.recover_epochs:
            recover = replace(self.config, epochs=self.options.recover_epochs, schedule="cosine")
            train(self.model, self.data, recover, [MaskHooks(masks)], self.ctx)
        return evaluate(self.model, self.data, "val", self.config.eval_batch_size, self.ctx)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, data: CifarData, batches: int, batch_size: int,
                         ctx: DistContext | None = None) -> int:
    """Replace every BatchNorm's running statistics by their plain average over `batches` augmented training batches
    (at most one pass over the training set; train-mode forward, no gradient; averaged over the processes under DDP);
    the other layers stay in their mode. Returns the number of batches used (0: nothing changed). The result depends
    only on the weights and the data, not on the running statistics before."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or batches <= 0:
        return 0
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    modes = {m: (m.training, m.momentum) for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the plain mean over the batches seen
        m.train()
    used = 0
    for x, _ in data.train_batches(10_000, batch_size, 0, rank, world):  # an epoch no training run reaches: fixed sample
        model(x)
        used += 1
        if used >= batches:
            break
    if ctx is not None and ctx.enabled:
        for m in norms:
            for buffer in (m.running_mean, m.running_var):
                ctx.all_reduce_sum(buffer)
                buffer.div_(world)
    for m, (training, momentum) in modes.items():
        m.momentum = momentum
        m.train(training)
    return used


def find_boundary(run: Callable[[float], dict], grid: list[float], good: Callable[[dict], bool], want: str, refine: int,
              extend: int = EXTEND_STEPS, target: tuple[str, float] | None = None) -> tuple[float | None, float]:
    """(the smallest (want='smallest') or largest good lambda or None, the largest lambda tried).

    `good` must be monotone in lambda (true above a boundary for 'smallest', below it for 'largest'). After the grid,
    up to `extend` more points continue the grid's log step past its end until the boundary is bracketed (e.g. no
    lambda good yet, or the grid's first point already good for 'smallest'); then `refine` steps narrow the bracket:
    log-bisection, or with target=(key, value) interpolation of record[key] in log(lambda) (kept at least a tenth of
    the bracket away from its ends, so every step makes progress)."""
    records = {lam: run(lam) for lam in sorted(set(grid))}
    tried = {lam: good(record) for lam, record in records.items()}

    def attempt(lam: float) -> None:
        records[lam] = run(lam)
        tried[lam] = good(records[lam])

    step = (max(tried) / min(tried)) ** (1 / (len(tried) - 1)) if len(tried) > 1 else 3.0
    for _ in range(extend):
        goods = [lam for lam, ok in tried.items() if ok]
        if want == "smallest":
            lam = max(tried) * step if not goods else (min(tried) / step if min(goods) == min(tried) else None)
        else:
            lam = min(tried) / step if not goods else (max(tried) * step if max(goods) == max(tried) else None)
        if lam is None:
            break
        attempt(lam)
    for _ in range(refine):
        goods = [lam for lam, ok in tried.items() if ok]
        if not goods:
            break
        edge = min(goods) if want == "smallest" else max(goods)
        other = [lam for lam, ok in tried.items() if not ok and (lam < edge if want == "smallest" else lam > edge)]
        if not other:
            break
        partner = max(other) if want == "smallest" else min(other)
        fraction = 0.5
        if target is not None:
            key, value = target
            a, b = records[partner][key], records[edge][key]
            fraction = min(max((value - a) / (b - a), 0.1), 0.9) if b != a else 0.5
        attempt(math.exp(math.log(partner) + fraction * (math.log(edge) - math.log(partner))))
    goods = [lam for lam, ok in tried.items() if ok]
    if not goods:
        return None, max(tried)
    return (min(goods) if want == "smallest" else max(goods)), max(tried)


def run_amsc(model: nn.Module, data: CifarData, options: AmscOptions, config: TrainConfig, measure: MeasureFn,
             ctx: DistContext | None = None, log: LogFn | None = None) -> AmscOutcome:
    """AMSC's sparse phase on `model` (weights at return: the chosen trial's). The fine-tune is the caller's."""
    options.validate()
    started = time.perf_counter()
    structure = amsc_structure(model, options.dims, options.weighting)
    sparse = replace(config, epochs=options.sparse_epochs, schedule="constant", warmup_epochs=0.0, eval_every=0,
                     lr=options.sparse_lr if options.sparse_lr is not None else config.lr)
    trials = _Trials(model, data, structure, options, sparse, measure, ctx, log)
    notes: list[str] = []
    lr_sum = sparse.lr * data.steps_per_epoch(sparse.batch_size) * sparse.epochs
    if not options.search:
        chosen = (float(options.lambda_depth or 0.0), float(options.lambda_width or 0.0))
        trials.run(*chosen, stage="fixed")
    else:
        chosen = search_lambdas(trials, structure, options, lr_sum, notes)
    model.load_state_dict(trials.states[chosen])
    counts = structure.counts()
    outcome = AmscOutcome(chosen[0], chosen[1], list(trials.records.values()), trials.records[chosen], counts,
                          structure_masks(structure), structure, round(time.perf_counter() - started, 2), notes)
    return outcome


def search_lambdas(trials: _Trials, structure: AmscStructure, options: AmscOptions, lr_sum: float, notes: list[str]):
    """Depth first, then width: the lambdas whose trials meet the ratio within max_drop (see the module docstring);
    returns the chosen trial's key, with what was decided in `notes`."""
    ratio = options.ratio
    use_depth = bool(structure.depth) and options.dims != "width-only"
    use_width = bool(structure.width) and options.dims != "depth-only"
    reference: dict | None = None

    def within_drop(record: dict) -> bool:
        nonlocal reference
        if reference is None:
            reference = trials.run(0.0, 0.0, "reference")
        return record["val_top1"] >= reference["val_top1"] - options.max_drop

    def reaches(record: dict) -> bool:
        return record["macs_removed"] >= ratio - 1e-9

    lambda_depth = 0.0
    if use_depth:
        grid = list(options.depth_grid or auto_grid(kill_lambdas(structure, "depth", lr_sum), options.grid_points))
        if ratio is not None and not use_width:
            good, want = reaches, "smallest"
        elif ratio is not None:
            cap = options.depth_share * ratio
            good, want = (lambda r: within_drop(r) and r["macs_removed"] <= cap + 1e-9), "largest"
        else:
            good, want = within_drop, "largest"
        found, largest = find_boundary(lambda lam: trials.run(lam, 0.0, "depth"), grid, good, want, options.refine,
                                   target=("macs_removed", ratio) if good is reaches else None)
        lambda_depth = _fallback(found, largest, want, "depth", notes)
        if want == "largest" and lambda_depth > 0:
            lambda_depth = _least_shrinkage(trials, lambda_depth, notes)
    lambda_width = 0.0
    depth_done = ratio is not None and lambda_depth > 0 and reaches(trials.run(lambda_depth, 0.0, "depth"))
    if use_width and depth_done:
        notes.append("width stage: the depth stage already removes the ratio; lambda1 = 0")
    elif use_width:
        grid = list(options.width_grid or auto_grid(kill_lambdas(structure, "width", lr_sum), options.grid_points))
        good, want = (reaches, "smallest") if ratio is not None else (within_drop, "largest")
        found, largest = find_boundary(lambda lam: trials.run(lambda_depth, lam, "width"), grid, good, want,
                                   options.refine, target=("macs_removed", ratio) if good is reaches else None)
        lambda_width = _fallback(found, largest, want, "width", notes)
    key = (float(lambda_depth), float(lambda_width))
    if key not in trials.records:
        trials.run(*key, stage="final")
    if use_depth and use_width and ratio is not None and lambda_width > 0 and options.depth_share >= 1.0:
        key = _depth_alone_if_better(trials, key, ratio, notes)
    return key


def _least_shrinkage(trials: _Trials, lambda_depth: float, notes: list[str]) -> float:
    """The smallest depth-stage lambda0 that removes as many MACs as `lambda_depth` (the same blocks, less shrinkage
    of the surviving ones for the width stage to start from); 0 when it removes nothing (shrinkage without removal)."""
    macs = trials.records[(lambda_depth, 0.0)]["macs_removed"]
    if macs <= 0.0:
        notes.append(f"depth stage: lambda0 {lambda_depth:.4g} removes no block; lambda0 = 0")
        return 0.0
    same = [k[0] for k, r in trials.records.items()
            if r["stage"] == "depth" and k[1] == 0.0 and 0 < k[0] <= lambda_depth and r["macs_removed"] == macs]
    return min(same)


def _depth_alone_if_better(trials: _Trials, key: tuple[float, float], ratio: float, notes: list[str]):
    """`both` with a ratio: the depth-only trial that reaches the ratio with the smallest lambda0 replaces the depth +
    width pair when its judged validation top-1 is higher (depth may take the whole target if accuracy allows)."""
    reaching = [(k, r) for k, r in trials.records.items()
                if r["stage"] == "depth" and k[1] == 0.0 and r["macs_removed"] >= ratio - 1e-9]
    if not reaching:
        return key
    depth_key, depth_record = min(reaching, key=lambda item: item[0][0])
    if depth_record["val_top1"] > trials.records[key]["val_top1"]:
        notes.append(f"depth alone at lambda0 {depth_key[0]:.4g} reaches the ratio with higher validation top-1 "
                     f"({depth_record['val_top1']:.2f}% vs {trials.records[key]['val_top1']:.2f}% with width); kept it")
        return depth_key
    return key


def _fallback(found: float | None, largest: float, want: str, stage: str, notes: list[str]) -> float:
    """The stage's lambda: the one found, else the largest tried (ratio rule) or 0 (accuracy rule), with a note."""
    if found is not None:
        return found
    if want == "smallest":
        notes.append(f"{stage} stage: no lambda reached the ratio; kept the largest tried ({largest:.4g})")
        return largest
    notes.append(f"{stage} stage: every lambda lost more than max-drop; no {stage} compression")
    return 0.0

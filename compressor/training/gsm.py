"""Global Sparse Momentum SGD (Ding et al., NeurIPS 2019), unstructured and structured (whole filters).

The published rule, for every conv/linear weight W:

    Z <- beta * Z + eta * W + B * dL/dW        W <- W - alpha * Z

B is 1 on the top-Q entries of T = |dL/dw * w| taken over all conv/linear weights of the model together (one global
choice, so per-layer sparsity emerges), recomputed every step from the current gradients. Active weights get the
gradient plus decay through the momentum; passive ones only decay, geometrically by about (1 - alpha*eta/(1 - beta))
per step, and come back if their score rises. Biases and BN parameters get plain momentum SGD without decay.
`finalize()` sets everything outside the top-Q by magnitude to exactly zero.

Structured mode: the units are whole filters of the convs the engine can remove (e.g. conv1 of each residual branch)
together with their BN gamma and beta. A filter group's score is T_g = |sum over the group of dL/dw * w| (gamma and beta
terms included); all of a group's entries share one B (decay applies to gamma and beta too, active or passive), so passive
filters, gamma and beta all go to zero together and `finalize()` leaves groups that are exactly zero: the exported ONNX
computes exact zeros there and the engine's `zeros` method removes them.

MAC target -> Q (structured). Each group carries `macs_per_filter`: the MACs that removing that one filter saves, i.e.
its own conv MACs (C_in/groups * kh * kw * H_out * W_out) plus its consumer's input slice (for a 3x3 conv2 consumer,
C_out2 * kh * kw * H_out2 * W_out2; a zero filter makes that input channel a constant zero, so the engine drops the
slice too). The engine never empties a tensor (its `zeros` method keeps one all-zero channel in a layer that would
otherwise have none), so each layer keeps its `min_filters` (default 1) best-scored filters always active. With M the
model's total MACs and r the ratio of MACs to remove, the kept budget of the groups is K = sum_g macs_g - ceil(r * M),
reachable only if K >= the reserved filters' MACs. Every step the filters are ranked by score (reserved ones first,
then highest score first, ties by position) and the longest prefix whose cumulative MACs stay <= K is active; Q is
that prefix's length, so it can change from step to step while the removed MACs are always >= r * M (and equal what
the engine removes). `finalize()` applies the same rule to the filters' L2 norms.

Note on unstructured mode: ONNX Runtime runs dense kernels, so unstructured zeros do not make the model faster or
smaller; the model is stored as is and only its per-layer sparsity is reported (see UNSTRUCTURED_NOTE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from compressor.errors import CompressorError
from compressor.training.gsm_groups import FilterGroup, cifar_resnet_filter_groups, conv_linear_macs

DEFAULT_MOMENTUM = 0.98
DEFAULT_DECAY = 1e-4
GSM_MODES = ("unstructured", "structured")
UNSTRUCTURED_NOTE = (
    "unstructured GSM zeros single weights; ONNX Runtime runs dense kernels, so the model is not faster or smaller "
    "and is stored as is (dense, zeros included)"
)

ROLE_SPARSE = "gsm"  # GSM rule with the global mask B
ROLE_ACTIVE = "active"  # GSM rule with B = 1 (structured mode: conv/linear weights outside any filter group)
ROLE_DENSE = "dense"  # plain momentum SGD, no decay (biases, BN, anything else)


@dataclass
class GsmSummary:
    """What `finalize()` did. layer_sparsity: per layer, the fraction of weights (unstructured) or filters
    (structured) that are exactly zero."""

    mode: str
    layer_sparsity: dict[str, float]
    zeroed: int  # weights (unstructured) or filters (structured) set to zero
    total: int  # conv/linear weights (unstructured) or filters in groups (structured)
    macs_removed: int | None = None  # structured: sum of the zeroed groups' macs_per_filter
    note: str = ""
    zero_filters: dict[str, list[int]] = field(default_factory=dict)  # structured: indices of the zero filters

    def as_dict(self) -> dict:
        """A JSON-able dict for reports."""
        return {
            "mode": self.mode,
            "layer_sparsity": dict(self.layer_sparsity),
            "zeroed": self.zeroed,
            "total": self.total,
            "sparsity": self.zeroed / self.total if self.total else 0.0,
            "macs_removed": self.macs_removed,
            "note": self.note,
        }


def conv_linear_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every trainable conv and linear layer of the model, in module order."""
    found = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and module.weight.requires_grad:
            found.append((f"{module_name}.weight" if module_name else "weight", module.weight))
    return found


class GlobalSparseMomentum(torch.optim.Optimizer):
    """GSM SGD over a model's parameters. Exactly one of `keep` (unstructured: Q, the number of conv/linear weights that
    stay active) or `filter_groups` with `keep_macs` (structured: the kept MAC budget K of the groups) is given.

    Param groups (each has 'lr', 'momentum', 'decay', 'role'; LR schedulers work as usual):
    'gsm' (the masked weights; structured: the groups' conv weights, gamma and beta), 'active' (structured only:
    the other conv/linear weights, GSM rule with B = 1) and 'dense' (everything else: momentum SGD, no decay).
    A masked parameter without a gradient counts as gradient zero (it still decays). Under DDP the gradients are
    all-reduced before `step()`, so every rank picks the same mask.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        *,
        keep: int | None = None,
        filter_groups: Sequence[FilterGroup] | None = None,
        keep_macs: int | None = None,
        momentum: float = DEFAULT_MOMENTUM,
        decay: float = DEFAULT_DECAY,
        dense_momentum: float | None = None,
        min_filters: int = 1,
    ):
        structured = filter_groups is not None
        if structured == (keep is not None) or structured != (keep_macs is not None):
            raise CompressorError("GSM needs either keep (unstructured) or filter_groups with keep_macs (structured)")
        if not 0.0 <= momentum < 1.0 or decay < 0.0 or lr < 0.0:
            raise CompressorError(f"GSM needs 0 <= momentum < 1, decay >= 0, lr >= 0 (got {momentum}, {decay}, {lr})")
        self.names = {id(p): name for name, p in model.named_parameters()}
        weights = [p for _, p in conv_linear_weights(model)]
        self.filter_groups = list(filter_groups or [])
        if structured:
            sparse = self._group_members(self.filter_groups)
            sparse_ids = {id(p) for p in sparse}
            others = [p for p in weights if id(p) not in sparse_ids]
            groups = [(ROLE_SPARSE, sparse, momentum), (ROLE_ACTIVE, others, momentum)]
            self.keep_macs = int(keep_macs)
            self.min_filters = int(min_filters)
            reserved = sum(g.macs_per_filter * min(self.min_filters, g.conv_weight.shape[0]) for g in filter_groups)
            if self.keep_macs < reserved:
                raise CompressorError(
                    f"GSM keep_macs={keep_macs} is below the {reserved} MACs of the {min_filters} filter(s) per layer"
                )
            self._filter_macs = torch.tensor(
                [g.macs_per_filter for g in self.filter_groups for _ in range(g.conv_weight.shape[0])],
                dtype=torch.float64,
            )
        else:
            sparse = weights
            self.keep = int(keep)
            if not 0 <= self.keep <= sum(p.numel() for p in sparse):
                raise CompressorError(f"GSM keep={keep} is outside 0..{sum(p.numel() for p in sparse)}")
            groups = [(ROLE_SPARSE, sparse, momentum)]
        taken = {id(p) for _, params, _ in groups for p in params}
        dense = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
        groups.append((ROLE_DENSE, dense, momentum if dense_momentum is None else dense_momentum))
        param_groups = [
            {"params": params, "role": role, "momentum": beta, "decay": 0.0 if role == ROLE_DENSE else decay}
            for role, params, beta in groups
            if params
        ]
        super().__init__(param_groups, {"lr": lr, "momentum": momentum, "decay": decay})
        self.sparse_params: list[nn.Parameter] = list(sparse)
        self.last_masks: dict[int, torch.Tensor] = {}  # id(param) -> bool mask of the latest step (broadcastable)
        self.last_active_macs: torch.Tensor | None = None  # structured: active MACs of the latest step (on device)

    @classmethod
    def unstructured(cls, model: nn.Module, lr: float, ratio: float, **options) -> "GlobalSparseMomentum":
        """Unstructured GSM: Q = round((1 - ratio) * number of conv/linear weights) stay active."""
        if not 0.0 <= ratio < 1.0:
            raise CompressorError(f"GSM ratio must be in [0, 1), got {ratio}")
        total = sum(p.numel() for _, p in conv_linear_weights(model))
        return cls(model, lr, keep=round((1.0 - ratio) * total), **options)

    @classmethod
    def structured(
        cls,
        model: nn.Module,
        lr: float,
        ratio: float,
        filter_groups: Sequence[FilterGroup],
        total_macs: int,
        *,
        min_filters: int = 1,
        **options,
    ) -> "GlobalSparseMomentum":
        """Structured GSM: the active groups keep at most K = sum_g macs_g - ceil(ratio * total_macs) MACs, each layer
        keeping at least min_filters filters (the engine keeps one channel in a layer it would otherwise empty)."""
        if not 0.0 <= ratio < 1.0:
            raise CompressorError(f"GSM ratio must be in [0, 1), got {ratio}")
        grouped = sum(g.macs_per_filter * g.conv_weight.shape[0] for g in filter_groups)
        removable = sum(g.macs_per_filter * max(0, g.conv_weight.shape[0] - min_filters) for g in filter_groups)
        target = math.ceil(ratio * total_macs)
        if target > removable:
            raise CompressorError(
                f"ratio {ratio} needs {target} MACs removed, but the removable filters hold only {removable} of "
                f"{total_macs} MACs ({removable / total_macs:.1%}); choose a ratio <= {removable / total_macs:.3f}"
            )
        return cls(model, lr, filter_groups=filter_groups, keep_macs=grouped - target, min_filters=min_filters, **options)

    @staticmethod
    def _group_members(filter_groups: Sequence[FilterGroup]) -> list[nn.Parameter]:
        members: list[nn.Parameter] = []
        seen: set[int] = set()
        for group in filter_groups:
            filters = group.conv_weight.shape[0]
            for p in (group.conv_weight, group.bn_weight, group.bn_bias):
                if p is None:
                    continue
                if id(p) in seen:
                    raise CompressorError("a parameter appears in two GSM filter groups")
                if p is not group.conv_weight and p.shape != (filters,):
                    raise CompressorError(f"BN parameter of shape {tuple(p.shape)} does not match {filters} filters")
                seen.add(id(p))
                members.append(p)
        return members

    # --- masks -----------------------------------------------------------------------------------------------------

    def _unstructured_masks(self) -> dict[int, torch.Tensor]:
        params = self.sparse_params
        scores = torch.cat([_contribution(p).abs().flatten() for p in params])
        if self.keep >= scores.numel():
            flat = torch.ones_like(scores, dtype=torch.bool)
        else:
            flat = torch.zeros_like(scores, dtype=torch.bool)
            if self.keep > 0:
                flat[torch.topk(scores, self.keep, sorted=False).indices] = True
        return {id(p): m.view_as(p) for p, m in zip(params, flat.split([p.numel() for p in params]))}

    def _filter_values(self, per_tensor) -> torch.Tensor:
        """Per filter of all groups, in order: per_tensor(p) summed over the filter's conv weights, gamma and beta."""
        values = []
        for group in self.filter_groups:
            total = per_tensor(group.conv_weight).flatten(1).sum(1)
            for p in (group.bn_weight, group.bn_bias):
                if p is not None:
                    total = total + per_tensor(p)
            values.append(total)
        return torch.cat(values)

    def _select_filters(self, scores: torch.Tensor) -> torch.Tensor:
        """Bool per filter: the longest prefix of the filters ranked by score (descending, each layer's min_filters
        best first) within the kept MAC budget."""
        if self.min_filters > 0:
            ranked, offset = scores.clone(), 0
            for group in self.filter_groups:
                layer = ranked[offset : offset + group.conv_weight.shape[0]]
                layer[layer.topk(min(self.min_filters, layer.numel())).indices] = math.inf
                offset += layer.numel()
            scores = ranked
        if self._filter_macs.device != scores.device:
            self._filter_macs = self._filter_macs.to(scores.device)
        macs = self._filter_macs
        order = torch.sort(scores, descending=True, stable=True).indices
        kept = torch.cumsum(macs[order], 0)
        count = torch.searchsorted(kept, torch.tensor([float(self.keep_macs)], dtype=kept.dtype, device=kept.device),
                                   right=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(order.numel(), device=order.device)
        active = ranks < count
        self.last_active_macs = (macs * active).sum()
        return active

    def _filter_masks(self, active: torch.Tensor) -> dict[int, torch.Tensor]:
        masks = {}
        for group, unit in zip(self.filter_groups, active.split([g.conv_weight.shape[0] for g in self.filter_groups])):
            masks[id(group.conv_weight)] = unit.view(-1, *([1] * (group.conv_weight.dim() - 1)))
            for p in (group.bn_weight, group.bn_bias):
                if p is not None:
                    masks[id(p)] = unit
        return masks

    def _structured_masks(self) -> dict[int, torch.Tensor]:
        return self._filter_masks(self._select_filters(self._filter_values(_contribution).abs()))

    # --- step ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One GSM step: recompute the global mask from the current gradients, then update every param group."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masks = self._structured_masks() if self.filter_groups else self._unstructured_masks()
        self.last_masks = masks
        for group in self.param_groups:
            lr, beta, decay, role = group["lr"], group["momentum"], group["decay"], group["role"]
            for p in group["params"]:
                grad = p.grad
                if grad is None and role == ROLE_DENSE:
                    continue
                if grad is None:
                    grad = torch.zeros_like(p)
                if role == ROLE_SPARSE:
                    grad = grad * masks[id(p)]
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(beta)
                if decay:
                    buf.add_(p, alpha=decay)
                buf.add_(grad)
                p.add_(buf, alpha=-lr)
        return loss

    # --- end of training -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def finalize(self) -> GsmSummary:
        """Set everything outside the top-Q by magnitude to exactly zero (momentum too) and report per-layer sparsity.

        Unstructured: the Q largest |w| over all conv/linear weights stay. Structured: the filter groups ranked by the L2
        norm of (filter, gamma, beta) stay while their cumulative MACs fit the kept budget; the others become exact
        zeros in conv weight, gamma and beta.
        """
        if self.filter_groups:
            return self._finalize_structured()
        return self._finalize_unstructured()

    def _zero(self, p: nn.Parameter, mask: torch.Tensor) -> None:
        p.mul_(mask)
        buf = self.state[p].get("momentum_buffer")
        if buf is not None:
            buf.mul_(mask)

    def _finalize_unstructured(self) -> GsmSummary:
        params = self.sparse_params
        magnitudes = torch.cat([p.detach().abs().flatten() for p in params])
        keep_flat = torch.zeros_like(magnitudes, dtype=torch.bool)
        if self.keep > 0:
            keep_flat[torch.topk(magnitudes, min(self.keep, magnitudes.numel()), sorted=False).indices] = True
        sparsity = {}
        for p, keep in zip(params, keep_flat.split([p.numel() for p in params])):
            self._zero(p, keep.view_as(p))
            sparsity[self._name(p)] = float((p == 0).sum().item()) / p.numel()
        return GsmSummary(
            mode="unstructured",
            layer_sparsity=sparsity,
            zeroed=int((~keep_flat).sum().item()),
            total=magnitudes.numel(),
            note=UNSTRUCTURED_NOTE,
        )

    def _finalize_structured(self) -> GsmSummary:
        norms = self._filter_values(lambda p: p.detach().double().square()).sqrt()
        active = self._select_filters(norms)
        masks = self._filter_masks(active)
        for p in self._group_members(self.filter_groups):
            self._zero(p, masks[id(p)])
        sparsity, zero_filters = {}, {}
        for group, unit in zip(self.filter_groups, active.split([g.conv_weight.shape[0] for g in self.filter_groups])):
            name = self._name(group.conv_weight)
            zero_filters[name] = torch.nonzero(~unit).flatten().tolist()
            sparsity[name] = len(zero_filters[name]) / unit.numel()
        macs_removed = int(round(float((self._filter_macs.to(active.device) * ~active).sum().item())))
        return GsmSummary(
            mode="structured",
            layer_sparsity=sparsity,
            zeroed=int((~active).sum().item()),
            total=active.numel(),
            macs_removed=macs_removed,
            zero_filters=zero_filters,
        )

    def _name(self, p: nn.Parameter) -> str:
        return self.names.get(id(p), f"param{id(p)}")


def _contribution(p: nn.Parameter) -> torch.Tensor:
    """dL/dw * w elementwise (zeros where there is no gradient)."""
    if p.grad is None:
        return torch.zeros_like(p)
    return p.grad * p


def build_gsm_optimizer(
    model: nn.Module,
    mode: str,
    ratio: float,
    lr: float,
    *,
    filter_groups: Sequence[FilterGroup] | None = None,
    total_macs: int | None = None,
    image_size: int = 32,
    **options,
) -> GlobalSparseMomentum:
    """The GSM optimizer for `compress train --method gsm --gsm MODE --ratio R`.

    mode 'unstructured': ratio is the fraction of conv/linear weights zeroed. mode 'structured': ratio is the fraction
    of the model's MACs removed; filter_groups and total_macs default to the CIFAR ResNet builder and conv_linear_macs
    at image_size (pass them for other models). options: momentum, decay, dense_momentum.
    """
    if mode == "unstructured":
        return GlobalSparseMomentum.unstructured(model, lr, ratio, **options)
    if mode != "structured":
        raise CompressorError(f"unknown GSM mode '{mode}' (choose from: {', '.join(GSM_MODES)})")
    if filter_groups is None:
        filter_groups = cifar_resnet_filter_groups(model, image_size)
    if total_macs is None:
        total_macs = conv_linear_macs(model, (1, 3, image_size, image_size))
    return GlobalSparseMomentum.structured(model, lr, ratio, filter_groups, total_macs, **options)

"""Methods `l1` and `l2`: filter norms summed over every tensor a group's units touch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from compressor.engine.plan import Plan, PlanOptions, allocate
from compressor.methods.registry import register

if TYPE_CHECKING:
    from compressor.engine.analysis import Analysis


def group_norm_scores(analysis: Analysis, order: int) -> dict[int, np.ndarray]:
    """Per group: for each unit, Σ over its coupled weight slices (producers' filters and consumers' input
    slices) of the slice's L1 norm (order 1) or L2 norm (order 2)."""
    scores = {}
    for group in analysis.groups:
        if not group.prunable.any():
            continue
        total = np.zeros(group.size)
        for p, local in analysis.group_slices(group.index):
            weight = np.moveaxis(analysis.view.constants[p.init], p.axis, 0).astype(np.float64)
            rows = weight.reshape(weight.shape[0], -1)
            norms = np.abs(rows).sum(axis=1) if order == 1 else (rows**2).sum(axis=1)
            valid = local >= 0
            np.add.at(total, local[valid], norms[valid])
        scores[group.index] = total if order == 1 else np.sqrt(total)
    return scores


def scores_l1(analysis: Analysis, options: PlanOptions) -> dict[int, np.ndarray]:
    """L1 group norms (the importance `l1` prunes by)."""
    return group_norm_scores(analysis, 1)


def scores_l2(analysis: Analysis, options: PlanOptions) -> dict[int, np.ndarray]:
    """L2 group norms (the importance `l2` prunes by)."""
    return group_norm_scores(analysis, 2)


@register("l1", scores=scores_l1)
def plan_l1(analysis: Analysis, options: PlanOptions) -> Plan:
    """Uniform per-group rate, lowest L1 group norms removed first."""
    return allocate(analysis, group_norm_scores(analysis, 1), options)


@register("l2", scores=scores_l2)
def plan_l2(analysis: Analysis, options: PlanOptions) -> Plan:
    """Uniform per-group rate, lowest L2 group norms removed first."""
    return allocate(analysis, group_norm_scores(analysis, 2), options)


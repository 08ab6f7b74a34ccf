"""Method `zeros`: remove exactly the channels and residual branches that are already zero, nothing else.

A channel unit is removed when every position of it that a mixing layer (conv, gemm, matmul) reads is exactly zero
(e.g. an all-zero filter with zero bias, or a BN with zero γ and β); a branch is dropped when its output is exactly
zero. The result computes the same function as the original.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from compressor.engine.plan import Plan, PlanOptions, ensure_nonempty_tensors
from compressor.methods.registry import register

if TYPE_CHECKING:
    from compressor.engine.analysis import Analysis


def zero_units(analysis: Analysis) -> np.ndarray:
    """Boolean array over unit ids: units whose every mixing-consumer input position is exactly zero."""
    n = len(analysis.unit_roots)
    read = np.zeros(n, dtype=bool)
    nonzero = np.zeros(n, dtype=bool)
    for p in analysis.params:
        if p.role != "in" or p.tensor is None:
            continue
        cmap = analysis.cmaps.get(p.tensor)
        if cmap is None:
            nonzero[p.units] = True
            continue
        # a mixing layer reads every position of its input tensor (grouped convs read a unit at several)
        read[cmap.units] = True
        np.logical_or.at(nonzero, cmap.units, ~cmap.zero)
    return read & ~nonzero


@register("zeros", needs_ratio=False, exact=True)
def plan_zeros(analysis: Analysis, options: PlanOptions) -> Plan:
    """Plan the removal of every exactly-zero unit and branch (ratio is ignored)."""
    zero = zero_units(analysis)
    excluded = analysis.excluded_groups(options.exclude)
    plan = Plan()
    for group in analysis.groups:
        if group.index in excluded:
            continue
        local = np.nonzero(zero[group.units] & group.prunable)[0]
        if len(local):
            plan.removed[group.index] = local
    excluded_blocks = analysis.excluded_blocks(options.exclude)
    plan.dropped_blocks = {b.index for b in analysis.blocks if b.zero and b.index not in excluded_blocks}
    keep_one = ensure_nonempty_tensors(analysis, plan, {g.index: np.zeros(g.size) for g in analysis.groups})
    if any(len(keep_one.removed.get(g, [])) != len(plan.removed.get(g, [])) for g in plan.removed):
        plan.notes.append("kept one all-zero channel in tensors that would otherwise have none")
    return keep_one

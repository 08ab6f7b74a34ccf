"""Method `random`: seeded random channel selection at a uniform per-group rate (a baseline)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from compressor.engine.plan import Plan, PlanOptions, allocate
from compressor.methods.registry import register

if TYPE_CHECKING:
    from compressor.engine.analysis import Analysis


def random_scores(analysis: Analysis, options: PlanOptions) -> dict[int, np.ndarray]:
    """Uniform random scores per unit, from a generator seeded with options.seed."""
    rng = np.random.default_rng(options.seed)
    return {g.index: rng.random(g.size) for g in analysis.groups if g.prunable.any()}


@register("random", scores=random_scores)
def plan_random(analysis: Analysis, options: PlanOptions) -> Plan:
    """Uniform per-group rate; which units go is drawn from a generator seeded with options.seed."""
    return allocate(analysis, random_scores(analysis, options), options)

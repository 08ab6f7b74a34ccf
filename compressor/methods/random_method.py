"""Method `random`: seeded random channel selection at a uniform per-group rate (a baseline)."""

from __future__ import annotations

import numpy as np

from compressor.methods import register, register_scores
from compressor.plan import Plan, PlanOptions, allocate


@register_scores("random")
def random_scores(analysis, options: PlanOptions) -> dict[int, np.ndarray]:
    """Uniform random scores per unit, from a generator seeded with options.seed."""
    rng = np.random.default_rng(options.seed)
    return {g.index: rng.random(g.size) for g in analysis.groups if g.prunable.any()}


@register("random")
def plan_random(analysis, options: PlanOptions) -> Plan:
    """Uniform per-group rate; which units go is drawn from a generator seeded with options.seed."""
    return allocate(analysis, random_scores(analysis, options), options)

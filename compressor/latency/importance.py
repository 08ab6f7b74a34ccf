"""Importance for the latency allocation: the method's per-unit scores, made comparable across groups.

Scores come from the method's registered scorer (compressor.methods.registry: graph-rw's is its random-walk scores π,
its layer rates being replaced by the latency allocation); a method without a scorer falls back to l1 norms, and the
report says so.

Comparability: a method ranks the units *within* a group; the allocation trades units *across* groups and blocks.
Each unit's value is its score divided by its group's mean score, so every group is worth about its width and a unit
of below-average score is worth less than one channel (the "a channel is a channel" assumption of uniform-rate MAC
pruning, refined by the method's ranking inside each group).

Diminishing returns: with values linear in the kept units, a knapsack answers with corners (a few groups cut to the
floor, the others untouched) whenever scores are flat, as they are for untrained weights; cutting a layer to a
sliver is what hurts accuracy most. So the k-th best unit of a group of n is weighted by 2·(1 − (k − ½)/n): a
group's kept value at kept fraction f is ≈ n·(1 − (1 − f)²), its damage quadratic in the removed fraction. The
first channels to go are nearly free, each further one costs more; at equal latency per channel the allocation is
the uniform one, and it cuts deeper where channels cost more time.

Blocks: a residual block's importance is the value of the groups that live only inside its branch, at their
current widths, times a factor ρ (method option `block_value`, default 0.5): dropping the branch is pruning those
groups to zero width, so narrowing and dropping are priced in the same currency and the allocation moves between
them freely; but the join then passes its skip on unchanged, and a residual network degrades much less when a
branch goes than a plain one losing a layer (residual networks behave like ensembles of shallower paths), so a
dropped branch loses ρ of its channels' value, not all of it. With ρ = 1 and the diminishing returns above, a block
is only ever dropped where its layers' time does not shrink with their widths (launch-bound targets); with ρ = 0.5
dropping competes with narrowing on compute-bound targets (CPUs) as well, cheapest importance per ms first.

Measured importance (with calibration data, `MeasuredImportance`): the value of a group at a width is minus the
measured output damage of thinning it to that width (compressor/calibration/sensitivity.py), plus a constant C; a
block's value factor is its measured damage over Σ C of its internal groups, so dropping it costs exactly its
measured damage in the same currency, whatever the widths its groups had.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from compressor.errors import CompressorError
from compressor.methods import registry

FALLBACK_SCORES = "l1"  # the importance of a method that registers no scores function

if TYPE_CHECKING:
    from compressor.engine.analysis import Analysis
    from compressor.engine.plan import PlanOptions


def method_scores(method: str, analysis: Analysis, options: PlanOptions, groups: list[int]
                  ) -> tuple[dict[int, np.ndarray], str | None]:
    """Per-unit scores of `groups` from `method`'s registered scorer, and a note when they come from an adapter
    (the method's scores_note) or from l1 norms standing in for a method that registers none."""
    entry = registry.get(method)  # an unknown method fails here with the list of choices
    if not entry.needs_ratio:
        scoring = ", ".join(name for name in registry.available() if registry.get(name).needs_ratio)
        raise CompressorError(f"--target latency needs a scoring method ({scoring}): '{method}' takes no ratio")
    if entry.scores is not None:
        return _checked(entry.scores(analysis, options), analysis, groups), entry.scores_note
    fallback = registry.get(FALLBACK_SCORES).scores
    return (_checked(fallback(analysis, options), analysis, groups),
            f"method '{method}' registers no scores function: {FALLBACK_SCORES} filter norms used as importance")


def _checked(scores: dict[int, np.ndarray], analysis: Analysis, groups: list[int]) -> dict[int, np.ndarray]:
    out = {}
    for g in groups:
        size = analysis.groups[g].size
        value = np.asarray(scores.get(g, np.ones(size)), dtype=np.float64).reshape(-1)
        if value.shape != (size,):
            raise CompressorError(f"scores of group {g} have {value.size} entries for {size} channels")
        out[g] = np.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0)
    return out


def unit_values(scores: np.ndarray) -> np.ndarray:
    """Scores scaled to mean 1 over the group (shifted to be non-negative first); all ones when they are all zero."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) and s.min() < 0:
        s = s - s.min()
    mean = float(s.mean()) if len(s) else 0.0
    return s / mean if mean > 0 else np.ones_like(s)


def kept_value(values: np.ndarray, prunable: np.ndarray, widths) -> np.ndarray:
    """Importance kept at each width: every blocked unit, plus the best (width − blocked) prunable units (those
    plan_from_counts keeps: it removes the lowest-scored prunable units first), the k-th kept unit weighted by
    2·(1 − (k − ½)/n) (see the module docstring)."""
    n = len(values)
    n_blocked = int((~prunable).sum())
    ranked = np.sort(values[prunable])[::-1]
    position = (n_blocked + np.arange(len(ranked)) + 0.5) / max(n, 1)
    prefix = np.concatenate([[0.0], np.cumsum(ranked * 2.0 * (1.0 - position))])
    blocked_total = float((values[~prunable] * 2.0 * (1.0 - (np.arange(n_blocked) + 0.5) / max(n, 1))).sum())
    take = np.clip(np.asarray(widths, dtype=np.int64) - n_blocked, 0, len(ranked))
    return blocked_total + prefix[take]


@dataclass
class MeasuredImportance:
    """Importance measured on calibration data: unit scores (ranking inside a group), the damage of each group at a
    removed-unit count, and the damage of dropping each block."""

    scores: dict[int, np.ndarray]
    group_damage: Callable[[int, np.ndarray], np.ndarray]
    block_damage: dict[int, float] = field(default_factory=dict)

    def ceiling(self) -> float:
        """A constant C above every measured damage (every value stays positive, every block factor ≤ 1)."""
        damages = [float(np.max(self.group_damage(g, np.array([len(s)])))) for g, s in self.scores.items()]
        return 1.0 + max(damages + list(self.block_damage.values()) + [0.0])

    def values(self, g: int, size: int, widths) -> np.ndarray:
        """Value kept at each width: C minus the measured damage of removing size − width units."""
        widths = np.asarray(widths, dtype=np.int64)
        return self.ceiling() - np.asarray(self.group_damage(g, size - widths), dtype=np.float64)

    def block_factor(self, block: int, internal: tuple[int, ...], default: float) -> float:
        """Share of its internal groups' full value (C each) that dropping `block` loses: its measured damage."""
        if block not in self.block_damage or not internal:
            return default
        return float(np.clip(self.block_damage[block] / (self.ceiling() * len(internal)), 0.0, 1.0))

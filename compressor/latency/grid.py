"""Measured widths of one cost item and the interpolation between them.

Levels of refinement (each adds measurements; an item uses the finest level it completed):

    0  the full width only: the item costs the same at every width
    1  sweeps: along each of its groups, the narrowest allowed width and half the width (the others full)
    2  sweeps with quarters added (1/4, 3/4)
    3  the cross grid of the level-2 widths (items with at most two groups)

An item left at level 0 by the profile budget is not taken as constant: it follows the target's own prior,
T(k) = T_full · (a + (1 − a) · Π_d k_d / K_d), the kept fraction of its work with a fixed share `a` fitted on the
items that were measured (`fit_fixed_share`; near 1 where launches dominate, e.g. GPUs at batch 1, small on CPUs).

Sweeps are combined separably, T(a, b) ≈ T(a, B) · T(A, b) / T(A, B) (A, B the full widths): exact for a layer
whose time is proportional to input × output channels or constant, and two sweeps cost far fewer measurements than
a grid, which matters on GPUs where each micro-model costs a session and a cuDNN search. The cross grid, when
measured, is interpolated multilinearly. Widths are multiples of the alignment; nothing is extrapolated below the
narrowest measured width, which is the narrowest the allocation may choose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compressor.latency.micro import CostItem

LEVEL_FRACTIONS = ((1.0,), (0.5,), (0.25, 0.75))
GRID_LEVEL = 3
MAX_GRID_DIMS = 2


def aligned_widths(size: int, fractions, alignment: int, floor: int = 1) -> list[int]:
    """Widths for the given fractions of `size`, rounded to multiples of `alignment` no smaller than `floor`,
    plus `size` itself; with more than one fraction, also the narrowest such multiple (so the allocation never
    extrapolates below the measured widths). A group with no such multiple below its size has only its own width."""
    smallest = max(alignment, -(-int(floor) // alignment) * alignment)
    widths = {int(size)}
    if smallest < size:
        for f in fractions:
            widths.add(int(min(size, max(smallest, round(f * size / alignment) * alignment))))
        if len(fractions) > 1:
            widths.add(smallest)
    return sorted(widths)


def level_widths(size: int, floor: int, alignment: int, level: int) -> list[int]:
    """The widths of one group an item is measured at, at a sweep level (0, 1, 2; the grid uses level 2's)."""
    fractions = [f for lv in LEVEL_FRACTIONS[: min(level, len(LEVEL_FRACTIONS) - 1) + 1] for f in lv]
    return aligned_widths(size, fractions, alignment, floor)


def level_points(full: tuple[int, ...], widths: list[list[int]], level: int) -> list[tuple[int, ...]]:
    """The width combinations measured at `level`: sweeps along each dim (others full), or the cross grid."""
    if level >= GRID_LEVEL:
        points: list[tuple[int, ...]] = [()]
        for grid in widths:
            points = [p + (w,) for p in points for w in grid]
        return points
    return list(dict.fromkeys(full[:d] + (w,) + full[d + 1:] for d, grid in enumerate(widths) for w in grid)) or [full]


def interpolation_weights(grid, points) -> np.ndarray:
    """Matrix [len(points), len(grid)]: linear interpolation on the sorted `grid` (linear extrapolation below its
    first node, constant above its last); a one-node grid gives a constant."""
    grid = np.asarray(grid, dtype=np.float64)
    points = np.asarray(points, dtype=np.float64)
    weights = np.zeros((len(points), len(grid)))
    if len(grid) == 1:
        weights[:, 0] = 1.0
        return weights
    j = np.clip(np.searchsorted(grid, points, side="right") - 1, 0, len(grid) - 2)
    t = np.minimum((points - grid[j]) / (grid[j + 1] - grid[j]), 1.0)
    rows = np.arange(len(points))
    weights[rows, j] = 1.0 - t
    weights[rows, j + 1] += t
    return weights


@dataclass
class ItemTable:
    """Net milliseconds of one item: at its full widths, along each group's sweep, and (level 3) on the grid."""

    item: CostItem
    grids: tuple[tuple[int, ...], ...]
    level: int
    full_ms: float
    curves: tuple[np.ndarray, ...] = ()
    values: np.ndarray | None = None
    fixed_share: float = 1.0  # level 0 only: the prior's share of the time that does not shrink with the widths
    gamma: float = 1.0  # the width exponent of the calibration: T_full · (T / T_full)^gamma

    @classmethod
    def from_points(cls, item: CostItem, widths: list[list[int]], level: int, known: dict) -> "ItemTable":
        """Build from measured points {width tuple: ms} at a completed level."""
        full = tuple(g[-1] for g in widths)
        curves = tuple(np.array([known[full[:d] + (w,) + full[d + 1:]] for w in grid]) for d, grid in enumerate(widths))
        values = None
        if level >= GRID_LEVEL:
            values = np.array([known[p] for p in level_points(full, widths, level)]).reshape([len(g) for g in widths])
        return cls(item, tuple(tuple(g) for g in widths), level, float(known[full]), curves, values)

    def dense(self, candidates: list) -> np.ndarray:
        """The interpolated cost at every combination of candidate widths (one array per dim), never negative, with
        the calibration's width exponent applied."""
        out = self._interpolated(candidates)
        if self.gamma != 1.0 and self.full_ms > 0:
            out = self.full_ms * np.power(np.clip(out / self.full_ms, 0.0, None), self.gamma)
        return out

    def _interpolated(self, candidates: list) -> np.ndarray:
        if self.level == 0:
            work = np.ones([len(c) for c in candidates])
            for axis, (grid, points) in enumerate(zip(self.grids, candidates)):
                fraction = np.asarray(points, dtype=np.float64) / grid[-1]
                work = work * fraction.reshape([-1 if a == axis else 1 for a in range(work.ndim)])
            return np.maximum(self.full_ms * (self.fixed_share + (1.0 - self.fixed_share) * work), 0.0)
        if self.values is not None:
            out = self.values
            for axis, (grid, points) in enumerate(zip(self.grids, candidates)):
                out = np.moveaxis(np.tensordot(interpolation_weights(grid, points), out, axes=([1], [axis])), 0, axis)
            return np.maximum(out, 0.0)
        out = np.full([len(c) for c in candidates], self.full_ms)
        for axis, (grid, curve, points) in enumerate(zip(self.grids, self.curves, candidates)):
            along = (interpolation_weights(grid, points) @ curve).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
            out = out * (along / self.full_ms) if self.full_ms > 0 else out + (along - self.full_ms)
        return np.maximum(out, 0.0)

    def at(self, widths: dict[int, int]) -> float:
        """Net milliseconds at the given kept widths (missing groups: full width)."""
        points = [[widths.get(g, grid[-1])] for g, grid in zip(self.item.dims, self.grids)]
        return float(self.dense(points).reshape(-1)[0])


def fit_fixed_share(tables: list[ItemTable]) -> float | None:
    """Least-squares `a` in T/T_full = a + (1 − a)·w over every measured narrower point of the items measured
    beyond level 0 (w: the kept fraction of the item's work); None when there is none."""
    x, y = [], []
    for t in tables:
        if t.level == 0 or t.full_ms <= 0:
            continue
        for d, (grid, curve) in enumerate(zip(t.grids, t.curves)):
            for width, ms in zip(grid[:-1], curve[:-1]):
                x.append(1.0 - width / grid[-1])
                y.append(ms / t.full_ms - width / grid[-1])
    if not x or not any(x):
        return None
    x, y = np.array(x), np.array(y)
    return float(np.clip((x * y).sum() / (x * x).sum(), 0.0, 1.0))

"""Sensitivity-driven allocation: removed units per group and dropped blocks that meet a MAC/param target with the
least total measured damage (instead of one uniform rate).

The cost (MACs or params) of a state is exact and fast: every MAC term (and parameter tensor) is its full value times
the kept fraction of each unit axis it scales with, and a group's removed units are a prefix of its ranking, so the
removed positions of each axis are a lookup in a cumulative count per group. A greedy then takes, while the cost is
over the target, the move losing the least damage per unit of cost saved (credited with no more than what is still
missing, so among moves that finish the job the least damaging wins): thin one group to any larger removed count
(plateaus in the measured curve are stepped over), or drop one residual block (its damage replaces that of the
groups living inside it). A refill then gives units back wherever that keeps the cost within the target.
Damages of different groups are assumed to add up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compressor.calibration.sensitivity import Sensitivity
from compressor.engine.cost import is_param

EPS = 1e-12


@dataclass
class _Term:
    value: float
    sides: list[tuple[int, dict[int, np.ndarray]]]  # (axis length, {group: removed positions after k removed})
    killers: frozenset[int] = frozenset()  # blocks whose dropping removes this term (any one of them)


@dataclass
class Allocation:
    """Removed counts per group, dropped blocks, the cost reached and the predicted damage."""

    removed: dict[int, int]
    dropped: set[int]
    cost: float
    damage: float
    moves: list[str] = field(default_factory=list)


class CostModel:
    """MACs or params of (removed count per group, dropped blocks), each group's removed units a prefix of `order`."""

    def __init__(self, analysis, order: dict[int, np.ndarray], target: str, blocks: list[int]):
        self.groups = sorted(order)
        local = {int(u): (g, i) for g in self.groups for i, u in enumerate(analysis.groups[g].units)}
        node_blocks: dict[str, set[int]] = {}
        for b in blocks:
            for n in analysis.blocks[b].nodes:
                node_blocks.setdefault(n, set()).add(b)

        def side(units) -> tuple[int, dict[int, np.ndarray]]:
            per_group: dict[int, np.ndarray] = {}
            hits = [local[int(u)] for u in units if int(u) in local]
            for g in {h[0] for h in hits}:
                counts = np.bincount([i for h, i in hits if h == g], minlength=analysis.groups[g].size)
                per_group[g] = np.concatenate([[0], np.cumsum(counts[order[g]])])
            return len(units), per_group

        self.terms: list[_Term] = []
        if target == "macs":
            for t in analysis.mac_terms:
                sides = [side(u) for u in (t.in_units, t.out_units) if u is not None and len(u)]
                self.terms.append(_Term(float(t.macs), sides, frozenset(node_blocks.get(t.node, ()))))
        else:
            axes: dict[str, dict[int, np.ndarray]] = {}
            for p in analysis.params:
                if len(p.units):
                    axes.setdefault(p.init, {}).setdefault(p.axis, p.units)
            for name, value in analysis.view.constants.items():
                readers = [n.name for n in analysis.view.consumers.get(name, [])]
                if not readers or not is_param(value):
                    continue
                killers = set.intersection(*(node_blocks.get(r, set()) for r in readers))
                sides = [side(u) for u in axes.get(name, {}).values()]
                self.terms.append(_Term(float(value.size), sides, frozenset(killers)))
        self.touching = {g: [t for t in self.terms if any(g in s[1] for s in t.sides)] for g in self.groups}

    @staticmethod
    def _term(t: _Term, removed: dict[int, int], dropped: set[int], override: tuple[int, np.ndarray] | None = None):
        if t.killers & dropped:
            return 0.0
        value = t.value
        for length, per_group in t.sides:
            gone = sum(float(cum[removed.get(g, 0)]) for g, cum in per_group.items()
                       if override is None or g != override[0])
            if override is not None and override[0] in per_group:
                gone = gone + per_group[override[0]][override[1]].astype(np.float64)
            value = value * (1.0 - gone / length)
        return value

    def total(self, removed: dict[int, int], dropped: set[int]) -> float:
        """The cost of a state."""
        return float(sum(self._term(t, removed, dropped) for t in self.terms))

    def curve(self, removed: dict[int, int], dropped: set[int], g: int, ks: np.ndarray) -> np.ndarray:
        """The cost with group g at each removed count in `ks`, everything else as in the state."""
        base = self.total(removed, dropped) - sum(self._term(t, removed, dropped) for t in self.touching[g])
        return base + sum(np.broadcast_to(self._term(t, removed, dropped, (g, ks)), ks.shape)
                          for t in self.touching[g]) if self.touching[g] else np.full(ks.shape, base)


def allocate_by_sensitivity(cost: CostModel, sensitivity: Sensitivity, candidates: dict[int, np.ndarray],
                            internal: dict[int, tuple[int, ...]], goal: float) -> Allocation:
    """Greedy remove-then-refill (module docstring). `candidates[g]`: allowed removed counts (ascending, with 0);
    `internal[b]`: the groups that live only inside block b."""
    removed = {g: 0 for g in candidates}
    dropped: set[int] = set()
    moves: list[str] = []
    dead = lambda: {g for b in dropped for g in internal.get(b, ())}  # noqa: E731
    current = cost.total(removed, dropped)
    while current > goal + EPS:
        missing = current - goal
        best = None
        gone = dead()
        for g, ks in candidates.items():
            if g in gone:
                continue
            larger = ks[ks > removed[g]]
            if not len(larger):
                continue
            saved = current - cost.curve(removed, dropped, g, larger)
            credit = np.minimum(saved, missing)
            lost = sensitivity.group_damage(g, larger) - sensitivity.group_damage(g, removed[g])
            price = np.where(credit > EPS, (lost + EPS) / np.maximum(credit, EPS), np.inf)
            j = int(np.argmin(price))
            if np.isfinite(price[j]) and (best is None or price[j] < best[0]):
                best = (float(price[j]), "thin", g, int(larger[j]))
        for b in sensitivity.blocks:
            if b in dropped:
                continue
            after = cost.total(removed, dropped | {b})
            credit = min(current - after, missing)
            if credit <= EPS:
                continue
            lost = sensitivity.blocks[b] - sum(float(sensitivity.group_damage(g, removed[g])) for g in internal.get(b, ()))
            price = (max(lost, 0.0) + EPS) / credit
            if best is None or price < best[0]:
                best = (price, "drop", b, None)
        if best is None:
            break
        if best[1] == "thin":
            removed[best[2]] = best[3]
            moves.append(f"thin group {best[2]} to {best[3]} removed")
        else:
            dropped.add(best[2])
            moves.append(f"drop block {best[2]}")
        current = cost.total(removed, dropped)
    _refill(cost, sensitivity, candidates, removed, dropped, dead(), goal, moves)
    gone = dead()
    damage = sum(float(sensitivity.group_damage(g, k)) for g, k in removed.items() if g not in gone)
    damage += sum(sensitivity.blocks[b] for b in dropped)
    return Allocation({g: k for g, k in removed.items() if g not in gone}, dropped, cost.total(removed, dropped),
                      damage, moves)


def _refill(cost, sensitivity, candidates, removed, dropped, gone, goal, moves) -> None:
    """Give units back (largest damage regained first) while the cost stays within the goal."""
    while True:
        best = None
        for g, ks in candidates.items():
            if g in gone or removed[g] == 0:
                continue
            smaller = ks[ks < removed[g]]
            values = cost.curve(removed, dropped, g, smaller)
            fits = values <= goal + EPS
            if not fits.any():
                continue
            gain = sensitivity.group_damage(g, removed[g]) - sensitivity.group_damage(g, smaller)
            gain = np.where(fits, gain, -np.inf)
            j = int(np.argmax(gain))
            if gain[j] > EPS and (best is None or gain[j] > best[0]):
                best = (float(gain[j]), g, int(smaller[j]))
        if best is None:
            return
        removed[best[1]] = best[2]
        moves.append(f"refill group {best[1]} to {best[2]} removed")

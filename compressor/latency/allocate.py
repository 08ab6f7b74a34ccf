"""Choose kept widths per group and dropped residual blocks that keep the most importance under a latency budget.

The problem is a knapsack whose items interact: a layer's latency depends on the widths of two groups (its input
and its output), and dropping a block removes its layers whatever their widths. So it is not solved item by item;
a greedy (as in latency-saliency knapsack pruning, HALP) re-prices every move on the exact current state:

1. Remove. While the predicted latency is over budget, take the move that loses the least importance per saved
   millisecond: narrow one group to any smaller candidate width (any, not only the next one, so plateaus and noise
   in the measured tables are stepped over), or drop one block (losing the importance of the groups that live only
   in its branch, at their current widths; see importance.py). A move is credited with no more than the time still
   missing, so among moves that finish the job the one losing least wins, not the one overshooting most.
2. Refill. The last move usually overshoots; while something fits back under the budget, take the move that gains
   the most importance per added millisecond: widen a group or restore a dropped block.

Everything is in the latency model's units: Σ item milliseconds S, with predicted = scale · S + offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EPS_MS = 1e-9


@dataclass
class GroupChoice:
    """Candidate widths of one group (ascending, the last is its full width), the importance kept at each, and the
    index of the narrowest width allowed."""

    group: int
    widths: np.ndarray
    values: np.ndarray
    min_index: int = 0


@dataclass
class ItemCost:
    """One measured item: the groups it depends on, the blocks that remove it, and its cost (ms) at every
    combination of candidate-width indices of those groups (an array with one axis per dim)."""

    dims: tuple[int, ...]
    blocks: frozenset[int]
    table: np.ndarray


@dataclass
class BlockChoice:
    """A droppable block and the groups that vanish with it."""

    block: int
    internal: tuple[int, ...] = ()


@dataclass
class Allocation:
    """The chosen widths (per group) and dropped blocks, with the predicted latency and the importance kept."""

    widths: dict[int, int]
    dropped: set[int]
    predicted_ms: float
    kept_value: float
    total_value: float
    met: bool
    moves: list[str] = field(default_factory=list)


class _State:
    def __init__(self, groups: dict[int, GroupChoice], items: list[ItemCost], blocks: dict[int, BlockChoice]):
        self.groups, self.items, self.blocks = groups, items, blocks
        self.index = {g: len(c.widths) - 1 for g, c in groups.items()}
        self.dropped: set[int] = set()
        self.by_group: dict[int, list[ItemCost]] = {g: [] for g in groups}
        for item in items:
            for d in item.dims:
                self.by_group[d].append(item)
        self.by_block = {b: [i for i in items if b in i.blocks] for b in blocks}
        self.internal_of = {g: {b for b, c in blocks.items() if g in c.internal} for g in groups}

    def alive(self, item: ItemCost, dropped: set[int] | None = None) -> bool:
        return not (item.blocks & (self.dropped if dropped is None else dropped))

    def cost(self, item: ItemCost) -> float:
        return float(item.table[tuple(self.index[d] for d in item.dims)])

    def along(self, item: ItemCost, g: int) -> np.ndarray:
        """The item's cost at every candidate width of group g, the other groups at their current widths."""
        index = tuple(slice(None) if d == g else self.index[d] for d in item.dims)
        return np.asarray(item.table[index], dtype=np.float64)

    def total(self) -> float:
        return sum(self.cost(i) for i in self.items if self.alive(i))

    def live(self, g: int) -> bool:
        return not (self.internal_of[g] & self.dropped)

    def value(self) -> float:
        return sum(float(c.values[self.index[g]]) for g, c in self.groups.items() if self.live(g))

    def block_value(self, b: int) -> float:
        return sum(float(self.groups[g].values[self.index[g]]) for g in self.blocks[b].internal
                   if not ((self.internal_of[g] - {b}) & self.dropped))

    def group_curve(self, g: int) -> np.ndarray:
        """Σ over g's alive items of their cost at each candidate width of g."""
        curve = np.zeros(len(self.groups[g].widths))
        for item in self.by_group[g]:
            if self.alive(item):
                curve += self.along(item, g)
        return curve


def allocate_latency(groups: dict[int, GroupChoice], items: list[ItemCost], blocks: dict[int, BlockChoice],
                     budget_items_ms: float) -> Allocation:
    """Greedy remove-then-refill allocation (see the module docstring) bringing Σ item ms to `budget_items_ms`.

    The returned predicted_ms is Σ item ms of the result (the caller applies scale and offset); met says whether
    the budget was reached (when not, everything that saves time was taken).
    """
    state = _State(groups, items, blocks)
    total_value = state.value()
    current = state.total()
    moves: list[str] = []
    while current > budget_items_ms + EPS_MS:
        move = _best_removal(state, current - budget_items_ms)
        if move is None:
            break
        moves.append(_apply(state, move))
        current = state.total()
    while True:
        move = _best_refill(state, budget_items_ms - state.total())
        if move is None:
            break
        moves.append(_apply(state, move))
    final = state.total()
    widths = {g: int(c.widths[state.index[g]]) for g, c in groups.items()}
    return Allocation(widths, set(state.dropped), final, state.value(), total_value,
                      final <= budget_items_ms + 1e-6, moves)


def _best_removal(state: _State, missing_ms: float):
    """(ratio, saved_ms, kind, key, index) of the cheapest importance-per-saved-ms move (savings credited up to
    `missing_ms`), or None."""
    best = None
    for g, choice in state.groups.items():
        cur = state.index[g]
        if cur <= choice.min_index or not state.live(g):
            continue
        curve = state.group_curve(g)
        saved = curve[cur] - curve[choice.min_index:cur]
        lost = choice.values[cur] - choice.values[choice.min_index:cur]
        ok = saved > EPS_MS
        if not ok.any():
            continue
        ratios = np.where(ok, lost / np.where(ok, np.minimum(saved, missing_ms), 1.0), np.inf)
        j = int(np.argmin(ratios))
        candidate = (float(ratios[j]), float(saved[j]), "narrow", g, choice.min_index + j)
        best = _better(best, candidate)
    for b in state.blocks:
        if b in state.dropped:
            continue
        saved = sum(state.cost(i) for i in state.by_block[b] if state.alive(i))
        if saved > EPS_MS:
            best = _better(best, (state.block_value(b) / min(saved, missing_ms), saved, "drop", b, None))
    return best


def _best_refill(state: _State, slack_ms: float):
    """The move adding the most importance per added ms that still fits in `slack_ms`, or None."""
    best = None
    for g, choice in state.groups.items():
        cur = state.index[g]
        if cur >= len(choice.widths) - 1 or not state.live(g):
            continue
        curve = state.group_curve(g)
        added = curve[cur + 1:] - curve[cur]
        gained = choice.values[cur + 1:] - choice.values[cur]
        fits = (added <= slack_ms + 1e-9) & (gained > 0)
        if not fits.any():
            continue
        gain_per_ms = np.where(fits, gained / np.maximum(added, EPS_MS), -np.inf)
        j = int(np.argmax(gain_per_ms))
        best = _better(best, (-float(gain_per_ms[j]), -float(added[j]), "widen", g, cur + 1 + j))
    for b in sorted(state.dropped):
        restored = set(state.dropped) - {b}
        added = sum(state.cost(i) for i in state.by_block[b] if state.alive(i, restored))
        gained = state.block_value(b)
        if gained > 0 and added <= slack_ms + 1e-9:
            best = _better(best, (-gained / max(added, EPS_MS), -added, "restore", b, None))
    return best


def _better(best, candidate):
    """Lower ratio wins; on a tie, the larger saving (or smaller addition)."""
    if best is None or (candidate[0], -candidate[1]) < (best[0], -best[1]):
        return candidate
    return best


def _apply(state: _State, move) -> str:
    _, ms, kind, key, index = move
    if kind in ("narrow", "widen"):
        old = int(state.groups[key].widths[state.index[key]])
        state.index[key] = index
        return f"{kind} group {key}: {old} -> {int(state.groups[key].widths[index])} ({ms:+.4g} ms)"
    if kind == "drop":
        state.dropped.add(key)
    else:
        state.dropped.discard(key)
    return f"{kind} block {key} ({ms:+.4g} ms)"

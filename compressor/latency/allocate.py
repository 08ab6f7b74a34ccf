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
3. Swap. The greedy compares dropping a block with the next narrowing step only; so each block is toggled in turn
   (dropped if kept, restored if dropped), steps 1-2 re-run from there, and the result kept when it keeps more
   importance within the budgets (two passes at most).

Everything is in the latency model's units: Σ item milliseconds S, with predicted = scale · S + offset. An optional
second budget caps the MACs as well (e.g. "half the latency at no more than half the MACs"); a move is then credited
with its progress towards each budget still missed, as a fraction of what that budget misses, and a refill must fit
in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EPS = 1e-9


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
    """One measured item: the groups it depends on, the blocks that remove it, and its cost at every combination of
    candidate-width indices of those groups (arrays with one axis per dim): `table` in ms, `macs` (optional)."""

    dims: tuple[int, ...]
    blocks: frozenset[int]
    table: np.ndarray
    macs: np.ndarray | None = None


@dataclass
class BlockChoice:
    """A droppable block, the groups that vanish with it, and the share of their importance its dropping loses
    (`value_factor`, see importance.py: the skip connection carries the signal on)."""

    block: int
    internal: tuple[int, ...] = ()
    value_factor: float = 1.0


@dataclass
class Allocation:
    """The chosen widths (per group) and dropped blocks, with Σ item ms and MACs and the importance kept."""

    widths: dict[int, int]
    dropped: set[int]
    predicted_ms: float
    kept_value: float
    total_value: float
    met: bool
    macs: float = 0.0
    moves: list[str] = field(default_factory=list)


class _State:
    def __init__(self, groups: dict[int, GroupChoice], items: list[ItemCost], blocks: dict[int, BlockChoice]):
        self.groups, self.blocks = groups, blocks
        self.items = [i if i.macs is not None else ItemCost(i.dims, i.blocks, i.table, np.zeros_like(i.table))
                      for i in items]
        self.index = {g: len(c.widths) - 1 for g, c in groups.items()}
        self.dropped: set[int] = set()
        self.by_group: dict[int, list[ItemCost]] = {g: [] for g in groups}
        for item in self.items:
            for d in item.dims:
                self.by_group[d].append(item)
        self.by_block = {b: [i for i in self.items if b in i.blocks] for b in blocks}
        self.internal_of = {g: {b for b, c in blocks.items() if g in c.internal} for g in groups}

    def alive(self, item: ItemCost, dropped: set[int] | None = None) -> bool:
        return not (item.blocks & (self.dropped if dropped is None else dropped))

    def cost(self, item: ItemCost) -> np.ndarray:
        """[ms, MACs] of the item at the current widths."""
        at = tuple(self.index[d] for d in item.dims)
        return np.array([item.table[at], item.macs[at]], dtype=np.float64)

    def along(self, item: ItemCost, g: int) -> np.ndarray:
        """[candidates of g, 2]: the item's ms and MACs at every candidate width of g, the others as they are."""
        at = tuple(slice(None) if d == g else self.index[d] for d in item.dims)
        return np.stack([item.table[at], item.macs[at]], axis=-1).astype(np.float64)

    def total(self) -> np.ndarray:
        return sum((self.cost(i) for i in self.items if self.alive(i)), np.zeros(2))

    def live(self, g: int) -> bool:
        return not (self.internal_of[g] & self.dropped)

    def block_value(self, b: int) -> float:
        """Importance lost by dropping block b (its groups at their current widths become (1 − value_factor) of
        their full value), or regained by restoring it (its groups come back at full width)."""
        keep = 1.0 - self.blocks[b].value_factor
        total = 0.0
        for g in self.blocks[b].internal:
            if (self.internal_of[g] - {b}) & self.dropped:
                continue
            full = float(self.groups[g].values[-1])
            total += full - keep * full if b in self.dropped else float(self.groups[g].values[self.index[g]]) - keep * full
        return total

    def value(self) -> float:
        """Importance kept: every live group at its width, dropped blocks' groups at (1 − value_factor) of it."""
        total = 0.0
        for g, c in self.groups.items():
            kept = float(c.values[self.index[g]])
            for b in self.internal_of[g] & self.dropped:
                kept *= 1.0 - self.blocks[b].value_factor
            total += kept
        return total

    def snapshot(self) -> tuple[dict[int, int], set[int]]:
        return dict(self.index), set(self.dropped)

    def restore(self, snapshot: tuple[dict[int, int], set[int]]) -> None:
        self.index, self.dropped = dict(snapshot[0]), set(snapshot[1])

    def group_curve(self, g: int) -> np.ndarray:
        """[candidates of g, 2]: Σ over g's alive items of their ms and MACs at each candidate width of g."""
        curve = np.zeros((len(self.groups[g].widths), 2))
        for item in self.by_group[g]:
            if self.alive(item):
                curve += self.along(item, g)
        return curve


def allocate_latency(groups: dict[int, GroupChoice], items: list[ItemCost], blocks: dict[int, BlockChoice],
                     budget_items_ms: float, budget_macs: float | None = None) -> Allocation:
    """Greedy remove-then-refill allocation (see the module docstring) bringing Σ item ms to `budget_items_ms`
    (and Σ item MACs to `budget_macs` when given).

    The returned predicted_ms is Σ item ms of the result (the caller applies scale and offset); met says whether
    the budgets were reached (when not, everything that saves time was taken).
    """
    state = _State(groups, items, blocks)
    budget = np.array([budget_items_ms, np.inf if budget_macs is None else budget_macs], dtype=np.float64)
    total_value = state.value()
    moves = _remove_then_refill(state, budget)
    if _within(state, budget):
        moves += _swap_blocks(state, budget)
    final = state.total()
    widths = {g: int(c.widths[state.index[g]]) for g, c in groups.items()}
    return Allocation(widths, set(state.dropped), float(final[0]), state.value(), total_value,
                      bool((final <= budget * (1 + 1e-9) + EPS).all()), float(final[1]), moves)


def _within(state: _State, budget: np.ndarray) -> bool:
    return bool((state.total() <= budget * (1 + 1e-9) + EPS).all())


def _remove_then_refill(state: _State, budget: np.ndarray) -> list[str]:
    """Steps 1 and 2 of the module docstring, from the current state."""
    moves: list[str] = []
    while True:
        missing = state.total() - budget
        if not (missing > EPS * np.maximum(1.0, np.abs(budget))).any():
            break
        move = _best_removal(state, np.maximum(missing, 0.0))
        if move is None:
            break
        moves.append(_apply(state, move))
    while _within(state, budget):
        move = _best_refill(state, budget - state.total(), budget)
        if move is None:
            break
        moves.append(_apply(state, move))
    return moves


def _swap_blocks(state: _State, budget: np.ndarray, passes: int = 2) -> list[str]:
    """Step 3: toggle each block (drop a kept one, restore a dropped one), re-run remove-then-refill from there,
    and keep the result when it meets the budgets with more importance. The greedy prices a drop against the
    next narrowing step only; a drop that pays off through the width it lets the other groups keep is found here."""
    moves: list[str] = []
    for _ in range(passes):
        improved = False
        for b in sorted(state.blocks):
            before, value = state.snapshot(), state.value()
            toggled = _apply(state, (0.0, 0.0, "restore" if b in state.dropped else "drop", b, None))
            tried = _remove_then_refill(state, budget)
            if _within(state, budget) and state.value() > value * (1 + 1e-9) + EPS:
                moves += [f"swap: {toggled}", *tried]
                improved = True
            else:
                state.restore(before)
        if not improved:
            break
    return moves


def _credit(saved: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Progress of savings [..., 2] towards the missed budgets: Σ over missed r of min(saved_r, missing_r)/missing_r."""
    unmet = missing > 0
    safe = np.where(unmet, missing, 1.0)
    return (np.where(unmet, np.clip(saved, 0.0, None), 0.0).clip(max=safe) / safe).sum(axis=-1)


def _best_removal(state: _State, missing: np.ndarray):
    """(ratio, credit, kind, key, index) of the move losing the least importance per unit of progress, or None."""
    best = None
    for g, choice in state.groups.items():
        cur = state.index[g]
        if cur <= choice.min_index or not state.live(g):
            continue
        curve = state.group_curve(g)
        credit = _credit(curve[cur] - curve[choice.min_index:cur], missing)
        lost = choice.values[cur] - choice.values[choice.min_index:cur]
        ok = credit > EPS
        if not ok.any():
            continue
        ratios = np.where(ok, lost / np.where(ok, credit, 1.0), np.inf)
        j = int(np.argmin(ratios))
        best = _better(best, (float(ratios[j]), float(credit[j]), "narrow", g, choice.min_index + j))
    for b in state.blocks:
        if b in state.dropped:
            continue
        saved = sum((state.cost(i) for i in state.by_block[b] if state.alive(i)), np.zeros(2))
        credit = float(_credit(saved, missing))
        if credit > EPS:
            best = _better(best, (state.block_value(b) / credit, credit, "drop", b, None))
    return best


def _best_refill(state: _State, slack: np.ndarray, budget: np.ndarray):
    """The move adding the most importance per added share of the budgets that fits in `slack`, or None."""
    best = None
    tolerance = 1e-9 * np.where(np.isfinite(budget), np.abs(budget), 0.0) + EPS

    def share(added: np.ndarray) -> np.ndarray:
        return np.maximum((added / np.where(np.isfinite(budget), budget, np.inf)).max(axis=-1), EPS)

    for g, choice in state.groups.items():
        cur = state.index[g]
        if cur >= len(choice.widths) - 1 or not state.live(g):
            continue
        curve = state.group_curve(g)
        added = curve[cur + 1:] - curve[cur]
        gained = choice.values[cur + 1:] - choice.values[cur]
        fits = (added <= slack + tolerance).all(axis=-1) & (gained > 0)
        if not fits.any():
            continue
        gain_per_share = np.where(fits, gained / share(added), -np.inf)
        j = int(np.argmax(gain_per_share))
        best = _better(best, (-float(gain_per_share[j]), -float(share(added[j])), "widen", g, cur + 1 + j))
    for b in sorted(state.dropped):
        restored = set(state.dropped) - {b}
        added = sum((state.cost(i) for i in state.by_block[b] if state.alive(i, restored)), np.zeros(2))
        gained = state.block_value(b)
        if gained > 0 and (added <= slack + tolerance).all():
            best = _better(best, (-gained / float(share(added)), -float(share(added)), "restore", b, None))
    return best


def _better(best, candidate):
    """Lower ratio wins; on a tie, the larger progress (or the smaller addition)."""
    if best is None or (candidate[0], -candidate[1]) < (best[0], -best[1]):
        return candidate
    return best


def _apply(state: _State, move) -> str:
    kind, key, index = move[2], move[3], move[4]
    if kind in ("narrow", "widen"):
        old = int(state.groups[key].widths[state.index[key]])
        state.index[key] = index
        return f"{kind} group {key}: {old} -> {int(state.groups[key].widths[index])}"
    if kind == "drop":
        state.dropped.add(key)
    else:
        state.dropped.discard(key)
    for g in state.blocks[key].internal:  # a dropped branch's groups cost nothing: they count (and return) full
        state.index[g] = len(state.groups[g].widths) - 1
    return f"{kind} block {key}"

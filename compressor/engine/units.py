"""Channel units: equivalence classes of tensor channels that must be kept or removed together.

A union-find over unit ids. Every unit is born at one node (a conv's filter, a pad's zero channel, a fixed input
channel); units that meet at an elementwise op are merged. A unit can be blocked (never removed), with a reason.
"""

from __future__ import annotations

import numpy as np


class DisjointSets:
    """Union-find over ids 0..n-1 with path halving; the smaller root absorbs the larger."""

    def __init__(self, count: int = 0) -> None:
        self.parent: list[int] = list(range(count))

    def find(self, item: int) -> int:
        """Root of `item` (with path halving)."""
        parent = self.parent
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    def merge(self, a: int, b: int) -> tuple[int, int] | None:
        """Join the sets of a and b; (kept root, absorbed root), or None when they were already one set."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return None
        if ra > rb:
            ra, rb = rb, ra
        self.parent[rb] = ra
        return ra, rb


class UnitTable(DisjointSets):
    """Union-find over channel unit ids with birth node and blocked flags kept at the roots."""

    def __init__(self) -> None:
        super().__init__()
        self.birth: list[str] = []
        self.blocked: dict[int, str] = {}

    def new(self, count: int, birth: str, blocked_reason: str | None = None) -> np.ndarray:
        """Create `count` fresh units born at node `birth`."""
        start = len(self.parent)
        ids = np.arange(start, start + count, dtype=np.int64)
        self.parent.extend(ids.tolist())
        self.birth.extend([birth] * count)
        if blocked_reason:
            for i in ids.tolist():
                self.blocked[i] = blocked_reason
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge units a[i] and b[i] for every i (arrays of equal length)."""
        for x, y in zip(np.asarray(a).tolist(), np.asarray(b).tolist()):
            merged = self.merge(x, y)
            if merged is not None and merged[1] in self.blocked:
                self.blocked.setdefault(merged[0], self.blocked.pop(merged[1]))

    def block(self, units: np.ndarray, reason: str) -> None:
        """Mark units as never removable."""
        for u in np.asarray(units).tolist():
            self.blocked.setdefault(self.find(u), reason)

    def roots(self) -> np.ndarray:
        """Root id of every unit id, as an array (valid once no more unions happen)."""
        return np.array([self.find(u) for u in range(len(self.parent))], dtype=np.int64)

    def is_blocked(self, root: int) -> bool:
        """Whether the root unit is blocked."""
        return self.find(root) in self.blocked

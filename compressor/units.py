"""Channel units: equivalence classes of tensor channels that must be kept or removed together.

A union-find over unit ids. Every unit is born at one node (a conv's filter, a pad's zero channel, a fixed input
channel); units that meet at an elementwise op are merged. A unit can be blocked (never removed), with a reason.
"""

from __future__ import annotations

import numpy as np


class UnitTable:
    """Union-find over channel unit ids with birth node and blocked flags kept at the roots."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.birth: list[str] = []
        self.blocked: dict[int, str] = {}
        self._frozen: np.ndarray | None = None

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

    def find(self, unit: int) -> int:
        """Root of `unit` (with path halving)."""
        parent = self.parent
        while parent[unit] != unit:
            parent[unit] = parent[parent[unit]]
            unit = parent[unit]
        return unit

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge units a[i] and b[i] for every i (arrays of equal length)."""
        for x, y in zip(np.asarray(a).tolist(), np.asarray(b).tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx == ry:
                continue
            if rx > ry:
                rx, ry = ry, rx
            self.parent[ry] = rx
            if ry in self.blocked:
                self.blocked.setdefault(rx, self.blocked.pop(ry))

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

"""Table and number formatting shared by the bench reports: Markdown and fixed-width tables, ratios, numbers."""

from __future__ import annotations

from typing import Container


def markdown_table(rows: list[list[str]]) -> list[str]:
    """A Markdown table: the first row is the header."""
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    return [lines[0], "|" + "---|" * len(rows[0]), *lines[1:]]


def text_table(rows: list[list[str]], right: Container[int] = ()) -> list[str]:
    """A fixed-width table, columns two spaces apart and the header (first row) underlined with dashes; the columns
    whose index is in `right` are right-justified, the others left-justified."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    return [lines[0], "  ".join("-" * w for w in widths), *lines[1:]]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is unknown or the denominator is zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)


def number(value: float | None, digits: int, suffix: str = "") -> str:
    """`value` with `digits` decimals and `suffix`, or "-" when it is unknown."""
    return "-" if value is None else f"{value:.{digits}f}{suffix}"

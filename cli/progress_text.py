"""Progress messages with a count ("reconstruct: level 3/55 (...)"): a text bar on a terminal, a line per tenth off it."""

from __future__ import annotations

import re

COUNT = re.compile(r"(\d+)/(\d+)")
BAR_WIDTH = 20


def with_bar(stage: str) -> str:
    """The message with a text progress bar in front of its count (or with '...' when it has none)."""
    match = COUNT.search(stage)
    if not match or int(match.group(2)) == 0:
        return f"{stage}..."
    done, total = int(match.group(1)), int(match.group(2))
    filled = round(BAR_WIDTH * min(done, total) / total)
    return f"{stage[:match.start()]}[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {stage[match.start():]}"


def counted_step(stage: str) -> tuple[str, int | None]:
    """(the text before the count, the tenth of the count reached) — (stage, None) for a message without a count."""
    match = COUNT.search(stage)
    if not match or int(match.group(2)) == 0:
        return stage, None
    return stage[:match.start()], int(10 * int(match.group(1)) / int(match.group(2)))

"""Plain Markdown tables, so the output pastes into the README as it is."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        widths = [len(h) for h in self.headers]
        for row in self.rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

        def line(cells: Sequence[str]) -> str:
            padded = (
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            return "| " + " | ".join(padded) + " |"

        out = [f"### {self.title}", "", line(self.headers)]
        out.append(
            "|"
            + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths))
            + "|"
        )
        out += [line(r) for r in self.rows]
        if self.notes:
            out.append("")
            out += self.notes
        return "\n".join(out)


def num(value: float, digits: int = 0) -> str:
    """1234.5 -> '1,234' (or with ``digits`` decimals)."""
    return f"{value:,.{digits}f}"


def spread(values: Sequence[float], digits: int = 0) -> str:
    """Median, and the range when there is more than one value: '1,234 (1,200-1,300)'."""
    if not values:
        return "-"
    mid = num(statistics.median(values), digits)
    if len(values) == 1:
        return mid
    return f"{mid} ({num(min(values), digits)}-{num(max(values), digits)})"


def ratio(ours: Sequence[float], theirs: Sequence[float]) -> str:
    if not ours or not theirs or statistics.median(theirs) <= 0:
        return "-"
    return f"{statistics.median(ours) / statistics.median(theirs):.1f}x"

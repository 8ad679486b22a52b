"""Plain-text tables for the console, and the cell format the report templates share."""

from __future__ import annotations

from typing import Sequence


def format_cell(value) -> str:
    """A table cell: None as "-", floats with up to 4 decimals, whole numbers from 100,000 on (energies in J),
    scientific only when tiny."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1e5:
            return f"{value:,.0f}"
        return f"{value:.4g}" if 0 < abs(value) < 1e-3 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def plural(n: int, word: str) -> str:
    """``1 run``, ``2 runs``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def text_table(headers: Sequence[str], rows: Sequence[Sequence], title: str | None = None) -> str:
    """Columns of numbers right-aligned on their decimal point, any other column left-aligned."""
    columns = list(zip(*[[format_cell(v) for v in row] for row in rows])) if rows else [()] * len(headers)
    columns = [_align_numbers(c) if c and all(_is_number(v) or v == "-" for v in c) else list(c) for c in columns]
    numeric = [bool(c) and all(_is_number(v.strip()) or v.strip() == "-" for v in c) for c in columns]
    widths = [max(len(h), *(len(v) for v in c)) if c else len(h) for h, c in zip(headers, columns)]
    out = [title] if title else []
    out.append("  ".join(h.rjust(w) if num else h.ljust(w) for h, w, num in zip(headers, widths, numeric)).rstrip())
    out.append("  ".join("-" * w for w in widths))
    for i in range(len(rows)):
        cells = [c[i].rjust(w) if num else c[i].ljust(w) for c, w, num in zip(columns, widths, numeric)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def _align_numbers(column: Sequence[str]) -> list[str]:
    """Pad each number on the right so that the decimal points line up when right-aligned."""
    decimals = [len(v) - v.index(".") - 1 if "." in v else 0 for v in column]
    most = max(decimals)
    return [v + " " * (most - d + ("." not in v and most > 0)) for v, d in zip(column, decimals)]


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False

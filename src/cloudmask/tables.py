"""Plain-text tables for the console, and the cell format the report templates share."""

from __future__ import annotations

from typing import Sequence


def format_cell(value) -> str:
    """A table cell: None as "-", floats with up to 4 decimals (scientific when tiny or huge)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def text_table(headers: Sequence[str], rows: Sequence[Sequence], title: str | None = None) -> str:
    cells = [[format_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = [title] if title else []
    out.append("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    out.append(line)
    for r in cells:
        out.append("  ".join(v.rjust(w) if _is_number(v) else v.ljust(w) for v, w in zip(r, widths)))
    return "\n".join(out)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False

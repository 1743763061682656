"""How every report writes a number: a float to ``nd`` decimals, "–" for a value that is missing."""

from __future__ import annotations

from typing import Any


def number(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)

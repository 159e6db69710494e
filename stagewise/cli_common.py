"""Argument helpers shared by the CLI's commands."""

from __future__ import annotations


def split_names(values: list[str] | None) -> list[str]:
    """`--stages a,b --stages c` → [a, b, c] (repeatable and comma-separated alike)."""
    out: list[str] = []
    for v in values or []:
        out += [s.strip() for s in v.split(",") if s.strip()]
    return out

"""How kdsr words counts in what it prints: "1 pool", "2 pools"."""

from __future__ import annotations


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """``number`` and the noun in the form that number takes (``plural`` for irregular ones)."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"

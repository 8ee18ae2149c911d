"""The intent: the user's declarative file, loaded, checked and frozen."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdsr.intent.load import load_intent, parse_intent
    from kdsr.intent.model import Intent

__all__ = ["Intent", "load_intent", "parse_intent"]


def __getattr__(name: str):
    # Lazy: loading pulls in JSON Schema (slow imports), which the
    # model's users, and a re-apply answered by its receipt, never need.
    if name in ("load_intent", "parse_intent"):
        from kdsr.intent import load

        return getattr(load, name)
    if name == "Intent":
        from kdsr.intent.model import Intent

        return Intent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
